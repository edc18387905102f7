"""What a report section holds: text, tables as records and PNG figures, never HTML.

Section builders return these plain objects; ``templates/report.html.j2`` turns them into markup
and Jinja2 escapes every string on the way, so a treatment called ``<script>`` is shown, not run.
Rich text is a tuple of spans (plain strings, :class:`Bold`, :class:`Code`) instead of inline
tags, so there is nothing for a builder to get wrong about escaping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import PhenoProfilerError

log = logging.getLogger("phenoprofiler_core.report")


@dataclass(frozen=True)
class Bold:
    text: str
    kind: ClassVar[str] = "bold"


@dataclass(frozen=True)
class Code:
    text: str
    kind: ClassVar[str] = "code"


@dataclass(frozen=True)
class Styled:
    """Text shown in the style of a table mark (e.g. ``sig``: the shading of a retrieved treatment)."""

    text: str
    css: str
    kind: ClassVar[str] = "styled"


Span = str | Bold | Code | Styled
Text = tuple[Span, ...]


def text(*spans: Span | Any) -> Text:
    """Rich text from spans; anything that is not a span is shown as its ``str``."""
    return tuple(s if isinstance(s, (str, Bold, Code, Styled)) else str(s) for s in spans)


def bold(value: Any) -> Bold:
    return Bold(str(value))


def code(value: Any) -> Code:
    return Code(str(value))


@dataclass(frozen=True)
class Heading:
    """A sub-heading inside a section (<h3>)."""

    text: str
    kind: ClassVar[str] = "heading"


@dataclass(frozen=True)
class Paragraph:
    """A line of text; ``style`` is one of "", "note", "note error", "note warning", "caption"."""

    text: Text
    style: str = ""
    kind: ClassVar[str] = "paragraph"


@dataclass(frozen=True)
class Bullets:
    """A list of short statements (findings, warnings)."""

    items: tuple[Text, ...]
    style: str = ""
    kind: ClassVar[str] = "bullets"


@dataclass(frozen=True)
class Marked:
    """A table value with a meaning beyond its number: ``css`` shades the cell, ``title`` explains it."""

    value: Any
    css: str = ""
    title: str = ""
    label: str | None = None  # shown instead of the formatted value (e.g. "n/a [1]")


@dataclass(frozen=True)
class Table:
    """A table as records: one dict per row, keyed by ``columns``.

    ``index``: the first column names the row (rendered as a row header).  ``header``: show the
    column names.  Numbers are formatted by the template with ``number_format`` (floats) and
    thousands separators (integers); missing values show as "–" and infinities as "∞".
    """

    columns: tuple[str, ...]
    records: tuple[dict, ...]
    index: bool = False
    header: bool = True
    number_format: str = "{:.3f}"
    css: str = ""
    footnotes: tuple[Text, ...] = ()
    kind: ClassVar[str] = "table"


def table_from_frame(
    frame, *, index: bool = False, number_format: str = "{:.3f}", css: str = "", footnotes=()
) -> Table:
    """A :class:`Table` from a DataFrame (its index is dropped; put a row label in a column)."""
    columns = tuple(str(c) for c in frame.columns)
    records = tuple(dict(zip(columns, row)) for row in frame.itertuples(index=False, name=None))
    return Table(
        columns, records, index=index, number_format=number_format, css=css, footnotes=tuple(footnotes)
    )


@dataclass(frozen=True)
class Figure:
    """One embedded PNG with its caption."""

    png: bytes
    alt: str
    caption: Text
    kind: ClassVar[str] = "figure"


@dataclass(frozen=True)
class Gallery:
    """Figures side by side (notes about figures that could not be made sit among them)."""

    items: tuple[Figure | Paragraph, ...]
    kind: ClassVar[str] = "gallery"


@dataclass(frozen=True)
class TileCard:
    png: bytes
    alt: str
    label: str
    badge: str = ""


@dataclass(frozen=True)
class TileGrid:
    """Small example pictures, one labelled card each."""

    cards: tuple[TileCard, ...]
    kind: ClassVar[str] = "tiles"


Block = Heading | Paragraph | Bullets | Table | Figure | Gallery | TileGrid


@dataclass(frozen=True)
class Section:
    """One <section> of the page: ``id`` is its anchor, ``nav`` its short name in the top bar."""

    id: str
    heading: str
    nav: str
    blocks: tuple[Block, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------ common notes


def note(*spans) -> Paragraph:
    return Paragraph(text(*spans), "note")


def caption(*spans) -> Paragraph:
    return Paragraph(text(*spans), "caption")


def missing(what: str, path: Path | str) -> Paragraph:
    return note(f"Not available: {what} (looked for ", code(path), ").")


def error_note(path: Path | str, exc: BaseException) -> Paragraph:
    # Visible in the page (not only in the log), so a broken input is never mistaken for "fine".
    return Paragraph(
        text("Could not read ", code(path), f": {type(exc).__name__}: {exc}"),
        "note error",
    )


def blocks(*parts: Block | Sequence[Block] | None) -> tuple[Block, ...]:
    """Flatten blocks and lists of blocks, dropping ``None``."""
    flat: list[Block] = []
    for part in parts:
        if part is None:
            continue
        if isinstance(part, (list, tuple)):
            flat.extend(p for p in part if p is not None)
        else:
            flat.append(part)
    return tuple(flat)


def guarded(build: Callable[[], tuple[Block, ...]], path: Path | str) -> tuple[Block, ...]:
    """Run one part of the report; a broken input becomes a visible note, not a failed report.

    A half-written or malformed upstream file should not cost the reader every other section,
    but it must not vanish either: the note names the file and the error.
    """
    try:
        return build()
    except (PhenoProfilerError, OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("report: %s: %s", path, exc)
        return (error_note(path, exc),)
