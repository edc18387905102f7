"""Every metric of eval/summary.parquet is shown: n/a with its reason, ∞ as ∞ (issue 13.7),
and chart panels are never empty (issue 11.6)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from test_report import sections

from phenoprofiler_core import report
from phenoprofiler_core.report.figures import bar_panel, plt
from phenoprofiler_core.report.render import format_cell

NO_MOA = "no MoA with ≥ 3 treatments"
NO_REPLICATES = "no treatment has ≥ 2 replicate wells"


def _summary(tmp_path, rows, *, with_note=True):
    frame = pd.DataFrame(rows, columns=["set", "metric", "variant", "value", "n", "description", "note"])
    if not with_note:
        frame = frame.drop(columns="note")
    (tmp_path / "eval").mkdir()
    frame.to_parquet(tmp_path / "eval" / "summary.parquet", index=False)


def _metrics_rows(page: str) -> dict[str, list[str]]:
    body = sections(page)["metrics"]
    rows = re.findall(r"<tr><th>([^<]*)</th>(.*?)</tr>", body)
    return {name: re.findall(r"<td[^>]*>([^<]*)</td>", cells) for name, cells in rows}


def test_all_nan_metrics_are_rows_with_their_reason(tmp_path):
    _summary(
        tmp_path,
        [
            ("classic", "map_activity", "copairs", 0.25, 12, "activity", ""),
            ("model", "map_activity", "copairs", 0.0, 12, "activity", ""),
            ("classic", "map_consistency", "copairs", np.nan, 0, "consistency", NO_MOA),
            ("model", "map_consistency", "copairs", np.nan, 0, "consistency", NO_MOA),
            ("classic", "foe_top1_mean", "published", np.inf, 7, "FoE", ""),
            ("model", "foe_top1_mean", "published", np.nan, 0, "FoE", NO_REPLICATES),
            ("classic", "recall_top1pct", "PhenoProfiler", 0.5, 4, "recall", ""),
        ],
    )
    page = report.build_report(tmp_path, sets=["classic", "model"])
    rows = _metrics_rows(page)
    # the all-NaN metric is a row (the old renderer dropped it), both cells point at one footnote
    assert rows["map_consistency (copairs)"] == ["n/a [1]", "n/a [1]", "consistency"]
    assert rows["foe_top1_mean (published)"] == ["∞", "n/a [2]", "FoE"]
    assert rows["map_activity (copairs)"] == ["0.250", "0.000", "activity"]
    # a set without the row at all: "–" (not computed), not "n/a" (computed, no value)
    assert rows["recall_top1pct (PhenoProfiler)"] == ["0.500", "–", "recall"]
    body = sections(page)["metrics"]
    assert f"[1] n/a: {NO_MOA}" in body and f"[2] n/a: {NO_REPLICATES}" in body
    assert body.count("n/a: no MoA") == 1  # one footnote per distinct reason
    assert f'title="{NO_MOA}"' in body  # the reason is also the cell's tooltip


def test_without_a_note_column_the_reason_comes_from_n(tmp_path):
    _summary(
        tmp_path,
        [
            ("classic", "map_ap", "PhenoProfiler", np.nan, 0, "map", None),
            ("classic", "map_interpolated", "DPE", np.nan, 5, "map", None),
        ],
        with_note=False,
    )
    rows = _metrics_rows(report.build_report(tmp_path, sets=["classic"]))
    assert rows["map_ap (PhenoProfiler)"][0] == "n/a [1]"
    assert rows["map_interpolated (DPE)"][0] == "n/a [2]"
    body = sections(report.build_report(tmp_path, sets=["classic"]))["metrics"]
    assert "[1] n/a: computed over nothing (n = 0" in body
    assert "[2] n/a: no reason recorded" in body


def test_format_cell_infinity_and_missing():
    assert format_cell(float("inf")).text == "∞" and format_cell(-np.inf).text == "−∞"
    assert format_cell(np.float32(np.inf)).css == "num"
    assert format_cell(np.nan).text == "–" and format_cell(None).text == "–"
    assert format_cell(0.0).text == "0.000" and format_cell(1234).text == "1,234"


@pytest.fixture()
def axes():
    fig, ax = plt().subplots()
    yield ax
    plt().close(fig)


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_bar_panel_draws_and_labels_a_zero(axes):
    bar_panel(axes, ["a", "b", "c"], [0.0, 0.5, np.nan], title="t")
    heights = [patch.get_height() for patch in axes.patches]
    assert heights == [0.0, 0.5, 0.0]  # the zero is a bar; NaN gets no height
    assert _labels(axes) == ["0", "0.5", "n/a"]
    assert axes.axison


def test_bar_panel_infinity_is_off_the_scale(axes):
    bar_panel(axes, ["a", "b"], [2.0, np.inf], title="t")
    heights = [patch.get_height() for patch in axes.patches]
    assert heights[0] == 2.0 and heights[1] > 2.0
    assert _labels(axes) == ["2", "∞"]


def test_bar_panel_without_numbers_says_why(axes):
    bar_panel(axes, ["a", "b"], [np.nan, np.nan], title="t", why_empty=NO_MOA)
    assert not axes.axison and not axes.patches
    assert _labels(axes) == [f"n/a: {NO_MOA}"]


def test_bar_panel_all_zero_keeps_a_scale(axes):
    bar_panel(axes, ["a", "b"], [0.0, 0.0], title="t", value_labels=["0 of 4", "0 of 9"])
    assert [patch.get_height() for patch in axes.patches] == [0.0, 0.0]
    assert _labels(axes) == ["0 of 4", "0 of 9"]
    assert axes.get_ylim() == (0.0, 1.0)
