"""Findings first (issue 11.6), and the JSON records of other steps in the page.

The contract files (manifest.summary.json, illum/<plate>/qc.json, profiles/<set>/normalization.json)
are hand-made here, shaped exactly as docs/CONTRACTS.md and the producers' briefs specify.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest
from test_report import MANIFEST_SUMMARY, SETS, make_fake_results, normalization_record, sections, write_json

from phenoprofiler_core import report


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Fake results plus every contract file (test_report.write_contract_files)."""
    results = make_fake_results(tmp_path_factory.mktemp("findings"), contracts=True)
    page = report.build_report(results, sets=SETS)
    return results, page, sections(page)


def _rows(fragment: str) -> list[list[str]]:
    return [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", fragment)]


def test_findings_come_first_with_active_treatments_per_set(run):
    _, page, found = run
    assert list(found) == [sid for sid, _ in report.SECTIONS] and report.SECTIONS[0][0] == "findings"
    assert page.index('<a href="#findings">') < page.index('<a href="#summary">')
    findings = found["findings"]
    overview = _rows(findings.split("</table>")[0])
    # fixture: corrected p 0.001 (bortezomib), 0.2, 0.01 (nocodazole), 0.9 -> 2 of 4 active,
    # most significant first
    assert overview[0] == ["feature set", "treatments tested", "active", "most active", "normalization"]
    assert overview[1] == [
        "classic",
        "4",
        "2 (50%)",
        "bortezomib, nocodazole",
        "pooled over all plates (mad_robustize)",
    ]
    assert overview[2] == [
        "untrained",
        "4",
        "2 (50%)",
        "bortezomib, nocodazole",
        "per batch of Metadata_Batch (mad_robustize)",
    ]
    assert overview[3] == [
        "demo_model",
        "4",
        "2 (50%)",
        "bortezomib, nocodazole",
        "per plate (mad_robustize)",
    ]
    demo = findings.split("Active treatments: demo_model")[1].split("</table>")[0]
    assert _rows(demo)[1:] == [
        # the fixture's activity tables have no Metadata_TreatmentId, n_wells or raw p_value
        ["bortezomib", "–", "–", "0.91", "–", "0.001"],
        ["nocodazole", "–", "–", "0.62", "–", "0.01"],
    ]
    assert "<b>classic</b>: pooled over all plates (mad_robustize) — plate(s) P1, P2 have fewer" in findings


def test_findings_warnings(run):
    _, _, found = run
    warnings = re.search(r'<ul class="warnings">(.*?)</ul>', found["findings"]).group(1)
    items = [re.sub(r"<[^>]+>", "", item) for item in re.findall(r"<li>(.*?)</li>", warnings)]
    few = [i for i in items if i.startswith("Few controls")]
    assert len(few) == 1
    assert "2 of 2 plates have fewer than 16 negative-control wells (fewest: P1 with 2" in few[0]
    assert "from manifest.summary.json" in few[0] and "per plate anyway: demo_model" in few[0]
    assert "Illumination, plate P1: only 20 sites (&lt; 50)" in items
    assert "Illumination, plate P1: Mito: max/min 6.5 above 4" in items
    assert not any("plate P2" in i and "Illumination" in i for i in items)
    assert any(i.startswith("Plate-map wells without images: 3 wells") and "P1 H12 taxol" in i for i in items)
    assert "Manifest: plate P1: 3 plate-map wells have no images" in items
    assert "Normalization of demo_model: MAD from 2 wells" in items
    assert not any(i.startswith("Validation loss") for i in items)  # the fixture's losses fall
    assert "Not available" not in found["findings"]  # every input of every check is there


def test_dataset_and_qc_show_the_contract_records(run):
    _, _, found = run
    summary = found["summary"]
    assert "<th>Plate-map wells without images</th><td>3 (e.g. P1/H12/taxol)</td>" in summary
    assert "<th>Imaged sites without a plate-map row</th><td>0</td>" in summary
    plates = _rows(summary.split("<h3>Plates</h3>")[1].split("</table>")[0])
    assert plates[0][-1] == "negative-control wells" and [r[-1] for r in plates[1:]] == ["2", "2"]
    qc = found["qc"]
    table = qc.split("<h3>Illumination correction</h3>")[1].split("</table>")[0]
    rows = _rows(table)
    assert rows[0] == ["plate", "sites", "max/min DNA", "max/min Mito", "warnings"]
    assert rows[1] == ["P1", "20", "1.80", "6.50", "only 20 sites (&lt; 50); Mito: max/min 6.5 above 4"]
    assert rows[2] == ["P2", "60", "1.80", "1.50", ""]
    assert '<td class="num warn">6.50</td>' in table and '<td class="num warn">1.50</td>' not in table


def _history(stage2_validation: list[float]) -> pd.DataFrame:
    rows = [{"stage": 1, "epoch": 1, "split": "validation", "loss": 1.0}]
    rows += [
        {"stage": 2, "epoch": epoch, "split": split, "loss": loss if split == "validation" else 0.5}
        for epoch, loss in enumerate(stage2_validation, start=1)
        for split in ("train", "validation")
    ]
    return pd.DataFrame(rows).assign(mse=0.01, ce=1.0, contrastive=1.0)


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        # min 0.8 at epoch 2, last 0.95: 0.95 / 0.8 - 1 = 18.75 % > 5 %
        ([1.0, 0.8, 0.9, 0.95], "reached 0.8 at stage-2 epoch 2 and ended at 0.95 (epoch 4, +19%)"),
        ([1.0, 0.8, 0.82], None),  # +2.5 %: noise, not a trend
        ([1.0, 0.9, 0.8], None),  # still falling
    ],
)
def test_validation_loss_rising_in_stage_2(tmp_path, losses, expected):
    (tmp_path / "model" / "m").mkdir(parents=True)
    _history(losses).to_csv(tmp_path / "model" / "m" / "history.csv", index=False)
    findings = sections(report.build_report(tmp_path, sets=["m"]))["findings"]
    if expected is None:
        assert "Validation loss rising" not in findings
    else:
        assert "Validation loss rising in stage 2: </b>model m " + expected in findings


def test_no_active_treatment_says_so_and_names_the_closest(tmp_path):
    results = make_fake_results(tmp_path)
    path = results / "eval" / "classic" / "map_activity.parquet"
    table = pd.read_parquet(path)
    table["corrected_p_value"] = [0.3, 0.2, 0.6, 0.9]
    table["below_corrected_p"] = False
    table.to_parquet(path, index=False)
    findings = sections(report.build_report(results, sets=["classic"]))["findings"]
    assert _rows(findings.split("</table>")[0])[1][:3] == ["classic", "4", "0 (0%)"]
    assert "None: no treatment" in findings and "The closest is <b>taxol</b> (mAP 0.250" in findings


def test_without_contract_files_every_check_says_not_available(tmp_path):
    results = make_fake_results(tmp_path)
    findings = sections(report.build_report(results, sets=["classic"]))["findings"]
    assert "manifest.summary.json (plate-map wells without images)" in findings
    assert "illum/&lt;plate&gt;/qc.json (illumination checks)" in findings
    # controls still checked, from manifest.parquet (2 DMSO wells per plate < 16)
    assert "from manifest.parquet" in findings and "Normalization scope: not available" in findings
    assert "profiles/&lt;set&gt;/normalization.json for classic." in findings
    assert _rows(findings.split("</table>")[0])[1][-1] == "not available"


def test_a_wrong_contract_record_is_an_error_naming_file_and_key(tmp_path):
    results = make_fake_results(tmp_path)
    write_json(results / "profiles" / "classic" / "normalization.json", normalization_record("everywhere"))
    write_json(results / "manifest.summary.json", {**MANIFEST_SUMMARY, "wells": "twenty"})
    page = report.build_report(results, sets=["classic"])
    findings = sections(page)["findings"]
    assert re.search(
        r"Could not read <code>[^<]*normalization.json</code>: DataError: .*key &#39;scope&#39;", findings
    )
    assert re.search(
        r"manifest.summary.json</code>: DataError: .*key &#39;wells&#39; must be a count", findings
    )
    assert "Could not read" in sections(page)["summary"]  # the dataset section says it too
