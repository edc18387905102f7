"""The outline of a report page: section ids, headings and table contents as plain text.

Used to show that the template port renders the same page as the string-built renderer it
replaced (tests/test_report_port.py): tags are stripped and whitespace collapsed, so only what a
reader sees is compared, not how the markup is spelled.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class _Outline(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[dict] = []
        self._capture: list[str] | None = None  # text being collected for the open h2/h3/cell
        self._row: list[str] | None = None
        self._table: list[list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append({"id": attrs.get("id"), "heading": "", "subheadings": [], "tables": []})
        elif not self.sections:
            return
        elif tag in ("h2", "h3", "th", "td"):
            self._capture = []
        elif tag == "table":
            self._table = []
        elif tag == "tr" and self._table is not None:
            self._row = []

    def handle_endtag(self, tag):
        if not self.sections:
            return
        section = self.sections[-1]
        if tag in ("h2", "h3") and self._capture is not None:
            words = _squash("".join(self._capture))
            if tag == "h2":
                section["heading"] = words
            else:
                section["subheadings"].append(words)
            self._capture = None
        elif tag in ("th", "td") and self._capture is not None:
            if self._row is not None:
                self._row.append(_squash("".join(self._capture)))
            self._capture = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table" and self._table is not None:
            section["tables"].append(self._table)
            self._table = None

    def handle_data(self, data):
        if self._capture is not None:
            self._capture.append(data)


def outline(page: str) -> list[dict]:
    """[{id, heading, subheadings: [...], tables: [[[cell text, ...] per row] per table]}] in page order."""
    parser = _Outline()
    parser.feed(page)
    parser.close()
    return parser.sections
