"""Bring your own profiles: published profile tables as feature sets.

Column mapping on small hand-made tables, then the real published profiles of ../shared/data
(LINCS plate SQ00015054 as written by pycytominer; BBBC021 per-well CellProfiler means, Ljosa 2013)
through the three doors a user has — the Python API, the config path (the CLI commands the Snakemake
rules run, with arguments built from an ``external:`` entry; and Snakemake itself) and
``phenoprofiler evaluate --table`` — which must give the same numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from phenoprofiler_core import cli, evaluate, external, metrics, profiles
from phenoprofiler_core.errors import DataError

NULL_SIZE = 2000
BIN = str(Path(sys.executable).parent)


# ----------------------------------------------------------------------------- mapping


def pycytominer_like(n_per_plate=6, plates=("SQ1", "SQ2")):
    """A small table with pycytominer's column names (controls: Metadata_pert_type == 'control')."""
    rows = []
    for plate in plates:
        for k in range(n_per_plate):
            control = k < 2
            rows.append(
                dict(
                    Metadata_Plate=plate,
                    Metadata_Well=f"A{k + 1:02d}",
                    Metadata_broad_sample="DMSO" if control else f"BRD-{k % 2}",
                    Metadata_pert_type="control" if control else "trt",
                    Metadata_moa=None
                    if control
                    else ("kinase inhibitor|EGFR inhibitor" if k % 2 else "HDAC"),
                    Metadata_mmoles_per_liter=0.0 if control else 10.0 / k,
                    Cells_AreaShape_Area=100.0 + k,
                    Nuclei_Intensity_Mean=0.5 * k,
                )
            )
    return pd.DataFrame(rows)


LINCS_LIKE = external.TableMapping(treatment_id=("Metadata_broad_sample",), negcon=("control",))


def test_pycytominer_columns_are_mapped_and_features_found(tmp_path):
    path = tmp_path / "plate.csv"
    pycytominer_like().to_csv(path, index=False)
    table = external.read_table(path, LINCS_LIKE)
    df = table.profiles
    assert table.features == ["Cells_AreaShape_Area", "Nuclei_Intensity_Mean"]
    assert (df.loc[df["Metadata_broad_sample"] == "DMSO", "Metadata_pert_type"] == "negcon").all()
    assert (df.loc[df["Metadata_broad_sample"] != "DMSO", "Metadata_pert_type"] == "trt").all()
    assert df["Metadata_TreatmentId"].tolist()[:3] == ["DMSO", "DMSO", "BRD-0"]
    assert df["Metadata_Treatment"].equals(df["Metadata_TreatmentId"])  # no name column: the id
    assert set(df["Metadata_moa"]) == {"", "HDAC", "kinase inhibitor|EGFR inhibitor"}
    assert "Metadata_mmoles_per_liter" in df.columns  # other Metadata_ columns travel along
    assert df[table.features].dtypes.eq(np.float64).all()


def test_one_table_in_csv_csv_gz_and_parquet_reads_the_same(tmp_path):
    raw = pycytominer_like()
    raw.to_csv(tmp_path / "t.csv", index=False)
    raw.to_csv(tmp_path / "t.csv.gz", index=False)
    raw.to_parquet(tmp_path / "t.parquet", index=False)
    tables = [
        external.read_table(tmp_path / name, LINCS_LIKE).profiles
        for name in ("t.csv", "t.csv.gz", "t.parquet")
    ]
    for other in tables[1:]:
        pd.testing.assert_frame_equal(tables[0], other, check_dtype=False)
    # two files of the same table are concatenated
    raw.iloc[:6].to_csv(tmp_path / "a.csv", index=False)
    raw.iloc[6:].to_csv(tmp_path / "b.csv", index=False)
    both = external.read_table([tmp_path / "a.csv", tmp_path / "b.csv"], LINCS_LIKE).profiles
    pd.testing.assert_frame_equal(both, tables[0], check_dtype=False)


def test_treatment_id_from_two_columns_and_controls_by_value(tmp_path):
    # BBBC021-like names: compound + concentration identify a treatment; DMSO wells are controls.
    raw = pd.DataFrame(
        {
            "Image_Metadata_Plate": ["W1", "W1", "W1"],
            "Image_Metadata_Well": ["B02", "B03", "B04"],
            "Image_Metadata_Compound": ["taxol", "taxol", "DMSO"],
            "Image_Metadata_Concentration": [0.3, 3.0, 0.0],
            "moa": ["Microtubule stabilizers", "Microtubule stabilizers", "DMSO"],
            "Cells_x": [1.0, 2.0, 3.0],
        }
    )
    mapping = external.TableMapping(
        plate="Image_Metadata_Plate",
        well="Image_Metadata_Well",
        treatment_id=("Image_Metadata_Compound", "Image_Metadata_Concentration"),
        treatment="Image_Metadata_Compound",
        moa="moa",
        pert_type=None,  # controls: treatment id or name in negcon
        negcon=("DMSO",),
    )
    raw.to_csv(tmp_path / "bbbc021.csv", index=False)
    df = external.read_table(tmp_path / "bbbc021.csv", mapping).profiles
    assert df["Metadata_TreatmentId"].tolist() == ["taxol@0.3", "taxol@3.0", "DMSO@0.0"]
    assert df["Metadata_pert_type"].tolist() == ["trt", "trt", "negcon"]
    assert df["Metadata_Treatment"].tolist() == ["taxol", "taxol", "DMSO"]
    assert df["Metadata_Plate"].tolist() == ["W1"] * 3 and "Image_Metadata_Plate" not in df.columns
    assert profiles.feature_columns(df) == ["Cells_x"]


def test_bad_tables_are_errors_naming_the_column_or_row(tmp_path):
    raw = pycytominer_like()
    path = tmp_path / "t.csv"
    raw.drop(columns=["Metadata_moa"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"Metadata_moa.*moa"):
        external.read_table(path, LINCS_LIKE)
    raw.assign(comment="free text").to_csv(path, index=False)
    with pytest.raises(DataError, match="comment"):
        external.read_table(path, LINCS_LIKE)
    # ... unless excluded
    mapping = external.TableMapping(**{**LINCS_LIKE.__dict__, "exclude_columns": ("comment",)})
    assert "comment" not in external.read_table(path, mapping).profiles.columns
    pd.concat([raw, raw.iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(DataError, match="appears more than once"):
        external.read_table(path, LINCS_LIKE)
    raw.assign(Metadata_broad_sample=raw["Metadata_broad_sample"].where(raw.index != 3)).to_csv(
        path, index=False
    )
    with pytest.raises(DataError, match="row 3"):
        external.read_table(path, LINCS_LIKE)
    raw.iloc[:2].to_csv(path, index=False)  # two DMSO rows: one treatment twice at treatment level
    with pytest.raises(DataError, match="one row per treatment"):
        external.read_table(path, LINCS_LIKE, level="treatment")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown table format"):
        external.read_table(tmp_path / "t.xlsx")


def test_schema_defaults_are_the_mapping_defaults(repo_root):
    schema = yaml.safe_load((repo_root / "workflow/schemas/config.schema.yaml").read_text())
    entry = schema["properties"]["external"]["additionalProperties"]["properties"]
    defaults = {key: value["default"] for key, value in entry.items() if "default" in value}
    defaults["columns"] = {key: value["default"] for key, value in entry["columns"]["properties"].items()}
    assert external.mapping_from_config({"paths": ["x"], **defaults}) == external.TableMapping()
    assert external.mapping_from_config({"paths": ["x"]}) == external.TableMapping()
    # and the CLI defaults are the same mapping
    parser = cli.build_parser()
    args = parser.parse_args(["evaluate", "--table", "x.csv", "--out", "o"])
    assert external.mapping_from_args(args) == external.TableMapping()


# ----------------------------------------------------------------------------- real tables


def summary_values(path) -> pd.Series:
    summary = pd.read_parquet(path)
    return summary.set_index("metric")["value"]


def assert_same_numbers(*eval_dirs):
    """Every evaluation table and summary value agree across the given evaluation folders."""
    first = Path(eval_dirs[0])
    for other in map(Path, eval_dirs[1:]):
        for name in evaluate.EVAL_FILES:
            a, b = pd.read_parquet(first / f"{name}.parquet"), pd.read_parquet(other / f"{name}.parquet")
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, obj=f"{other}/{name}")
        a = evaluate.summarize_set(first).drop(columns="set")
        b = evaluate.summarize_set(other).drop(columns="set")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9)


LINCS_ENTRY = {
    "paths": None,  # filled in per test
    "normalized": True,  # pycytominer level 4b: normalized and feature-selected already
    "same_wells": False,
    "columns": {"treatment_id": "Metadata_broad_sample"},
    "negcon": ["control"],
}


def lincs_path(shared_data) -> Path:
    return shared_data / "lincs_SQ00015054_profiles" / "SQ00015054_normalized_feature_select.csv.gz"


def config_path_run(entry, out_root, *, null_size=NULL_SIZE):
    """What the profiles and evaluate rules run for an external set (arguments from its entry)."""
    prof, ev = out_root / "profiles", out_root / "eval"
    argv = [
        "profiles",
        "--table",
        *map(str, entry["paths"]),
        *external.table_arguments(entry),
        "--out",
        str(prof),
    ]
    assert cli.main(argv) == 0
    level = entry.get("level", "well")
    argv = [
        "evaluate",
        "--profiles",
        str(prof),
        "--out",
        str(ev),
        "--level",
        level,
        "--null-size",
        str(null_size),
    ]
    assert cli.main(argv) == 0
    return prof, ev


def test_lincs_profiles_api_config_path_and_cli_agree(shared_data, tmp_path):
    path = lincs_path(shared_data)
    entry = {**LINCS_ENTRY, "paths": [str(path)]}
    # Python API
    api = external.evaluate_table(
        path,
        tmp_path / "api",
        mapping=external.mapping_from_config(entry),
        already_normalized=True,
        null_size=NULL_SIZE,
    )
    # config path: the commands the rules run
    prof, ev = config_path_run(entry, tmp_path / "config")
    # command line
    argv = [
        "evaluate",
        "--table",
        str(path),
        "--normalized",
        "--treatment-id-column",
        "Metadata_broad_sample",
        "--negcon",
        "control",
        "--null-size",
        str(NULL_SIZE),
        "--out",
        str(tmp_path / "cli"),
    ]
    assert cli.main(argv) == 0
    assert_same_numbers(tmp_path / "api", ev, tmp_path / "cli")
    plan = json.loads((prof / "normalization.json").read_text())
    assert plan["scope"] == "none" and "already normalized" in plan["reason"]
    values = summary_values(api["summary"])
    print(values.round(3).to_dict())
    # README: 58 compounds against 24 DMSO wells, real activity signal
    activity = pd.read_parquet(api["map_activity"])
    assert len(activity) == 58 and values["fraction_retrieved_activity"] > 0.4
    assert pd.read_parquet(tmp_path / "cli" / "summary.parquet")["set"].unique().tolist() == [
        "SQ00015054_normalized_feature_select"
    ]


def bbbc021_table(shared_data, folder) -> Path:
    """The published per-well means joined with their compound, concentration and MoA (README recipe),
    written as one CSV.GZ under the published column names."""
    base = shared_data / "bbbc021_ljosa2013_per_well_profiles"
    wells = pd.read_csv(base / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz")
    images = pd.read_csv(base / "BBBC021_v1_image.csv.gz")
    images = images[
        [
            "Image_Metadata_Plate_DAPI",
            "Image_Metadata_Well_DAPI",
            "Image_Metadata_Compound",
            "Image_Metadata_Concentration",
        ]
    ].drop_duplicates()
    moa = pd.read_csv(base / "BBBC021_v1_moa.csv")
    joined = wells.merge(
        images,
        left_on=["Image_Metadata_Plate", "Image_Metadata_Well"],
        right_on=["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"],
        validate="one_to_one",
    ).drop(columns=["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"])
    joined = joined.merge(
        moa,
        left_on=["Image_Metadata_Compound", "Image_Metadata_Concentration"],
        right_on=["compound", "concentration"],
        validate="many_to_one",
    ).drop(columns=["compound", "concentration"])
    path = folder / "bbbc021_per_well.csv.gz"
    joined.to_csv(path, index=False)
    return path


BBBC021_ENTRY = {
    "paths": None,
    "columns": {
        "plate": "Image_Metadata_Plate",
        "well": "Image_Metadata_Well",
        "treatment_id": ["Image_Metadata_Compound", "Image_Metadata_Concentration"],
        "moa": "moa",
        "pert_type": "Image_Metadata_Compound",
    },
    "negcon": ["DMSO"],
}


def test_bbbc021_raw_profiles_api_config_path_cli_and_site_route_agree(shared_data, tmp_path):
    path = bbbc021_table(shared_data, tmp_path)
    entry = {**BBBC021_ENTRY, "paths": [str(path)]}
    mapping = external.mapping_from_config(entry)
    api = external.evaluate_table(path, tmp_path / "api", mapping=mapping, null_size=NULL_SIZE)
    prof, ev = config_path_run(entry, tmp_path / "config")
    argv = [
        "evaluate",
        "--table",
        str(path),
        "--plate-column",
        "Image_Metadata_Plate",
        "--well-column",
        "Image_Metadata_Well",
        "--treatment-id-column",
        "Image_Metadata_Compound",
        "Image_Metadata_Concentration",
        "--moa-column",
        "moa",
        "--pert-type-column",
        "Image_Metadata_Compound",
        "--negcon",
        "DMSO",
        "--null-size",
        str(NULL_SIZE),
        "--out",
        str(tmp_path / "cli"),
    ]
    assert cli.main(argv) == 0
    assert_same_numbers(tmp_path / "api", ev, tmp_path / "cli")
    # 6 DMSO wells per plate (< 16): the controls of all 55 plates are pooled
    plan = json.loads((prof / "normalization.json").read_text())
    assert plan["scope"] == "pooled" and len(plan["controls_per_plate"]) == 55
    assert set(plan["controls_per_plate"].values()) == {6}
    values = summary_values(api["summary"])
    print(values.round(3).to_dict())
    assert len(pd.read_parquet(api["foe_map_recall"])) == 103  # compound-concentrations with a MoA
    assert values["map_ap"] > 0.6  # published per-well-mean baselines ~0.6-0.9 (README); chance ~0.1
    # The pipeline's own route (one 'site' per well through `phenoprofiler profiles --features`)
    # gives the same wells, hence the same numbers.
    table = external.read_table(path, mapping).profiles
    table = table.assign(Metadata_Site=1)
    site_files = []
    for plate, part in table.groupby("Metadata_Plate"):
        site_files.append(tmp_path / "sites" / f"{plate}.parquet")
        site_files[-1].parent.mkdir(exist_ok=True)
        part.to_parquet(site_files[-1], index=False)
    assert (
        cli.main(["profiles", "--features", *map(str, site_files), "--out", str(tmp_path / "site_route")])
        == 0
    )
    for name in ("normalized", "selected", "consensus"):
        a = pd.read_parquet(tmp_path / "site_route" / f"{name}.parquet")
        b = pd.read_parquet(prof / f"{name}.parquet")
        features = profiles.feature_columns(b)
        assert profiles.feature_columns(a) == features
        np.testing.assert_allclose(a[features].to_numpy(), b[features].to_numpy(), rtol=1e-6, atol=1e-6)


def test_treatment_level_table_gives_moa_metrics_and_says_activity_is_na(shared_data, tmp_path):
    raw = pd.read_csv(lincs_path(shared_data))
    features = [c for c in raw.columns if not c.startswith("Metadata_")]
    treated = raw[raw["Metadata_pert_type"] == "trt"]
    consensus = treated.groupby("Metadata_broad_sample")[features].median()
    moa = treated.groupby("Metadata_broad_sample")["Metadata_moa"].first().fillna("")
    table = pd.concat([moa, consensus], axis=1).copy().reset_index()
    path = tmp_path / "consensus.parquet"
    table.to_parquet(path, index=False)
    mapping = external.TableMapping(
        treatment_id=("Metadata_broad_sample",), plate=None, well=None, pert_type=None
    )
    out = external.evaluate_table(
        path,
        tmp_path / "eval",
        mapping=mapping,
        level="treatment",
        steps={"feature_select": ["drop_na_columns"]},
        null_size=NULL_SIZE,
    )
    summary = pd.read_parquet(out["summary"]).set_index("metric")
    assert np.isnan(summary.loc["map_activity", "value"])
    assert summary.loc["map_activity", "note"] == evaluate.NOTE_TREATMENT_LEVEL
    assert summary.loc["map_ap", "note"] == "" and summary.loc["map_consistency", "note"] == ""
    # map_ap by scikit-learn, query by query, on the same 58 treatment profiles
    annotated = table[table["Metadata_moa"] != ""].reset_index(drop=True)
    S = metrics.cosine_similarity_matrix(annotated[features].to_numpy())
    M = metrics.moa_match_matrix(annotated["Metadata_moa"])
    expected = np.nanmean(metrics.map_ap_reference(S, M))
    assert summary.loc["map_ap", "value"] == pytest.approx(expected, rel=1e-6)
    plan = json.loads(out["profiles_normalization"].read_text())
    assert plan["scope"] == "none" and "treatment-level" in plan["reason"]


@pytest.mark.slow
def test_external_table_through_snakemake_matches_the_python_api(shared_data, repo_root, tmp_path):
    path = lincs_path(shared_data)
    entry = {**LINCS_ENTRY, "paths": [str(path)]}
    config = tmp_path / "external.yaml"
    config.write_text(yaml.safe_dump({"external": {"lincs_cp": entry}, "evaluate": {"null_size": NULL_SIZE}}))
    results = tmp_path / "results"
    target = results / "demo" / "eval" / "lincs_cp" / "map_activity.parquet"
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    run = subprocess.run(
        [f"{BIN}/snakemake", "--cores", "2", "--configfile", "config/demo.yaml", str(config)]
        + ["--config", f"results={results}", "--", str(target)],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    api = external.evaluate_table(
        path,
        tmp_path / "api",
        mapping=external.mapping_from_config(entry),
        already_normalized=True,
        null_size=NULL_SIZE,
    )
    assert_same_numbers(api["map_activity"].parent, target.parent)
