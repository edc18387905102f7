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


def _with_intended_changes(before: list[dict]) -> list[dict]:
    """The recorded outline with the changes later issues made on purpose, each spelled out."""
    expected = {section["id"]: section for section in json.loads(json.dumps(before))}
    # issue 13.6: peak memory is Snakemake's max_pss, not max_rss; every benchmark file of
    # make_fake_results() has max_pss 710 (and max_rss 812.4).
    runtimes = expected["runtimes"]["tables"][0]
    assert runtimes[0][-1] == "peak memory (MB)" and all(row[-1] == "812.4" for row in runtimes[1:])
    runtimes[0][-1] = "peak memory, PSS (MB)"
    for row in runtimes[1:]:
        row[-1] = "710.0"
    # issue 11.6: the Plates table counts negative-control wells (2 DMSO wells per plate in the
    # fixture), and the manifest step's summary gets its own sub-heading (absent here: a note).
    plates = expected["summary"]["tables"][2]
    assert plates[0] == ["plate", "wells", "sites", "negative-control sites"]
    plates[0].append("negative-control wells")
    for row in plates[1:]:
        row.append("2")
    expected["summary"]["subheadings"].append("Plate map and images")
    # item 6 (external sets): where each set's profiles come from; the fixture has 2 per-plate
    # feature files per set, 20 wells in normalized.parquet and no consensus.parquet.
    expected["summary"]["subheadings"].append("Feature sets")
    # issue 13.3: and what each set was trained on (the fixture's sets have no embed job records: "–")
    expected["summary"]["tables"].append(
        [["feature set", "profiles from", "trained on", "well profiles", "treatment profiles"]]
        + [[name, "per-site features, 2 plate file(s)", "–", "20", "–"] for name in SETS]
    )
    return list(expected.values())


def test_port_has_the_same_sections_headings_and_tables(tmp_path):
    results = make_fake_results(tmp_path)
    page = report.build_report(results, sets=SETS, options=report.ReportOptions(title="Fake dataset report"))
    expected = _with_intended_changes(json.loads(RECORDED.read_text()))
    after = {section["id"]: section for section in outline(page)}
    # Sections added since the port may sit between them; the old ones keep their order.
    assert [sid for sid in after if sid in {s["id"] for s in expected}] == [s["id"] for s in expected]
    for old in expected:
        assert after[old["id"]] == old, old["id"]
