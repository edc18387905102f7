"""The report at real size stays readable and bounded (issue 16.5): tables capped at
report.table_rows, one picture per plate only for report.qc_plates plates (problems first), the
2-D map drawn from a seeded sample whose size the caption states.

Plates are real 384-well plates (16 x 24); only the number of sites per well is shrunk to one.
Timing and peak memory at BBBC022 and JUMP size are measured by bench/bench_report_scale.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_report import illumination_qc_record, sections

from phenoprofiler_core import report
from phenoprofiler_core.report.umap import read_profile_sample

WELLS = [f"{chr(ord('A') + r)}{c + 1:02d}" for r in range(16) for c in range(24)]
N_PLATES = 30
CONTROLS = {f"P{i:02d}": 8 if i % 3 else 2 for i in range(N_PLATES)}  # every third plate: 2 controls


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    results = tmp_path_factory.mktemp("scale") / "results" / "big"
    results.mkdir(parents=True)
    rows = []
    for plate, n_controls in CONTROLS.items():
        for k, well in enumerate(WELLS):
            control = k < n_controls
            rows.append((plate, well, 1, "DMSO" if control else f"t{k % 50}", "negcon" if control else "trt"))
    manifest = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Site",
            "Metadata_Treatment",
            "Metadata_pert_type",
        ],
    )
    manifest["Path_DNA"] = "/data/x.tif"
    manifest.to_parquet(results / "manifest.parquet", index=False)
    png = Image.new("L", (40, 20), 128)
    rng = np.random.default_rng(0)
    for plate in CONTROLS:
        folder = results / "illum" / plate
        folder.mkdir(parents=True)
        png.save(folder / "qc.png")
        flagged = plate == "P25"
        (folder / "qc.json").write_text(
            json.dumps(
                illumination_qc_record(
                    plate,
                    n_sites=384,
                    mito_ratio=7.0 if flagged else 1.5,
                    mito_warnings=["max/min 7 above 4"] if flagged else [],
                )
            )
        )
        # cells per site: ~100 everywhere, except an almost empty plate and an overgrown one
        level = {"P07": 5, "P19": 900}.get(plate, 100)
        classic = pd.DataFrame(
            {
                "Metadata_Plate": plate,
                "Metadata_Well": WELLS,
                "Count_Nuclei": rng.poisson(level, len(WELLS)).astype(np.float32),
            }
        )
        (results / "features" / "classic").mkdir(parents=True, exist_ok=True)
        classic.to_parquet(results / "features" / "classic" / f"{plate}.parquet", index=False)
    # 40 well profiles of one set, for the sampled map
    wells = manifest.iloc[:40][["Metadata_Plate", "Metadata_Well", "Metadata_Treatment"]].copy()
    for j in range(6):
        wells[f"f{j}"] = rng.normal(size=len(wells)).astype(np.float32)
    (results / "profiles" / "classic").mkdir(parents=True)
    wells.to_parquet(results / "profiles" / "classic" / "normalized.parquet", index=False)
    options = report.ReportOptions(table_rows=5, qc_plates=4, umap_max_wells=20, umap_min_wells=15)
    return sections(report.build_report(results, sets=["classic"], options=options))


def _table_after(fragment: str, marker: str) -> list[list[str]]:
    table = fragment.split(marker, 1)[1].split("</table>")[0]
    return [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)]


def test_plate_table_is_capped_fewest_controls_first(big):
    rows = _table_after(big["summary"], "<h3>Plates</h3>")
    assert rows[0][0] == "plate" and rows[0][-1] == "negative-control wells"
    # plates 0, 3, 6, 9, 12 have 2 control wells; the cap keeps them (then by name)
    assert [(r[0], r[-1]) for r in rows[1:]] == [(f"P{i:02d}", "2") for i in (0, 3, 6, 9, 12)]
    assert "Showing the 5 of 30 plates with the fewest negative-control wells" in big["summary"]
    assert "<th>Plates</th><td>30</td>" in big["summary"]  # the facts still count every plate


def test_one_picture_per_plate_only_for_qc_plates_with_problems_first(big):
    qc = big["qc"]
    illumination = qc.split("<h3>Illumination correction</h3>")[1].split("<h3>")[0]
    # checks table: the flagged plate first, 5 rows (table_rows), caption says how many of 30
    assert _table_after(illumination, "<table")[1][0] == "P25"
    assert "Showing 5 of 30 plates, those with warnings first" in illumination
    pictures = re.findall(r'alt="illumination functions, plate (P\d+)"', illumination)
    assert pictures == ["P25", "P00", "P01", "P02"]
    assert "Pictures of 4 of 30 plates" in illumination
    counts = qc.split("<h3>Cell counts per well</h3>")[1]
    mapped = re.findall(r'alt="cell counts plate (P\d+)"', counts)
    assert len(mapped) == 4 and {"P07", "P19"} <= set(mapped)  # the empty and the overgrown plate
    assert "Median cells per well of all 30 plates" in counts


def test_map_caption_states_the_seeded_sample(big):
    umap = big["umap"]
    assert "a random sample of 20 of the 40 well profiles (seed 0, report.umap_max_wells)" in umap
    assert umap.count("<img") == 1


def test_profile_sample_keeps_rows_and_labels_together(tmp_path):
    n = 1000
    table = pa.table(
        {
            "Metadata_Treatment": [f"t{i}" for i in range(n)],
            "Metadata_Plate": ["P"] * n,
            "row": np.arange(n, dtype=np.float32),  # a feature that names its own row
            "twice": 2 * np.arange(n, dtype=np.float32),
        }
    )
    path = tmp_path / "normalized.parquet"
    pq.write_table(table, path, row_group_size=64)  # many row groups: samples cross batch borders
    labels, features, total = read_profile_sample(path, max_rows=100, seed=3)
    assert total == n and features.shape == (100, 2) and len(labels) == 100
    rows = features[:, 0].astype(int)
    assert len(set(rows)) == 100 and (np.diff(rows) > 0).all()
    assert list(labels["Metadata_Treatment"]) == [f"t{i}" for i in rows]  # labels match their rows
    np.testing.assert_array_equal(features[:, 1], 2 * features[:, 0])
    again = read_profile_sample(path, max_rows=100, seed=3)[1]
    other = read_profile_sample(path, max_rows=100, seed=4)[1]
    np.testing.assert_array_equal(again, features)
    assert not np.array_equal(other, features)
    whole = read_profile_sample(path, max_rows=n, seed=3)[1]
    np.testing.assert_array_equal(whole[:, 0], np.arange(n))
