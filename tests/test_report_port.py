"""The Jinja2 template port renders the page the string-built renderer rendered (issue 17.1).

``tests/data/report_outline_before_port.json`` is the outline (section ids, headings, table
cell texts) of the page that the string-concatenating ``report.py`` of commit 392f183 made from
``make_fake_results()`` with the title "Fake dataset report", recorded once with that renderer:

    outline(old_report.build_report(make_fake_results(root), sets=SETS,
                                    options=ReportOptions(title="Fake dataset report")))

It is an independent reference (the code under test did not produce it).  The same comparison on
the real demo results (tests/report_outline.py on both pages) gave identical outlines and
identical visible text; see the commit message of the port.
"""

from __future__ import annotations

import json
from pathlib import Path

from report_outline import outline
from test_report import SETS, make_fake_results

from phenoprofiler_core import report

RECORDED = Path(__file__).parent / "data" / "report_outline_before_port.json"


def test_outline_helper_sees_sections_headings_and_cells():
    page = (
        '<section id="a"><h2>Head <b>one</b></h2><h3>Sub</h3>'
        "<table><tr><th>x</th><td class='num'> 1,234 </td></tr></table></section>"
        '<section id="b"><h2>Two</h2><p>text, not a table</p></section>'
    )
    assert outline(page) == [
        {"id": "a", "heading": "Head one", "subheadings": ["Sub"], "tables": [[["x", "1,234"]]]},
        {"id": "b", "heading": "Two", "subheadings": [], "tables": []},
    ]


def test_port_has_the_same_sections_headings_and_tables(tmp_path):
    results = make_fake_results(tmp_path)
    page = report.build_report(results, sets=SETS, options=report.ReportOptions(title="Fake dataset report"))
    before = json.loads(RECORDED.read_text())
    after = outline(page)
    assert [s["id"] for s in after] == [s["id"] for s in before]
    for old, new in zip(before, after):
        assert new == old, old["id"]
