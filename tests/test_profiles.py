"""Profiles stage: phenotype correction, pycytominer aggregate/normalize/feature_select/consensus."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from phenoprofiler_core import cli, profiles
from phenoprofiler_core.errors import ConfigError, DataError

TREATMENTS = [("DMSO", "negcon", "")] * 4 + [
    ("cpdA", "trt", "a"),
    ("cpdB", "trt", "a|b"),
    ("cpdC", "trt", "b"),
    ("cpdD", "trt", "c"),
]


def make_sites(plates=("P0", "P1"), sites_per_well=2, n_features=6, seed=0, treatments=TREATMENTS):
    rng = np.random.default_rng(seed)
    rows = []
    for plate in plates:
        for w, (name, pert_type, moa) in enumerate(treatments):
            for s in range(sites_per_well):
                rows.append(
                    dict(
                        Metadata_Plate=plate,
                        Metadata_Well=f"A{w + 1:02d}",
                        Metadata_Site=s + 1,
                        Metadata_Treatment=name,
                        Metadata_TreatmentId=name.lower(),
                        Metadata_pert_type=pert_type,
                        Metadata_moa=moa,
                    )
                )
    df = pd.DataFrame(rows)
    values = rng.standard_normal((len(df), n_features)).astype(np.float32)
    for j in range(n_features):
        df[f"emb_{j}"] = values[:, j]
    return df


def write_plates(df, folder):
    paths = []
    for plate, part in df.groupby("Metadata_Plate"):
        path = folder / f"{plate}.parquet"
        part.to_parquet(path, index=False)
        paths.append(path)
    return paths


def test_phenotype_correction_subtracts_alpha_times_plate_negcon_mean():
    sites = make_sites()
    features = profiles.feature_columns(sites)
    corrected = profiles.correct_phenotype(sites, features, 0.7)
    for plate in ("P0", "P1"):
        on_plate = sites["Metadata_Plate"] == plate
        control_mean = sites.loc[on_plate & (sites["Metadata_pert_type"] == "negcon"), features].mean()
        expected = sites.loc[on_plate, features] - 0.7 * control_mean
        np.testing.assert_allclose(corrected.loc[on_plate, features], expected, rtol=1e-6, atol=1e-6)
    # With alpha = 1 the controls of each plate average to zero.
    full = profiles.correct_phenotype(sites, features, 1.0)
    control_means = full[full["Metadata_pert_type"] == "negcon"].groupby("Metadata_Plate")[features].mean()
    np.testing.assert_allclose(control_means.to_numpy(), 0, atol=1e-6)
    assert profiles.correct_phenotype(sites, features, 0.0) is sites


def test_plate_without_negcon_is_an_error_naming_the_plate():
    sites = make_sites()
    sites = sites[~((sites["Metadata_Plate"] == "P1") & (sites["Metadata_pert_type"] == "negcon"))]
    features = profiles.feature_columns(sites)
    with pytest.raises(DataError, match="P1"):
        profiles.correct_phenotype(sites, features, 0.7)
    wells = profiles.aggregate_wells(sites, features)
    with pytest.raises(DataError, match="P1"):
        profiles.normalize_profiles(wells, features, "mad_robustize")


def test_aggregate_takes_the_median_of_sites_and_keeps_well_metadata():
    sites = make_sites(sites_per_well=3)
    features = profiles.feature_columns(sites)
    wells = profiles.aggregate_wells(sites, features, "median")
    assert len(wells) == 16
    one = sites[(sites["Metadata_Plate"] == "P1") & (sites["Metadata_Well"] == "A06")]
    row = wells[(wells["Metadata_Plate"] == "P1") & (wells["Metadata_Well"] == "A06")].iloc[0]
    np.testing.assert_allclose(
        row[features].to_numpy(dtype=float), np.median(one[features].to_numpy(), axis=0), rtol=1e-6
    )
    assert (
        row["Metadata_Treatment"] == "cpdB" and row["Metadata_moa"] == "a|b" and row["Metadata_n_sites"] == 3
    )
    mean_wells = profiles.aggregate_wells(sites, features, "mean")
    row = mean_wells[(mean_wells["Metadata_Plate"] == "P1") & (mean_wells["Metadata_Well"] == "A06")].iloc[0]
    np.testing.assert_allclose(
        row[features].to_numpy(dtype=float), one[features].mean().to_numpy(), rtol=1e-6
    )


def test_well_with_two_treatments_is_an_error():
    sites = make_sites()
    sites.loc[0, "Metadata_Treatment"] = "other"
    with pytest.raises(DataError, match="Metadata_Treatment"):
        profiles.aggregate_wells(sites, profiles.feature_columns(sites))


@pytest.mark.parametrize("method", ["mad_robustize", "standardize"])
def test_per_plate_normalization_against_controls_removes_plate_effects(method):
    base = make_sites(plates=("P0",), seed=3)
    shifted = base.copy()
    shifted["Metadata_Plate"] = "P1"
    features = profiles.feature_columns(base)
    shifted[features] = shifted[features] * 3 + 5  # a plate effect: scale and offset
    sites = pd.concat([base, shifted], ignore_index=True)
    wells = profiles.aggregate_wells(sites, features)
    normalized = profiles.normalize_profiles(wells, features, method)
    p0 = normalized[normalized["Metadata_Plate"] == "P0"][features].to_numpy()
    p1 = normalized[normalized["Metadata_Plate"] == "P1"][features].to_numpy()
    np.testing.assert_allclose(p0, p1, rtol=1e-5, atol=1e-5)
    controls = normalized[normalized["Metadata_pert_type"] == "negcon"]
    centre = (
        controls.groupby("Metadata_Plate")[features].median()
        if method == "mad_robustize"
        else controls.groupby("Metadata_Plate")[features].mean()
    )
    np.testing.assert_allclose(centre.to_numpy(), 0, atol=1e-6)


def test_spherize_is_fit_on_controls_only():
    # 40 control wells, 5 features: enough to whiten; treatments must not influence the transform.
    treatments = [("DMSO", "negcon", "")] * 40 + [("cpdA", "trt", "a"), ("cpdB", "trt", "b")]
    sites = make_sites(plates=("P0",), sites_per_well=1, n_features=5, treatments=treatments, seed=4)
    features = profiles.feature_columns(sites)
    wells = profiles.aggregate_wells(sites, features)
    sphered = profiles.normalize_profiles(
        wells, features, "spherize", spherize_method="ZCA", spherize_epsilon=1e-9
    )
    controls = sphered[sphered["Metadata_pert_type"] == "negcon"][features].to_numpy()
    np.testing.assert_allclose(np.cov(controls, rowvar=False), np.eye(5), atol=1e-3)
    moved = wells.copy()
    moved.loc[moved["Metadata_pert_type"] == "trt", features] += 100.0
    sphered_moved = profiles.normalize_profiles(
        moved, features, "spherize", spherize_method="ZCA", spherize_epsilon=1e-9
    )
    np.testing.assert_allclose(
        sphered_moved[sphered_moved["Metadata_pert_type"] == "negcon"][features].to_numpy(),
        controls,
        atol=1e-8,
    )


def test_feature_selection_drops_na_constant_and_correlated_features():
    sites = make_sites(sites_per_well=1, n_features=5, seed=5)
    sites["emb_const"] = 1.0
    sites["emb_copy"] = sites["emb_0"] * 2 + 1
    sites["emb_mostly_na"] = np.where(np.arange(len(sites)) % 2 == 0, np.nan, 1.0)
    features = profiles.feature_columns(sites)
    wells = profiles.aggregate_wells(sites, features)
    selected, kept = profiles.select_features(
        wells, features, ["drop_na_columns", "variance_threshold", "correlation_threshold"]
    )
    assert "emb_mostly_na" not in kept and "emb_const" not in kept
    assert ("emb_copy" in kept) != ("emb_0" in kept)  # one of the perfectly correlated pair survives
    assert {"emb_1", "emb_2", "emb_3", "emb_4"} <= set(kept)
    assert set(profiles.feature_columns(selected)) == set(kept)
    with pytest.raises(ConfigError, match="drop_na_columns"):
        profiles.select_features(wells, features, ["variance_threshold", "drop_na_columns"])
    with pytest.raises(ConfigError, match="unknown"):
        profiles.select_features(wells, features, ["drop_na_columns", "nonsense"])


def test_consensus_is_the_median_over_wells_of_a_treatment():
    sites = make_sites(sites_per_well=1, plates=("P0", "P1", "P2"))
    features = profiles.feature_columns(sites)
    wells = profiles.aggregate_wells(sites, features)
    consensus = profiles.consensus_profiles(wells, features, "median")
    assert sorted(consensus["Metadata_TreatmentId"]) == ["cpda", "cpdb", "cpdc", "cpdd", "dmso"]
    cpdc = wells[wells["Metadata_TreatmentId"] == "cpdc"][features].to_numpy()
    row = consensus[consensus["Metadata_TreatmentId"] == "cpdc"].iloc[0]
    np.testing.assert_allclose(row[features].to_numpy(dtype=float), np.median(cpdc, axis=0), rtol=1e-6)
    assert row["Metadata_n_wells"] == 3
    assert consensus.loc[consensus["Metadata_TreatmentId"] == "dmso", "Metadata_n_wells"].item() == 12


def test_cli_writes_the_four_steps(tmp_path):
    sites = make_sites(n_features=8)
    paths = write_plates(sites, tmp_path)
    out = tmp_path / "profiles" / "model"
    argv = [
        "profiles",
        "--features",
        *map(str, paths),
        "--out",
        str(out),
        "--correction-alpha",
        "0.7",
        "--normalize",
        "mad_robustize",
        "--feature-select",
        "drop_na_columns",
        "variance_threshold",
    ]
    assert cli.main(argv) == 0
    tables = {
        name: pd.read_parquet(out / f"{name}.parquet")
        for name in ("well", "normalized", "selected", "consensus")
    }
    assert len(tables["well"]) == len(tables["normalized"]) == len(tables["selected"]) == 16
    assert len(tables["consensus"]) == 5
    for table in tables.values():
        assert all(table[c].dtype == np.float32 for c in profiles.feature_columns(table))
    # The well step already carries the correction: compare with correcting by hand.
    features = profiles.feature_columns(sites)
    expected = profiles.aggregate_wells(
        profiles.correct_phenotype(sites.astype({f: float for f in features}), features, 0.7), features
    )
    np.testing.assert_allclose(
        tables["well"][features].to_numpy(), expected[features].to_numpy(), rtol=1e-5, atol=1e-5
    )


def test_cli_reports_bad_input_naming_the_file(tmp_path, capsys):
    sites = make_sites().drop(columns=["Metadata_pert_type"])
    paths = write_plates(sites, tmp_path)
    assert cli.main(["profiles", "--features", str(paths[0]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Metadata_pert_type" in err and str(paths[0]) in err
    assert not (tmp_path / "out" / "well.parquet").exists()


def test_plates_with_different_features_are_rejected(tmp_path):
    sites = make_sites()
    p0 = sites[sites["Metadata_Plate"] == "P0"]
    p1 = sites[sites["Metadata_Plate"] == "P1"].rename(columns={"emb_0": "other"})
    p0.to_parquet(tmp_path / "P0.parquet")
    p1.to_parquet(tmp_path / "P1.parquet")
    with pytest.raises(DataError, match=r"P1\.parquet"):
        profiles.read_site_features([tmp_path / "P0.parquet", tmp_path / "P1.parquet"])


# ----------------------------------------------------------------------------- normalization scope


def control_wells(counts, treated=2, batches=None):
    """One feature; per plate `counts[plate]` control wells and `treated` treatment wells."""
    rows = []
    for plate, n in counts.items():
        for k in range(n):
            rows.append((plate, f"C{k:02d}", "DMSO", "negcon"))
        for k in range(treated):
            rows.append((plate, f"T{k:02d}", "cpd", "trt"))
    wells = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_TreatmentId", "Metadata_pert_type"]
    )
    wells["Metadata_Treatment"] = wells["Metadata_TreatmentId"]
    wells["Metadata_moa"] = ""
    if batches:
        wells["Metadata_Batch"] = wells["Metadata_Plate"].map(batches)
    wells["f"] = np.arange(len(wells), dtype=float) % 7
    return wells


def test_auto_scope_pools_when_a_plate_has_few_controls():
    wells = control_wells({"P0": 2, "P1": 2, "P2": 20})
    plan = profiles.normalization_plan(wells, method="mad_robustize")
    assert plan["scope"] == "pooled" and plan["batch_column"] is None
    assert plan["controls_per_plate"] == {"P0": 2, "P1": 2, "P2": 20}
    assert plan["min_controls_per_plate"] == profiles.DEFAULT_MIN_CONTROLS_PER_PLATE == 16
    assert "P0 (2)" in plan["reason"] and "P1 (2)" in plan["reason"] and "P2" not in plan["reason"]
    assert plan["warnings"] == []
    assert set(plan) == {
        "method",
        "scope",
        "batch_column",
        "reason",
        "controls_per_plate",
        "min_controls_per_plate",
        "warnings",
    }


def test_auto_scope_is_per_plate_when_every_plate_has_enough_controls():
    wells = control_wells({"P0": 16, "P1": 17})
    assert profiles.normalization_plan(wells)["scope"] == "plate"
    assert profiles.normalization_plan(wells, min_controls_per_plate=17)["scope"] == "pooled"


def test_auto_scope_uses_batches_when_they_have_enough_controls():
    wells = control_wells(
        {"P0": 8, "P1": 8, "P2": 8, "P3": 8}, batches={"P0": "b1", "P1": "b1", "P2": "b2", "P3": "b2"}
    )
    plan = profiles.normalization_plan(wells, batch_column="Metadata_Batch")
    assert plan["scope"] == "batch" and plan["batch_column"] == "Metadata_Batch"
    # one batch short -> pooled, and the short batch is named
    plan = profiles.normalization_plan(wells, batch_column="Metadata_Batch", min_controls_per_plate=17)
    assert plan["scope"] == "pooled" and "b1 (16)" in plan["reason"]


def test_explicit_scope_is_kept_with_a_warning_naming_short_plates():
    wells = control_wells({"P0": 2, "P1": 20})
    plan = profiles.normalization_plan(wells, scope="plate")
    assert plan["scope"] == "plate" and len(plan["warnings"]) == 1 and "P0 (2)" in plan["warnings"][0]
    assert profiles.normalization_plan(wells, method="spherize")["scope"] == "pooled"
    assert profiles.normalization_plan(wells, method="none")["scope"] == "none"
    with pytest.raises(ConfigError, match="batch_column"):
        profiles.normalization_plan(wells, scope="batch")
    with pytest.raises(DataError, match="Metadata_Nope"):
        profiles.normalization_plan(wells, batch_column="Metadata_Nope")


def test_two_control_robust_z_scores_are_degenerate_and_pooled_ones_are_not():
    # One feature.  P0: controls 1, 3, treatment 6.  P1: controls 2, 4, 10, treatment 6.
    # Per plate, P0's median is 2 and its MAD 1: the controls become +-1/1.4826 = +-0.6745 whatever
    # their values (two numbers always sit one MAD from their median).
    # Pooled: controls 1, 3, 2, 4, 10 -> median 3, |deviations| 2, 0, 1, 1, 7 -> MAD 1 -> scale 1.4826;
    # the treatment becomes (6 - 3) / 1.4826 = 2.0235, control 10 becomes 7 / 1.4826 = 4.7214.
    wells = pd.DataFrame(
        {
            "Metadata_Plate": ["P0"] * 3 + ["P1"] * 4,
            "Metadata_Well": ["A1", "A2", "A3", "A1", "A2", "A3", "A4"],
            "Metadata_TreatmentId": ["DMSO", "DMSO", "cpd", "DMSO", "DMSO", "DMSO", "cpd"],
            "Metadata_pert_type": ["negcon", "negcon", "trt", "negcon", "negcon", "negcon", "trt"],
            "f": [1.0, 3.0, 6.0, 2.0, 4.0, 10.0, 6.0],
        }
    )
    per_plate = profiles.normalize_profiles(wells, ["f"], "mad_robustize", scope="plate")
    np.testing.assert_allclose(per_plate["f"][:2], [-0.67449, 0.67449], atol=1e-4)
    pooled = profiles.normalize_profiles(wells, ["f"], "mad_robustize", scope="pooled")
    np.testing.assert_allclose(pooled["f"], np.array([-2, 0, 3, -1, 1, 7, 3]) / 1.4826, rtol=1e-9)
    # batch scope with one batch per plate is the per-plate result
    wells["Metadata_Batch"] = wells["Metadata_Plate"]
    batch = profiles.normalize_profiles(
        wells, ["f"], "mad_robustize", scope="batch", batch_column="Metadata_Batch"
    )
    np.testing.assert_allclose(batch["f"], per_plate["f"])


def test_pooled_scope_fits_on_controls_only_and_allows_a_plate_without_controls():
    wells = control_wells({"P0": 3, "P1": 0})  # P1: treatment wells only
    normalized = profiles.normalize_profiles(wells, ["f"], "standardize", scope="pooled")
    controls = wells.loc[wells["Metadata_pert_type"] == "negcon", "f"]
    expected = (wells["f"] - controls.mean()) / controls.std(ddof=0)
    np.testing.assert_allclose(normalized["f"], expected, rtol=1e-9)
    with pytest.raises(DataError, match="plate P1"):
        profiles.normalize_profiles(wells, ["f"], "standardize", scope="plate")
    # auto refuses a plate without controls (most often a misspelt metadata.negcon); pooled warns
    with pytest.raises(DataError, match=r"P1 \(0\).*normalize_scope: pooled"):
        profiles.normalization_plan(wells)
    plan = profiles.normalization_plan(wells, scope="pooled")
    assert any("P1 (0)" in w for w in plan["warnings"])


def test_build_profiles_writes_normalization_json(tmp_path):
    sites = make_sites(plates=("P0", "P1", "P2"))  # 4 control wells per plate
    paths = write_plates(sites, tmp_path)
    out = profiles.build_profiles(paths, tmp_path / "out", feature_select=["drop_na_columns"])
    plan = json.loads(out["normalization"].read_text())
    assert plan["scope"] == "pooled" and plan["controls_per_plate"] == {"P0": 4, "P1": 4, "P2": 4}
    # the written normalized table is the pooled normalization of the written well table
    wells = pd.read_parquet(out["well"])
    features = profiles.feature_columns(wells)
    expected = profiles.normalize_profiles(wells, features, "mad_robustize", scope="pooled")
    np.testing.assert_allclose(
        pd.read_parquet(out["normalized"])[features], expected[features], rtol=1e-5, atol=1e-5
    )
    out = profiles.build_profiles(
        paths, tmp_path / "plate", normalize_scope="plate", feature_select=["drop_na_columns"]
    )
    plan = json.loads(out["normalization"].read_text())
    assert plan["scope"] == "plate" and len(plan["warnings"]) == 1


def test_wells_are_built_plate_by_plate_as_from_all_sites_at_once(tmp_path):
    sites = make_sites(plates=("P0", "P1", "P2"), sites_per_well=3)
    paths = write_plates(sites, tmp_path)
    wells, features = profiles.well_profiles(paths, correction_alpha=0.7, aggregate="median")
    all_sites, _ = profiles.read_site_features(paths)
    expected = profiles.aggregate_wells(profiles.correct_phenotype(all_sites, features, 0.7), features)
    pd.testing.assert_frame_equal(wells, expected)
    # the same plate twice (two files) is refused, naming the well
    duplicate = tmp_path / "again.parquet"
    sites[sites["Metadata_Plate"] == "P0"].to_parquet(duplicate)
    with pytest.raises(DataError, match="more than one feature file"):
        profiles.well_profiles([*paths, duplicate])


def test_a_failed_run_leaves_none_of_its_outputs(tmp_path):
    sites = make_sites(plates=("P0", "P1"))
    features = profiles.feature_columns(sites)
    sites[features] = 1.0  # constant: variance_threshold drops every feature after well.parquet is written
    paths = write_plates(sites, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="left no"):
        profiles.build_profiles(
            paths, out, normalize="none", feature_select=["drop_na_columns", "variance_threshold"]
        )
    assert not list(out.glob("*.parquet")) and not (out / "normalization.json").exists()
