"""The ``phenoprofiler`` command line: one sub-command per workflow step.

Each stage module exposes ``register_cli(subparsers)`` that adds its sub-command(s) and sets
``func`` on the parser; this file only collects them, so a stage owns its own arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import PhenoProfilerError

# Stage modules that provide sub-commands, in workflow order.
STAGE_MODULES = (
    "metadata",
    "manifest",
    "illumination",
    "tiles",
    "cells",
    "classic",
    "targets",
    "train",
    "embed",
    "profiles",
    "evaluate",
    "report",
    "fetch",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with ``only``, just that stage's sub-command.

    Importing every stage pulls in torch, timm, pycytominer and umap (~10 s and ~850 MB before any work),
    so a workflow job, which runs one sub-command, imports one stage module; ``--help`` imports them all.
    """
    parser = argparse.ArgumentParser(
        prog="phenoprofiler",
        description="PhenoProfiler pipeline steps (each is also a Snakemake rule).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in STAGE_MODULES:
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(f"phenoprofiler_core.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"phenoprofiler_core.{name}":
                continue  # stage not built yet
            raise
        module.register_cli(sub)
    return parser


def _requested_stage(argv: list[str]) -> str | None:
    """The sub-command named on the command line (first argument that is not an option), if a stage."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in STAGE_MODULES else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_requested_stage(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except PhenoProfilerError as exc:
        # Expected, user-facing failures: one clear line, no traceback.
        print(f"phenoprofiler {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
