"""Evaluation stage: CLI on synthetic profiles, and real benchmarks from ../shared/data.

Real data (skipped with a reason when ../shared/data is absent):
* BBBC021 per-well CellProfiler profiles (Ljosa et al. 2013): `phenoprofiler profiles` with per-plate
  DMSO normalization, then `phenoprofiler evaluate`; MoA retrieval must beat label-shuffled MoAs by a
  clear margin.
* LINCS plate SQ00015054 (already normalized): copairs phenotypic activity of compounds against DMSO
  must beat shuffled compound labels by a clear margin.
* The embedded demo (slow): classic features with the shipped config retrieve lonafarnib as active.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phenoprofiler_core import cli, evaluate, metrics, profiles
from phenoprofiler_core.errors import DataError

SHUFFLE_SEED = 0


# ----------------------------------------------------------------------------- synthetic


def synthetic_profiles(folder, name, *, seed=0, signal=3.0, n_plates=2, drop_well=None):
    """selected/consensus tables: 4 MoAs x 3 treatments x 2 wells per plate + 4 DMSO wells per plate."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, 16)) * signal
    rows, values = [], []
    for p in range(n_plates):
        well = 0
        for t in range(12):
            moa = t % 4
            for _ in range(2):
                rows.append((f"P{p}", f"W{well:02d}", f"cpd{t}", "trt", f"moa{moa}"))
                values.append(centres[moa] + rng.standard_normal(16))
                well += 1
        for _ in range(4):
            rows.append((f"P{p}", f"W{well:02d}", "DMSO", "negcon", ""))
            values.append(rng.standard_normal(16))
            well += 1
    wells = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Treatment",
            "Metadata_pert_type",
            "Metadata_moa",
        ],
    )
    wells.insert(2, "Metadata_TreatmentId", wells["Metadata_Treatment"])
    features = [f"f{j}" for j in range(16)]
    wells = pd.concat([wells, pd.DataFrame(np.array(values, dtype=np.float32), columns=features)], axis=1)
    if drop_well is not None:
        wells = wells.drop(index=drop_well).reset_index(drop=True)
    out = folder / name
    out.mkdir(parents=True)
    wells.to_parquet(out / "selected.parquet", index=False)
    profiles.consensus_profiles(wells, features, "median").to_parquet(out / "consensus.parquet", index=False)
    return out


def test_evaluate_cli_and_summary(tmp_path):
    synthetic_profiles(tmp_path / "profiles", "good", signal=3.0)
    synthetic_profiles(tmp_path / "profiles", "noise", signal=0.0, seed=1)
    for name in ("good", "noise"):
        argv = [
            "evaluate",
            "--profiles",
            str(tmp_path / "profiles" / name),
            "--out",
            str(tmp_path / "eval" / name),
            "--null-size",
            "500",
            "--seed",
            "0",
        ]
        assert cli.main(argv) == 0
    activity = pd.read_parquet(tmp_path / "eval" / "good" / "map_activity.parquet")
    assert len(activity) == 12 and "dmso" not in set(activity["Metadata_TreatmentId"].str.lower())
    consistency = pd.read_parquet(tmp_path / "eval" / "good" / "map_consistency.parquet")
    assert sorted(consistency["Metadata_moa_label"]) == ["moa0", "moa1", "moa2", "moa3"]
    retrieval = pd.read_parquet(tmp_path / "eval" / "good" / "foe_map_recall.parquet")
    assert len(retrieval) == 12 and (retrieval["n_same_moa"] == 2).all()

    summary_path = tmp_path / "eval" / "summary.parquet"
    assert (
        cli.main(
            [
                "evaluate",
                "--summary",
                str(tmp_path / "eval" / "good"),
                str(tmp_path / "eval" / "noise"),
                "--out",
                str(summary_path),
            ]
        )
        == 0
    )
    summary = pd.read_parquet(summary_path)
    assert set(summary["set"]) == {"good", "noise"}
    assert not summary.duplicated(["set", "metric", "variant"]).any()
    value = summary.pivot(index="metric", columns="set", values="value")
    for metric in ("map_activity", "map_consistency", "map_ap", "map_interpolated", "recall_top10pct"):
        assert value.loc[metric, "good"] > value.loc[metric, "noise"] + 0.3, metric
    assert value.loc["fraction_retrieved_activity", "good"] == 1.0
    variants = summary.set_index(["set", "metric"])["variant"]
    assert variants[("good", "map_interpolated")] == "DeepProfilerExperiments"
    assert variants[("good", "map_ap")] == "PhenoProfiler"


def test_same_wells_restricts_to_wells_every_set_has(tmp_path):
    full = synthetic_profiles(tmp_path / "profiles", "full")
    partial = synthetic_profiles(tmp_path / "profiles", "partial", drop_well=[0, 1])  # both wells of cpd0, P0
    paths = evaluate.evaluate_profiles(
        full, tmp_path / "eval" / "full", null_size=200, same_wells_as=[full, partial]
    )
    retrieval = pd.read_parquet(paths["foe_map_recall"])
    assert retrieval.loc[retrieval["Metadata_TreatmentId"] == "cpd0", "n_wells"].item() == 2  # was 4
    activity = pd.read_parquet(paths["map_activity"])
    assert activity.loc[activity["Metadata_TreatmentId"] == "cpd0", "n_wells"].item() == 2


def test_missing_profiles_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(DataError, match=r"selected\.parquet"):
        evaluate.evaluate_profiles(tmp_path / "nothing", tmp_path / "eval")


# ----------------------------------------------------------------------------- real data


def bbbc021_site_tables(data_dir, folder):
    """Ljosa per-well means as one 'site' per well, one parquet per plate, in our feature contract."""
    base = data_dir / "bbbc021_ljosa2013_per_well_profiles"
    wells = pd.read_csv(base / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz")
    images = pd.read_csv(base / "BBBC021_v1_image.csv.gz")[
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
    )
    joined = joined.merge(
        moa,
        left_on=["Image_Metadata_Compound", "Image_Metadata_Concentration"],
        right_on=["compound", "concentration"],
        validate="many_to_one",
    )
    assert len(joined) == 632  # README: every well gets a label
    features = [c for c in wells.columns if not c.startswith("Image_")]
    is_dmso = joined["compound"] == "DMSO"
    treatment = joined["compound"] + "@" + joined["concentration"].astype(str)
    table = pd.DataFrame(
        {
            "Metadata_Plate": joined["Image_Metadata_Plate"],
            "Metadata_Well": joined["Image_Metadata_Well"],
            "Metadata_Site": 1,
            "Metadata_Treatment": treatment,
            "Metadata_TreatmentId": treatment,
            "Metadata_pert_type": np.where(is_dmso, "negcon", "trt"),
            "Metadata_moa": np.where(is_dmso, "", joined["moa"]),
        }
    )
    table = pd.concat([table, joined[features].astype(np.float32)], axis=1)
    paths = []
    for plate, part in table.groupby("Metadata_Plate"):
        path = folder / f"{plate}.parquet"
        part.to_parquet(path, index=False)
        paths.append(path)
    return paths


def shuffled_moa(wells: pd.DataFrame) -> pd.DataFrame:
    """Permute MoA labels across annotated treatments (fixed seed); controls keep theirs."""
    rng = np.random.default_rng(SHUFFLE_SEED)
    per_treatment = wells[wells["Metadata_moa"] != ""].groupby("Metadata_TreatmentId")["Metadata_moa"].first()
    permuted = dict(zip(per_treatment.index, rng.permutation(per_treatment.to_numpy())))
    out = wells.copy()
    out["Metadata_moa"] = out["Metadata_TreatmentId"].map(permuted).fillna(out["Metadata_moa"])
    return out


def test_bbbc021_moa_retrieval_beats_shuffled_labels(shared_data, tmp_path):
    site_tables = bbbc021_site_tables(shared_data, tmp_path)
    out = tmp_path / "profiles" / "classic"
    # Per-plate robust z-scores against that plate's DMSO wells, then the default feature selection.
    assert (
        cli.main(
            [
                "profiles",
                "--features",
                *map(str, site_tables),
                "--out",
                str(out),
                "--normalize",
                "mad_robustize",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "evaluate",
                "--profiles",
                str(out),
                "--out",
                str(tmp_path / "eval" / "classic"),
                "--null-size",
                "1000",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "evaluate",
                "--summary",
                str(tmp_path / "eval" / "classic"),
                "--out",
                str(tmp_path / "eval" / "summary.parquet"),
            ]
        )
        == 0
    )
    summary = pd.read_parquet(tmp_path / "eval" / "summary.parquet").set_index("metric")["value"]
    retrieval = pd.read_parquet(tmp_path / "eval" / "classic" / "foe_map_recall.parquet")
    assert len(retrieval) == 103  # 103 compound-concentrations with a MoA

    selected = pd.read_parquet(out / "selected.parquet")
    features = profiles.feature_columns(selected)
    shuffled = evaluate.foe_map_recall(shuffled_moa(selected), features)
    shuffled_summary = metrics.summarize_retrieval(evaluate._result_from_table(shuffled))
    print(
        {
            k: round(summary[k], 3)
            for k in (
                "map_ap",
                "map_interpolated",
                "recall_top10pct",
                "foe_top1_mean",
                "map_consistency",
                "map_activity",
                "fraction_retrieved_activity",
            )
        }
    )
    print({k: round(v["value"], 3) for k, v in shuffled_summary.items()})
    # Published per-well-mean baselines for this feature set are ~0.6-0.9 (README); chance ~0.1.
    assert summary["map_ap"] > 0.6
    assert summary["map_ap"] > shuffled_summary["map_ap"]["value"] + 0.4
    assert summary["map_interpolated"] > shuffled_summary["map_interpolated"]["value"] + 0.4
    assert summary["recall_top10pct"] > shuffled_summary["recall_top10pct"]["value"] + 0.3
    assert summary["foe_top1_mean"] > 3 * shuffled_summary["foe_top1_mean"]["value"]
    assert summary["map_consistency"] > 0.5


def lincs_wells(data_dir) -> tuple[pd.DataFrame, list[str]]:
    raw = pd.read_csv(data_dir / "lincs_SQ00015054_profiles" / "SQ00015054_normalized_feature_select.csv.gz")
    features = [c for c in raw.columns if not c.startswith("Metadata_")]
    wells = pd.DataFrame(
        {
            "Metadata_Plate": raw["Metadata_Plate"],
            "Metadata_Well": raw["Metadata_Well"],
            # A compound's wells (its doses) are its replicates, as in copairs' LINCS example.
            "Metadata_TreatmentId": raw["Metadata_broad_sample"],
            "Metadata_Treatment": raw["Metadata_broad_sample"],
            "Metadata_pert_type": np.where(raw["Metadata_pert_type"] == "control", "negcon", "trt"),
            "Metadata_moa": raw["Metadata_moa"].fillna(""),
        }
    )
    return pd.concat([wells, raw[features]], axis=1), features


def test_lincs_activity_beats_shuffled_labels(shared_data):
    wells, features = lincs_wells(shared_data)
    activity = evaluate.activity_map(wells, features, null_size=2000, seed=0)
    assert len(activity) == 58  # 58 compounds, DMSO is the reference
    rng = np.random.default_rng(SHUFFLE_SEED)
    shuffled = wells.copy()
    treated = (shuffled["Metadata_pert_type"] == "trt").to_numpy()
    shuffled.loc[treated, "Metadata_TreatmentId"] = rng.permutation(
        shuffled.loc[treated, "Metadata_TreatmentId"].to_numpy()
    )
    null = evaluate.activity_map(shuffled, features, null_size=2000, seed=0)
    real_map, null_map = activity["mean_average_precision"].mean(), null["mean_average_precision"].mean()
    real_frac, null_frac = activity["below_corrected_p"].mean(), null["below_corrected_p"].mean()
    print(
        f"LINCS activity mAP {real_map:.3f} (shuffled {null_map:.3f}); retrieved {real_frac:.2f} (shuffled {null_frac:.2f})"
    )
    assert real_map > null_map + 0.2
    assert real_frac > 0.4 and null_frac < 0.1


# ----------------------------------------------------------------------------- notes


def test_summary_note_says_why_a_value_is_missing(tmp_path):
    # 4 treatments on ONE well each (no replicates), MoAs in pairs (no MoA with 3 treatments).
    rng = np.random.default_rng(2)
    rows = [("P0", f"W{k}", f"cpd{k}", "trt", f"moa{k // 2}") for k in range(4)]
    rows += [("P0", f"C{k}", "DMSO", "negcon", "") for k in range(3)]
    wells = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_TreatmentId",
            "Metadata_pert_type",
            "Metadata_moa",
        ],
    )
    wells["Metadata_Treatment"] = wells["Metadata_TreatmentId"]
    features = [f"f{j}" for j in range(6)]
    wells[features] = rng.standard_normal((len(wells), 6)).astype(np.float32)
    folder = tmp_path / "profiles" / "pairs"
    folder.mkdir(parents=True)
    wells.to_parquet(folder / "selected.parquet", index=False)
    profiles.consensus_profiles(wells, features, "median").to_parquet(
        folder / "consensus.parquet", index=False
    )
    evaluate.evaluate_profiles(folder, tmp_path / "eval" / "pairs", null_size=200)
    summary = evaluate.summarize_set(tmp_path / "eval" / "pairs").set_index("metric")
    assert summary["note"].map(type).eq(str).all()
    assert np.isnan(summary.loc["map_activity", "value"])
    assert summary.loc["map_activity", "note"] == evaluate.NOTE_NO_REPLICATES
    assert summary.loc["fraction_retrieved_activity", "note"] == evaluate.NOTE_NO_REPLICATES
    assert np.isnan(summary.loc["map_interpolated", "value"])
    assert summary.loc["map_interpolated", "note"] == evaluate.NOTE_NO_MOA_OF_THREE
    for metric in ("map_ap", "map_consistency", "recall_top1pct"):
        assert np.isfinite(summary.loc[metric, "value"]) and summary.loc[metric, "note"] == "", metric

    # No MoA labels at all: every MoA metric says so; activity is still computed.
    wells["Metadata_moa"] = ""
    wells = pd.concat([wells, wells.iloc[:4].assign(Metadata_Well=lambda d: d["Metadata_Well"] + "b")])
    folder = tmp_path / "profiles" / "unlabelled"
    folder.mkdir(parents=True)
    wells.to_parquet(folder / "selected.parquet", index=False)
    profiles.consensus_profiles(wells, features, "median").to_parquet(
        folder / "consensus.parquet", index=False
    )
    evaluate.evaluate_profiles(folder, tmp_path / "eval" / "unlabelled", null_size=200)
    summary = evaluate.summarize_set(tmp_path / "eval" / "unlabelled").set_index("metric")
    assert np.isfinite(summary.loc["map_activity", "value"]) and summary.loc["map_activity", "note"] == ""
    for metric in ("map_ap", "map_interpolated", "foe_top1_mean", "recall_top10pct", "map_consistency"):
        assert np.isnan(summary.loc[metric, "value"]), metric
        assert summary.loc[metric, "note"] == evaluate.NOTE_FEW_ANNOTATED, metric


# ----------------------------------------------------------------------------- the demo


@pytest.mark.slow
def test_demo_classic_features_find_lonafarnib_active(repo_root, tmp_path):
    """With the shipped demo config, classic features retrieve lonafarnib (which halves the cell
    count) as phenotypically active: BH-corrected copairs p < 0.05.

    The demo plates have 2 DMSO wells each; per-plate robust z-scores against them hid lonafarnib
    (BH p ~0.6).  The default scope pools the 10 DMSO wells of the 5 plates (DESIGN.md §5).
    """
    import os
    import subprocess
    import sys

    from phenoprofiler_core.config import load_config

    bin_dir = str(Path(sys.executable).parent)
    results = tmp_path / "results"
    target = results / "demo" / "profiles" / "classic" / "consensus.parquet"
    run = subprocess.run(
        [f"{bin_dir}/snakemake", "--cores", "2", "--configfile", "config/demo.yaml"]
        + ["--config", f"results={results}", "--", str(target)],
        cwd=repo_root,
        env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    plan = json.loads((target.parent / "normalization.json").read_text())
    assert plan["scope"] == "pooled" and set(plan["controls_per_plate"].values()) == {2}

    config = load_config(repo_root / "config" / "demo.yaml")
    settings = dict(
        null_size=config["evaluate"]["null_size"],
        threshold=config["evaluate"]["threshold"],
        seed=config["seed"],
        same_plate_negcon=config["evaluate"]["same_plate_negcon"],
    )
    paths = evaluate.evaluate_profiles(target.parent, tmp_path / "eval" / "classic", **settings)
    activity = pd.read_parquet(paths["map_activity"]).set_index("Metadata_Treatment")
    columns = ["n_wells", "mean_average_precision", "p_value", "corrected_p_value"]
    print("pooled controls (shipped default):\n", activity[columns].round(4).to_string())
    assert activity.loc["lonafarnib", "corrected_p_value"] < 0.05
    assert activity.loc["lonafarnib", "below_corrected_p"]

    # The same wells normalized per plate against their 2 DMSO wells: lonafarnib is lost.
    wells = pd.read_parquet(target.parent / "well.parquet")
    features = profiles.feature_columns(wells)
    profiles.profile_steps(
        wells.astype({f: np.float64 for f in features}), features, tmp_path / "plate", normalize_scope="plate"
    )
    per_plate = evaluate.evaluate_profiles(tmp_path / "plate", tmp_path / "eval" / "plate", **settings)
    per_plate = pd.read_parquet(per_plate["map_activity"]).set_index("Metadata_Treatment")
    print("per-plate controls (the old default):\n", per_plate[columns].round(4).to_string())
    assert per_plate.loc["lonafarnib", "corrected_p_value"] > activity.loc["lonafarnib", "corrected_p_value"]
