"""Tests of the HTML benchmark report on a small, realistically shaped fake results folder."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from phenoprofiler_core import report
from phenoprofiler_core.cli import main
from phenoprofiler_core.report import readers

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
SETS = ["classic", "untrained", "demo_model"]
TREATMENTS = {
    "DMSO": ("negcon", ""),
    "bortezomib": ("trt", "proteasome inhibitor"),
    "taxol": ("trt", "tubulin polymerization inhibitor"),
    "nocodazole": ("trt", "tubulin polymerization inhibitor"),
    "staurosporine": ("poscon", "PKC inhibitor|apoptosis inducer"),
}
# Values that appear nowhere else, so finding them in the page proves the table carries them.
SUMMARY_VALUES = {
    ("classic", "map_activity"): 0.4321,
    ("untrained", "map_activity"): 0.2468,
    ("demo_model", "map_activity"): 0.6543,
    ("classic", "foe"): 3.1415,
    ("demo_model", "foe"): 7.2222,
    ("classic", "recall@1"): 0.1357,
}


def _well_layout():
    """Two plates x 10 wells; every treatment in 2 wells per plate (replicates)."""
    rows = []
    wells = ["A01", "A02", "B01", "B02", "C01", "C02", "D01", "D02", "E05", "H12"]
    for plate in ("P1", "P2"):
        for i, well in enumerate(wells):
            treatment = list(TREATMENTS)[i // 2]
            pert, moa = TREATMENTS[treatment]
            rows.append((plate, well, treatment, pert, moa))
    return rows


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def normalization_record(
    scope: str, *, method="mad_robustize", reason="", warnings=(), batch_column=None
) -> dict:
    """profiles/<set>/normalization.json as the profiles step writes it (docs/CONTRACTS.md)."""
    return {
        "method": method,
        "scope": scope,
        "batch_column": batch_column,
        "reason": reason,
        "controls_per_plate": {"P1": 2, "P2": 2},
        "min_controls_per_plate": 16,
        "warnings": list(warnings),
    }


def illumination_qc_record(
    plate: str, *, n_sites: int, mito_ratio: float, warnings=(), mito_warnings=()
) -> dict:
    """illum/<plate>/qc.json as the illumination step writes it (docs/CONTRACTS.md)."""
    return {
        "plate": plate,
        "n_sites": n_sites,
        "min_sites": 50,
        "max_ratio_limit": 4.0,
        "channels": {
            "DNA": {"max_over_min": 1.8, "warnings": []},
            "Mito": {"max_over_min": mito_ratio, "warnings": list(mito_warnings)},
        },
        "warnings": list(warnings),
    }


# manifest.summary.json as the manifest step writes it (docs/CONTRACTS.md), for the fake layout.
MANIFEST_SUMMARY = {
    "sites": 40,
    "plates": 2,
    "wells": 20,
    "treatments": 4,
    "controls_per_plate": {"P1": 2, "P2": 2},
    "platemap_wells_without_images": {
        "count": 3,
        "examples": [{"plate": "P1", "well": "H12", "treatment": "taxol"}],
    },
    "images_without_platemap_row": {"count": 0, "examples": []},
    "warnings": ["plate P1: 3 plate-map wells have no images"],
}


def write_contract_files(results: Path) -> None:
    """The JSON records of the manifest, illumination and profiles steps: classic pooled,
    untrained per batch, demo_model per plate; plate P1 with illumination warnings."""
    write_json(results / "manifest.summary.json", MANIFEST_SUMMARY)
    write_json(
        results / "illum" / "P1" / "qc.json",
        illumination_qc_record(
            "P1",
            n_sites=20,
            mito_ratio=6.5,
            warnings=["only 20 sites (< 50)"],
            mito_warnings=["max/min 6.5 above 4"],
        ),
    )
    write_json(results / "illum" / "P2" / "qc.json", illumination_qc_record("P2", n_sites=60, mito_ratio=1.5))
    write_json(
        results / "profiles" / "classic" / "normalization.json",
        normalization_record("pooled", reason="plate(s) P1, P2 have fewer than 16 control wells"),
    )
    write_json(
        results / "profiles" / "untrained" / "normalization.json",
        normalization_record("batch", batch_column="Metadata_Batch", reason="every batch has 16 controls"),
    )
    write_json(
        results / "profiles" / "demo_model" / "normalization.json",
        normalization_record(
            "plate", reason="profiles.normalize_scope is 'plate'", warnings=["MAD from 2 wells"]
        ),
    )


def make_fake_results(root: Path, *, n_wells_profiles: int | None = None, contracts: bool = False) -> Path:
    """Build results/<dataset>/ with every input the report reads (``contracts``: also the JSON
    records of other steps; off, the folder is what the pipeline wrote before they existed)."""
    results = root / "results" / "fake"
    rng = np.random.default_rng(0)
    layout = _well_layout()

    manifest = pd.DataFrame(
        [
            {
                "Metadata_Plate": p,
                "Metadata_Well": w,
                "Metadata_Site": s,
                "Metadata_Treatment": t,
                "Metadata_TreatmentId": f"BRD-{t[:4].upper()}",
                "Metadata_pert_type": k,
                "Metadata_moa": m,
                **{f"Path_{c}": f"/data/{p}/{w}_s{s}_{c}.tif" for c in CHANNELS},
            }
            for p, w, t, k, m in layout
            for s in (1, 2)
        ]
    )
    manifest["Metadata_Site"] = manifest["Metadata_Site"].astype(int)
    results.mkdir(parents=True)
    manifest.to_parquet(results / "manifest.parquet", index=False)

    for plate in ("P1", "P2"):
        # illumination QC picture: a real PNG
        (results / "illum" / plate).mkdir(parents=True)
        gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 1))
        Image.fromarray(gradient).save(results / "illum" / plate / "qc.png")

        sites = manifest[manifest["Metadata_Plate"] == plate]
        meta = sites[[c for c in sites.columns if c.startswith("Metadata_")]].reset_index(drop=True)
        # tiles: blobs ("nuclei") on a dim background, different per channel
        yy, xx = np.mgrid[0:64, 0:64]
        tiles = np.zeros((len(meta), len(CHANNELS), 64, 64), dtype=np.float32)
        for i in range(len(meta)):
            for c in range(len(CHANNELS)):
                for _ in range(6):
                    cy, cx = rng.integers(6, 58, size=2)
                    tiles[i, c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (3 + c) ** 2))
        tiles = np.clip(tiles / tiles.max() + 0.05 * rng.random(tiles.shape), 0, 1).astype(np.float16)
        (results / "tiles").mkdir(exist_ok=True)
        np.save(results / "tiles" / f"{plate}.npy", tiles)
        meta.to_parquet(results / "tiles" / f"{plate}.sites.parquet", index=False)

        classic = meta.copy()
        classic["Count_Nuclei"] = rng.integers(40, 200, size=len(meta)).astype(np.float32)
        classic["Intensity_MeanIntensity_DNA"] = rng.random(len(meta)).astype(np.float32)
        (results / "features" / "classic").mkdir(parents=True, exist_ok=True)
        classic.to_parquet(results / "features" / "classic" / f"{plate}.parquet", index=False)
        # the embedded sets' per-site features (own generator: the values above stay as they were)
        embedding_rng = np.random.default_rng(1)
        for name in SETS[1:]:
            embedded = meta.copy()
            for j in range(8):
                embedded[f"emb{j:03d}"] = embedding_rng.normal(size=len(meta)).astype(np.float32)
            (results / "features" / name).mkdir(parents=True, exist_ok=True)
            embedded.to_parquet(results / "features" / name / f"{plate}.parquet", index=False)

    history = []
    for stage in (1, 2):
        for epoch in range(1, 5):
            for split in ("train", "val"):
                decay = 1.0 / (epoch + 4 * (stage - 1))
                history.append(
                    {
                        "stage": stage,
                        "epoch": epoch,
                        "split": split,
                        "mse": 0.05 * decay,
                        "ce": np.nan if stage == 1 else 2.0 * decay,
                        "contrastive": np.nan if stage == 1 else 1.5 * decay,
                    }
                )
    history = pd.DataFrame(history)
    history["loss"] = 100 * history["mse"] + 0.1 * history["ce"].fillna(0) + history["contrastive"].fillna(0)
    (results / "model" / "demo_model").mkdir(parents=True)
    history.to_csv(results / "model" / "demo_model" / "history.csv", index=False)

    summary = [{"set": s, "metric": m, "value": v, "variant": None} for (s, m), v in SUMMARY_VALUES.items()]
    summary += [
        {"set": "demo_model", "metric": "map", "value": 0.5551, "variant": "map_interpolated"},
        {"set": "demo_model", "metric": "map", "value": 0.5662, "variant": "map_ap"},
    ]
    for row in summary:  # evaluate's summary also says what each metric measures
        row["description"] = "copairs mAP vs negcon" if row["metric"] == "map_activity" else None
    (results / "eval").mkdir()
    pd.DataFrame(summary).to_parquet(results / "eval" / "summary.parquet", index=False)

    wells = pd.DataFrame(
        layout,
        columns=[
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Treatment",
            "Metadata_pert_type",
            "Metadata_moa",
        ],
    )
    if n_wells_profiles is not None:
        wells = wells.iloc[:n_wells_profiles]
    treatment_names = list(TREATMENTS)
    centres = rng.normal(size=(len(TREATMENTS), 24))
    for k, name in enumerate(SETS):
        activity = pd.DataFrame(
            {
                "Metadata_Treatment": treatment_names[1:],
                "mean_average_precision": [0.91, 0.35, 0.62, 0.12][:] if k == 2 else [0.81, 0.25, 0.52, 0.02],
                "corrected_p_value": [0.001, 0.2, 0.01, 0.9],
            }
        )
        activity["below_corrected_p"] = activity["corrected_p_value"] < 0.05
        (results / "eval" / name).mkdir()
        activity.to_parquet(results / "eval" / name / "map_activity.parquet", index=False)

        idx = wells["Metadata_Treatment"].map(treatment_names.index).to_numpy()
        features = centres[idx] + 0.3 * rng.normal(size=(len(wells), 24))
        profiles = pd.concat(
            [
                wells.reset_index(drop=True),
                pd.DataFrame(features.astype(np.float32), columns=[f"f{j}" for j in range(24)]),
            ],
            axis=1,
        )
        profiles["f_const"] = np.float32(1.0)  # a constant feature must not break the embedding
        (results / "profiles" / name).mkdir(parents=True)
        profiles.to_parquet(results / "profiles" / name / "normalized.parquet", index=False)

    for rule, jobs in (("tiles", ["P1", "P2"]), ("classic", ["P1", "P2"]), ("train", ["demo_model"])):
        (results / "benchmarks" / rule).mkdir(parents=True)
        for job in jobs:
            (results / "benchmarks" / rule / f"{job}.tsv").write_text(
                "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                f"{12.5 if rule == 'train' else 2.25}\t0:00:12\t812.4\t900.1\t700\t710\t1.0\t2.0\t95.0\t11.0\n"
            )
    if contracts:
        write_contract_files(results)
    return results


def sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', page, flags=re.S))


def text_only(fragment: str) -> str:
    """The page without its base64 payloads (which may contain any letter sequence)."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "DATA", fragment)


def data_pngs(fragment: str) -> list[bytes]:
    return [
        base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', fragment)
    ]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("report")
    results = make_fake_results(root, contracts=True)
    out = results / "report.html"
    rc = main(
        [
            "report",
            "--results-dir",
            str(results),
            "--sets",
            *SETS,
            "--title",
            "Fake dataset report",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return results, out.read_text()


def test_every_section_present_with_content(full_report):
    _, page = full_report
    found = sections(page)
    assert list(found) == [sid for sid, _ in report.SECTIONS]
    assert "<title>Fake dataset report</title>" in page
    assert "Not available" not in page and "Could not read" not in page

    summary = found["summary"]
    assert re.search(r"<th>Plates</th><td>2</td>", summary)
    assert re.search(r"<th>Wells</th><td>20</td>", summary)
    assert re.search(r"<th>Sites \(images per channel\)</th><td>40</td>", summary)
    assert re.search(r"<th>Treatments \(excluding controls\)</th><td>3</td>", summary)
    assert "DNA, ER, RNA, AGP, Mito" in summary
    assert "DMSO" in summary and "negcon" in summary and "staurosporine" in summary


def test_qc_pictures(full_report):
    _, page = full_report
    qc = sections(page)["qc"]
    # 2 illumination pictures + 5 example tiles + 1 channel strip + 2 plate heatmaps
    assert len(data_pngs(qc)) == 10
    assert qc.count('class="tile"') == len(TREATMENTS)
    assert "Count_Nuclei" in qc and "plate <b>P2</b>" in qc
    assert "blue = DNA, green = ER, red = RNA" in qc
    # the example tiles are real colour pictures, not blank squares
    tile_png = data_pngs(qc.split('class="tiles"')[1])[0]
    tile = np.asarray(Image.open(io.BytesIO(tile_png)))
    assert tile.ndim == 3 and tile.shape[2] == 3 and tile.std() > 10
    # controls come first so the reader has a reference
    assert qc.index("DMSO") < qc.index("bortezomib")


def test_metrics_table_has_values_side_by_side(full_report):
    _, page = full_report
    metrics = sections(page)["metrics"]
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", metrics).group(1)
    assert re.findall(r"<th>([^<]*)</th>", header) == ["metric", *SETS, "what it measures"]
    for value in SUMMARY_VALUES.values():
        assert f"{value:.3f}" in metrics
    # the two published MAP flavours stay separate rows, named by variant
    assert "map (map_interpolated)" in metrics and "map (map_ap)" in metrics
    assert "0.555" in metrics and "0.566" in metrics
    row = re.search(r"<tr><th>map_activity</th>(.*?)</tr>", metrics).group(1)
    assert re.findall(r">([0-9.]+)<", row) == ["0.432", "0.247", "0.654"]
    assert row.endswith("<td>copairs mAP vs negcon</td>")


def test_map_training_umap_runtimes(full_report):
    _, page = full_report
    found = sections(page)
    assert "0.910" in found["map"] and "bortezomib" in found["map"]
    assert 'class="num sig">0.910' in found["map"]  # significant = shaded
    assert 'class="num">0.120' in found["map"]  # not significant = plain
    assert len(data_pngs(found["training"])) == 1 and "demo_model" in found["training"]
    umap = found["umap"]
    assert len(data_pngs(umap)) == len(SETS)
    assert umap.count("UMAP (cosine") == len(SETS) and "PCA" not in text_only(umap)
    runtimes = found["runtimes"]
    assert re.search(r"<td>train</td><td class=\"num\">1</td><td>0:00:12</td>", runtimes)
    assert re.search(
        r"<td>tiles</td><td class=\"num\">2</td><td>0:00:04</td><td class=\"num\">4.5</td>", runtimes
    )


def test_self_contained_and_images_decode(full_report):
    _, page = full_report
    # base64 payloads may contain any letters; look for external references everywhere else
    text = text_only(page)
    assert not re.search(r"https?:|//[a-z]|<link|@import|url\(|<iframe|<object", text, flags=re.I)
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    images = data_pngs(page)
    # qc 10 + training 1 + metrics 1 + map 1 + umap 3 + runtimes 1 + findings chart 1
    assert len(images) == len(srcs) == 10 + 1 + 1 + 1 + 3 + 1 + 1
    for png in images:
        with Image.open(io.BytesIO(png)) as image:
            image.verify()


def test_few_wells_fall_back_to_pca(tmp_path):
    results = make_fake_results(tmp_path, n_wells_profiles=8)
    page = report.build_report(results, sets=["classic"])
    umap = sections(page)["umap"]
    assert "PCA" in umap and "only 8 wells" in umap and len(data_pngs(umap)) == 1


def test_missing_inputs_give_notes(tmp_path):
    results = tmp_path / "results" / "empty"
    results.mkdir(parents=True)
    out = results / "report.html"
    assert (
        main(["report", "--results-dir", str(results), "--sets", "classic", "demo_model", "--out", str(out)])
        == 0
    )
    found = sections(out.read_text())
    assert list(found) == [sid for sid, _ in report.SECTIONS]
    for sid, body in found.items():
        assert "Not available" in body, sid
        assert "<img" not in body
    assert "model/demo_model/history.csv" in found["training"]


def test_partial_and_broken_inputs(tmp_path):
    results = make_fake_results(tmp_path)
    # no Count_* column: heatmaps skipped with a note, the rest of QC still there
    for plate in ("P1", "P2"):
        path = results / "features" / "classic" / f"{plate}.parquet"
        pd.read_parquet(path).drop(columns="Count_Nuclei").to_parquet(path)
    (results / "eval" / "summary.parquet").write_bytes(b"not a parquet file")
    activity = results / "eval" / "untrained" / "map_activity.parquet"
    pd.DataFrame({"Metadata_Treatment": ["x"], "score": [1.0]}).to_parquet(activity)
    page = report.build_report(results, sets=SETS)
    found = sections(page)
    assert list(found) == [sid for sid, _ in report.SECTIONS]
    assert "No <code>Count_*</code> column" in found["qc"] and 'class="tile"' in found["qc"]
    assert "Could not read" in found["metrics"] and "summary.parquet" in found["metrics"]
    assert "average_precision" in found["map"] and "0.910" in found["map"]  # other sets still shown
    assert len(data_pngs(found["umap"])) == len(SETS)


def test_activity_table_keeps_doses_apart(tmp_path):
    path = tmp_path / "map_activity.parquet"
    pd.DataFrame(
        {
            "Metadata_TreatmentId": ["BRD-1@1uM", "BRD-1@10uM", "BRD-2"],
            "Metadata_Treatment": ["drug1", "drug1", "drug2"],
            "average_precision_mean": [0.2, 0.8, 0.5],
            "corrected_p_value": [0.5, 0.01, 0.04],
        }
    ).to_parquet(path)
    table = readers.read_activity(path).set_index("treatment")
    assert table.loc["drug1 [BRD-1@10uM]", "map"] == pytest.approx(0.8)
    assert table.loc["drug1 [BRD-1@1uM]", "map"] == pytest.approx(0.2)
    assert table.loc["drug2", "map"] == pytest.approx(0.5)
    # no below_* column: significance from the corrected p-value
    assert list(table["significant"]) == [False, True, True]


def test_duplicate_metric_rows_are_flagged(tmp_path):
    (tmp_path / "eval").mkdir()
    pd.DataFrame(
        {
            "set": ["classic", "classic", "untrained"],
            "metric": ["map", "map", "map"],
            "value": [0.5, 0.7, 0.1],
        }
    ).to_parquet(tmp_path / "eval" / "summary.parquet")
    metrics = sections(report.build_report(tmp_path, sets=["classic", "untrained"]))["metrics"]
    assert "1 duplicate (set, metric, variant) rows" in metrics and "classic/map" in metrics
    assert "0.500" in metrics and "0.100" in metrics


def test_other_count_column_and_well_names():
    assert readers.count_column(["Metadata_Well", "Count_Cells"]) == "Count_Cells"
    assert readers.count_column(["Count_Cells", "Count_Nuclei"]) == "Count_Nuclei"
    assert readers.well_position("A01") == (0, 0)
    assert readers.well_position("P24") == (15, 23)
    assert readers.well_position("AF48") == (31, 47)
    assert readers.well_position("r02c03") == (1, 2)
    assert readers.well_position("weird") is None
    assert readers.plate_shape(7, 11) == (8, 12) and readers.plate_shape(8, 11) == (16, 24)


def test_bad_option_names_the_key(tmp_path, capsys):
    assert (
        main(
            ["report", "--results-dir", str(tmp_path), "--out", str(tmp_path / "r.html"), "--table-rows", "0"]
        )
        == 2
    )
    assert "report.table_rows" in capsys.readouterr().err


def test_missing_results_dir_is_an_error(tmp_path, capsys):
    assert main(["report", "--results-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_names_are_escaped_not_interpreted(tmp_path):
    """Treatment names and titles are data: the template escapes them (Jinja2 autoescape)."""
    results = make_fake_results(tmp_path)
    hostile = '<img src=x onerror="alert(1)"> & co'
    activity = results / "eval" / "classic" / "map_activity.parquet"
    table = pd.read_parquet(activity)
    table.loc[0, "Metadata_Treatment"] = hostile
    table.to_parquet(activity, index=False)
    page = report.build_report(results, sets=SETS, options=report.ReportOptions(title="A <b>bold</b> title"))
    assert "<title>A &lt;b&gt;bold&lt;/b&gt; title</title>" in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt; &amp; co" in sections(page)["map"]
    assert "<img src=x" not in page and "<b>bold</b>" not in page
