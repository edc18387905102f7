"""PhenoProfiler pipeline core: every computation of the workflow lives here.

Modules map one-to-one onto workflow stages (DESIGN.md §3): ``manifest``, ``illumination``,
``tiles``, ``cells``, ``classic``, ``model``/``train``/``embed``, ``profiles``, ``evaluate``,
``report``.  Functions take paths and typed options; nothing here reads Snakemake objects.
"""

__version__ = "0.1.0"
