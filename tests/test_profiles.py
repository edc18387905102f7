"""Profiles stage: phenotype correction, pycytominer aggregate/normalize/feature_select/consensus."""

from __future__ import annotations

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
