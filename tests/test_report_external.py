"""Sets brought in as external profile tables (config ``external:``): profiles and evaluations,
no per-plate features, no model.  The report treats them like the others where data exist and
skips per-site QC and training for them (task item 6)."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest
from test_report import SETS, make_fake_results, sections

from phenoprofiler_core import report

WELL_LEVEL = "cellprofiler_published"  # a well-level table: normalized profiles, activity
TREATMENT_LEVEL = "cnn1_consensus"  # a treatment-level table: consensus only, activity n/a
ACTIVITY_NA = "treatment-level table: activity needs wells"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    results = make_fake_results(tmp_path_factory.mktemp("external"))
    # well level: the pipeline's profile and eval files, copied from classic (no features/ folder)
    shutil.copytree(results / "profiles" / "classic", results / "profiles" / WELL_LEVEL)
    shutil.copytree(results / "eval" / "classic", results / "eval" / WELL_LEVEL)
    # treatment level: one profile per treatment, an empty activity table and a reason
    wells = pd.read_parquet(results / "profiles" / "classic" / "normalized.parquet")
    features = [c for c in wells.columns if not c.startswith("Metadata_")]
    consensus = wells.groupby(["Metadata_Treatment", "Metadata_moa"], as_index=False)[features].median()
    (results / "profiles" / TREATMENT_LEVEL).mkdir()
    consensus.to_parquet(results / "profiles" / TREATMENT_LEVEL / "consensus.parquet", index=False)
    (results / "eval" / TREATMENT_LEVEL).mkdir()
    empty = pd.read_parquet(results / "eval" / "classic" / "map_activity.parquet").iloc[:0]
    empty.to_parquet(results / "eval" / TREATMENT_LEVEL / "map_activity.parquet", index=False)
    summary = pd.read_parquet(results / "eval" / "summary.parquet")
    summary["note"] = ""
    extra = pd.DataFrame(
        [
            {"set": WELL_LEVEL, "metric": "map_activity", "value": 0.4321, "note": ""},
            {"set": TREATMENT_LEVEL, "metric": "map_activity", "value": float("nan"), "note": ACTIVITY_NA},
        ]
    )
    pd.concat([summary, extra], ignore_index=True).to_parquet(
        results / "eval" / "summary.parquet", index=False
    )
    sets = [*SETS, WELL_LEVEL, TREATMENT_LEVEL]
    return sections(report.build_report(results, sets=sets, options=report.ReportOptions(umap_min_wells=3)))


def test_external_sets_are_named_in_the_dataset_section(page):
    rows = dict(re.findall(r"<tr><td>(\w+)</td><td>([^<]*)</td>", page["summary"]))
    assert rows[WELL_LEVEL] == rows[TREATMENT_LEVEL] == "external profile table (no per-site features)"
    assert rows["classic"] == "per-site features, 2 plate file(s)"
    table = page["summary"].split("<h3>Feature sets</h3>")[1]
    # 20 wells in normalized.parquet; 5 treatments in the consensus table; – where not written
    assert re.search(
        rf"<td>{WELL_LEVEL}</td><td>[^<]*</td><td[^>]*>–</td><td class=\"num\">20</td><td class=\"na\">–</td>",
        table,
    )
    assert re.search(
        rf"<td>{TREATMENT_LEVEL}</td><td>[^<]*</td><td[^>]*>–</td><td class=\"na\">–</td><td class=\"num\">5</td>",
        table,
    )


def test_no_per_site_qc_and_no_training_claimed_for_external_sets(page):
    assert f"Per-site QC does not apply to {WELL_LEVEL}, {TREATMENT_LEVEL}" in page["qc"]
    training = page["training"]
    assert "demo_model" in training
    assert WELL_LEVEL not in training and TREATMENT_LEVEL not in training  # no "missing history" note


def test_external_sets_get_findings_metrics_and_maps(page):
    findings = page["findings"]
    rows = {
        name: (tested, active)
        for name, tested, active in re.findall(
            r"<tr><td>(\w+)</td><td[^>]*>([^<]*)</td><td>([^<]*)</td>", findings
        )
    }
    assert rows[WELL_LEVEL] == ("4", "2 (50%)")
    assert rows[TREATMENT_LEVEL] == ("0", f"n/a: {ACTIVITY_NA}")
    assert (
        f"Active treatments: {WELL_LEVEL}" in findings
        and f"Active treatments: {TREATMENT_LEVEL}" not in findings
    )
    assert "0.432" in page["metrics"] and f"n/a: {ACTIVITY_NA}" in page["metrics"]
    umap = page["umap"]
    assert umap.count("<img") == len(SETS) + 2
    assert (
        f"<b>{TREATMENT_LEVEL}</b>: 5 treatment profiles from <code>profiles/{TREATMENT_LEVEL}/consensus.parquet"
        in umap
    )
    assert "Treatment-level profiles" in umap
