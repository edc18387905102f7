"""Sections (plain data) -> one self-contained HTML page, through the Jinja2 template.

The template is ``phenoprofiler_core/templates/report.html.j2`` (layout, CSS and the small
picture-check script live there, not in code).  Autoescaping is on for every value, and an
undefined name in the template is an error instead of an empty string.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from functools import cache

import jinja2
import numpy as np
import pandas as pd

from .content import Marked, Section


@dataclass(frozen=True)
class Cell:
    text: str
    css: str = ""
    title: str = ""


def _is_missing(value) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def format_cell(value, number_format: str = "{:.3f}") -> Cell:
    """Display text and CSS class of one table value."""
    if isinstance(value, Marked):
        inner = format_cell(value.value, number_format)
        css = " ".join(c for c in (inner.css, value.css) if c)
        label = value.label if value.label is not None else inner.text
        return Cell(label, css, value.title or inner.title)
    if _is_missing(value):
        numeric = isinstance(value, (float, np.floating))
        return Cell("–", "num na" if numeric else "na")
    if isinstance(value, (bool, np.bool_)):
        return Cell(str(bool(value)))
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):  # a real result (e.g. infinite odds), not a missing one
            return Cell("∞" if value > 0 else "−∞", "num")
        return Cell(number_format.format(float(value)), "num")
    if isinstance(value, (int, np.integer)):
        return Cell(f"{int(value):,}", "num")
    return Cell(str(value))


def unknown_block(kind: str):
    raise TypeError(f"report template: no macro for block kind {kind!r} (see report/content.py)")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("phenoprofiler_core", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["data_uri"] = data_uri
    env.globals["format_cell"] = format_cell
    env.globals["unknown_block"] = unknown_block
    return env


def render_page(
    *, title: str, results_name: str, sets: list[str], generated: str, sections: list[Section]
) -> str:
    template = _environment().get_template("report.html.j2")
    return template.render(
        title=title, results_name=results_name, sets=sets, generated=generated, sections=sections
    )
