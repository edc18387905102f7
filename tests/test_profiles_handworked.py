"""Profile steps against numbers worked out on paper: phenotype correction, aggregation,
normalization per plate / pooled / per batch, feature selection, consensus.

Definitions used for the expected values: phenotype correction x - alpha * mean(plate's control
sites); standardize = (x - mean) / population std of the controls (scikit-learn's StandardScaler,
which pycytominer uses); mad_robustize = (x - median) / (1.4826 * MAD + epsilon) of the controls
(pycytominer's RobustMAD).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenoprofiler_core import profiles
from phenoprofiler_core.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- sites -> wells


def site_rows(rows) -> pd.DataFrame:
    """rows: (plate, well, site, treatment, pert_type, moa, f, g)."""
    df = pd.DataFrame(
        rows,
        columns=[
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Site",
            "Metadata_Treatment",
            "Metadata_pert_type",
            "Metadata_moa",
            "f",
            "g",
        ],
    )
    df.insert(3, "Metadata_TreatmentId", df["Metadata_Treatment"].str.lower())
    return df


def test_phenotype_correction_by_hand():
    sites = site_rows(
        [
            # P1: control sites f = 2, 4 (mean 3); g has one NaN control (nanmean 8)
            ("P1", "A01", 1, "DMSO", "negcon", "", 2.0, np.nan),
            ("P1", "A01", 2, "DMSO", "negcon", "", 4.0, 8.0),
            ("P1", "B01", 1, "drug", "trt", "m", 10.0, 20.0),
            # P2: control f = 6; g all NaN on the controls -> nothing subtracted
            ("P2", "A01", 1, "DMSO", "negcon", "", 6.0, np.nan),
            ("P2", "B01", 1, "drug", "trt", "m", 10.0, 20.0),
        ]
    )
    out = profiles.correct_phenotype(sites, ["f", "g"], 0.5)
    # P1: f - 1.5, g - 4;  P2: f - 3, g - 0
    np.testing.assert_allclose(out["f"], [0.5, 2.5, 8.5, 3.0, 7.0])
    np.testing.assert_allclose(out["g"], [np.nan, 4.0, 16.0, np.nan, 20.0])
    assert sites["f"].tolist() == [2.0, 4.0, 10.0, 6.0, 10.0]  # the input is left alone
    assert out["Metadata_Well"].tolist() == sites["Metadata_Well"].tolist()
    assert profiles.correct_phenotype(sites, ["f", "g"], 0) is sites
    no_controls = sites[sites["Metadata_Plate"] != "P2"].copy()
    no_controls.loc[no_controls["Metadata_Plate"] == "P1", "Metadata_pert_type"] = "trt"
    with pytest.raises(
        DataError, match=r"phenotype correction: plate\(s\) \['P1'\] have no negative-control"
    ):
        profiles.correct_phenotype(no_controls, ["f", "g"], 0.5)


def well_sites() -> pd.DataFrame:
    sites = site_rows(
        [
            ("P2", "A01", 1, "DMSO", "negcon", "", 1.0, 0.0),
            ("P1", "B01", 1, "drug", "trt", "m", 1.0, 5.0),
            ("P1", "B01", 2, "drug", "trt", "m", 2.0, 6.0),
            ("P1", "B01", 3, "drug", "trt", "m", 10.0, 7.0),
            ("P1", "A01", 1, "DMSO", "negcon", "", 4.0, 1.0),
        ]
    )
    sites["Metadata_Time"] = [0, 1, 2, 3, 4]  # differs between a well's sites: dropped
    sites["Metadata_Dose"] = [0.0, 1.0, 1.0, 1.0, 0.0]  # constant in each well: kept
    return sites


def test_aggregate_wells_by_hand():
    sites = well_sites()
    wells = profiles.aggregate_wells(sites, ["f", "g"], "median")
    assert list(zip(wells["Metadata_Plate"], wells["Metadata_Well"])) == [
        ("P1", "A01"),
        ("P1", "B01"),
        ("P2", "A01"),
    ]
    # P1 B01: f = 1, 2, 10 -> median 2, g = 5, 6, 7 -> 6
    np.testing.assert_allclose(wells[["f", "g"]], [[4.0, 1.0], [2.0, 6.0], [1.0, 0.0]])
    assert wells["Metadata_n_sites"].tolist() == [1, 3, 1]
    assert wells["Metadata_Dose"].tolist() == [0.0, 1.0, 0.0]
    assert "Metadata_Time" not in wells.columns and "Metadata_Site" not in wells.columns
    assert wells["Metadata_Treatment"].tolist() == ["DMSO", "drug", "DMSO"]
    mean = profiles.aggregate_wells(sites, ["f", "g"], "mean")
    np.testing.assert_allclose(mean.loc[1, ["f", "g"]].to_numpy(float), [13 / 3, 6.0])
    with pytest.raises(ConfigError, match="'mode' is not one of"):
        profiles.aggregate_wells(sites, ["f", "g"], "mode")


def test_one_site_per_well_still_drops_the_site_number():
    # with one site per well Metadata_Site is constant within every well, but it describes a site
    sites = well_sites().drop(index=[2, 3])
    wells = profiles.aggregate_wells(sites, ["f", "g"])
    assert "Metadata_Site" not in wells.columns and wells["Metadata_n_sites"].tolist() == [1, 1, 1]


def test_a_well_with_two_pert_types_is_an_error_naming_it():
    sites = well_sites()
    sites.loc[2, "Metadata_pert_type"] = "negcon"
    with pytest.raises(
        DataError, match=r"well \{'Metadata_Plate': 'P1', 'Metadata_Well': 'B01'\} .*Metadata_pert_type"
    ):
        profiles.aggregate_wells(sites, ["f", "g"])


def test_controls_per_plate_and_group_counts():
    wells = pd.DataFrame(
        {
            "Metadata_Plate": ["P2", "P1", "P1", "P2", "P3"],
            "Metadata_pert_type": ["negcon", "negcon", "negcon", "trt", "trt"],
            "Metadata_Batch": ["b", "a", "b", "a", "a"],
        }
    )
    assert profiles.controls_per_plate(wells) == {"P1": 2, "P2": 1, "P3": 0}
    assert profiles._controls_per_group(wells, "Metadata_Batch") == {"a": 1, "b": 2}
    assert profiles._few({"a": 1, "b": 2, "c": 3}, 2) == {"a": 1}  # strictly fewer


def test_normalization_groups():
    wells = pd.DataFrame({"Metadata_Plate": ["P2", "P1", "P2"], "Metadata_Batch": [7, 7, 8]})
    (label, rows), *rest = profiles._normalization_groups(wells, "pooled", None)
    assert label == "all plates" and rows.tolist() == [0, 1, 2] and not rest
    groups = profiles._normalization_groups(wells, "plate", None)
    assert [(label, rows.tolist()) for label, rows in groups] == [("plate P1", [1]), ("plate P2", [0, 2])]
    groups = profiles._normalization_groups(wells, "batch", "Metadata_Batch")
    assert [(label, rows.tolist()) for label, rows in groups] == [
        ("Metadata_Batch 7", [0, 1]),
        ("Metadata_Batch 8", [2]),
    ]


# ----------------------------------------------------------------------------- normalization


def norm_wells() -> pd.DataFrame:
    """Two plates, rows interleaved: P1 controls f = 1, 3 (mean 2, std 1; median 2, MAD 1),
    P2 controls f = 11, 13 (mean 12, std 1), a treatment of f = 5 on each plate."""
    rows = [
        ("P1", "A01", "negcon", 1.0, "x"),
        ("P2", "A01", "negcon", 11.0, "x"),
        ("P1", "A02", "negcon", 3.0, "y"),
        ("P2", "A02", "negcon", 13.0, "y"),
        ("P1", "B01", "trt", 5.0, "x"),
        ("P2", "B01", "trt", 5.0, "y"),
    ]
    df = pd.DataFrame(
        rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_pert_type", "f", "Metadata_Batch"]
    )
    df["g"] = 2 * df["f"]
    return df[["Metadata_Plate", "Metadata_Well", "Metadata_pert_type", "Metadata_Batch", "f", "g"]]


def test_standardize_per_plate_by_hand():
    out = profiles.normalize_profiles(norm_wells(), ["f", "g"], "standardize", scope="plate")
    assert list(out.columns) == list(norm_wells().columns)  # no extra column (it would count as a feature)
    # P1: (x - 2)/1; P2: (x - 12)/1; g = 2f gives the same z-scores
    expected = [-1.0, -1.0, 1.0, 1.0, 3.0, -7.0]
    np.testing.assert_allclose(out["f"], expected, atol=1e-12)
    np.testing.assert_allclose(out["g"], expected, atol=1e-12)
    assert out["Metadata_Well"].tolist() == ["A01", "A01", "A02", "A02", "B01", "B01"]  # input order
    assert out["Metadata_Plate"].tolist() == ["P1", "P2", "P1", "P2", "P1", "P2"]


def test_standardize_pooled_by_hand():
    out = profiles.normalize_profiles(norm_wells(), ["f", "g"], "standardize", scope="pooled")
    assert list(out.columns) == list(norm_wells().columns)  # no extra column (it would count as a feature)
    # controls 1, 11, 3, 13: mean 7, population std sqrt((36 + 16 + 16 + 36)/4) = sqrt(26)
    s = np.sqrt(26)
    np.testing.assert_allclose(out["f"], np.array([-6, 4, -4, 6, -2, -2]) / s, atol=1e-12)


def test_standardize_per_batch_by_hand():
    out = profiles.normalize_profiles(
        norm_wells(), ["f", "g"], "standardize", scope="batch", batch_column="Metadata_Batch"
    )
    # batch x: controls 1, 11 (rows 0, 1; mean 6, std 5) and P1 B01 (5);
    # batch y: controls 3, 13 (rows 2, 3; mean 8, std 5) and P2 B01 (5)
    np.testing.assert_allclose(out["f"], [-1.0, 1.0, -1.0, 1.0, -0.2, -0.6], atol=1e-12)


def test_auto_scope_follows_the_plan():
    # 2 controls per plate: fewer than the default 16 -> pooled; with a minimum of 2 -> per plate.
    wells = norm_wells()
    pooled = profiles.normalize_profiles(wells, ["f", "g"], "standardize", scope="auto")
    np.testing.assert_allclose(pooled["f"], np.array([-6, 4, -4, 6, -2, -2]) / np.sqrt(26), atol=1e-12)
    per_plate = profiles.normalize_profiles(
        wells, ["f", "g"], "standardize", scope="auto", min_controls_per_plate=2
    )
    np.testing.assert_allclose(per_plate["f"], [-1.0, -1.0, 1.0, 1.0, 3.0, -7.0], atol=1e-12)
    # per batch when plates are short but batches are not: a third plate with one control per batch
    wells.loc[len(wells)] = ["P3", "A01", "negcon", "x", 21.0, 42.0]
    wells.loc[len(wells)] = ["P3", "A02", "negcon", "y", 23.0, 46.0]
    by_batch = profiles.normalize_profiles(
        wells, ["f"], "standardize", scope="auto", batch_column="Metadata_Batch", min_controls_per_plate=3
    )
    # every plate has 2 controls (< 3), every batch 3: batch x controls 1, 11, 21 (mean 11), batch y
    # 3, 13, 23 (mean 13), both with population std sqrt(200/3)
    s = np.sqrt(200 / 3)
    expected = (np.array([1, 11, 3, 13, 5, 5, 21, 23]) - np.array([11, 11, 13, 13, 11, 13, 11, 13])) / s
    np.testing.assert_allclose(by_batch["f"], expected, atol=1e-12)


def test_mad_robustize_per_plate_by_hand():
    wells = norm_wells()
    wells.loc[len(wells)] = ["P1", "A03", "negcon", "x", 2.0, 4.0]  # P1 controls 1, 3, 2: median 2, MAD 1
    out = profiles.normalize_profiles(wells, ["f", "g"], "mad_robustize", scope="plate")
    scale = 1.4826  # P1: MAD 1 -> 1.4826;  P2: controls 11, 13: median 12, MAD 1 -> 1.4826
    np.testing.assert_allclose(out["f"], np.array([-1, -1, 1, 1, 3, -7, 0]) / scale, rtol=1e-9)


def test_mad_epsilon_reaches_pycytominer():
    # controls all equal: MAD 0, so the scale is epsilon alone: (5 - 2) / (0 + 0.5) = 6
    wells = norm_wells()
    wells.loc[wells["Metadata_pert_type"] == "negcon", "f"] = 2.0
    out = profiles.normalize_profiles(wells, ["f"], "mad_robustize", scope="pooled", mad_epsilon=0.5)
    np.testing.assert_allclose(out["f"], [0, 0, 0, 0, 6.0, 6.0], atol=1e-12)


def test_normalization_none_and_bad_scopes():
    wells = norm_wells()
    for method, scope in (("none", "plate"), ("standardize", "none")):
        out = profiles.normalize_profiles(wells, ["f", "g"], method, scope=scope)
        assert out.equals(wells) and out is not wells
    with pytest.raises(ConfigError, match=r"profiles\.normalize: 'zscore' is not one of"):
        profiles.normalize_profiles(wells, ["f"], "zscore", scope="plate")
    with pytest.raises(ConfigError, match=r"profiles\.normalize_scope: 'well' is not one of"):
        profiles.normalize_profiles(wells, ["f"], "standardize", scope="well")
    with pytest.raises(DataError, match="batch column 'Metadata_Lot' is not in the well profiles"):
        profiles.normalize_profiles(wells, ["f"], "standardize", scope="batch", batch_column="Metadata_Lot")
    with pytest.raises(DataError, match="batch column None"):
        profiles.normalize_profiles(wells, ["f"], "standardize", scope="batch")
    with pytest.raises(ConfigError, match=r"profiles\.spherize_method: 'XYZ'"):
        profiles.normalize_profiles(wells, ["f"], "spherize", scope="pooled", spherize_method="XYZ")
    no_p2_controls = wells[~((wells["Metadata_Plate"] == "P2") & (wells["Metadata_pert_type"] == "negcon"))]
    with pytest.raises(DataError, match=r"scope plate\): plate P2 have no negative-control"):
        profiles.normalize_profiles(no_p2_controls, ["f"], "standardize", scope="plate")


# ----------------------------------------------------------------------------- selection, consensus


def test_select_features_drops_what_stays_non_finite():
    n = 40
    rng = np.random.default_rng(0)
    wells = pd.DataFrame({"Metadata_Plate": ["P1"] * n, "Metadata_Well": [f"W{k}" for k in range(n)]})
    wells["a"] = rng.standard_normal(n)
    wells["one_nan"] = rng.standard_normal(n)
    wells.loc[3, "one_nan"] = np.nan  # 1/40 = 2.5% NaN: kept by drop_na_columns (cutoff 5%)
    wells["inf"] = rng.standard_normal(n)
    wells.loc[5, "inf"] = np.inf
    wells["b"] = rng.standard_normal(n)
    selected, kept = profiles.select_features(wells, ["a", "one_nan", "inf", "b"], ["drop_na_columns"])
    assert kept == ["a", "b"]
    assert list(selected.columns) == ["Metadata_Plate", "Metadata_Well", "a", "b"]
    # no operation: nothing from pycytominer, but non-finite features still go
    selected, kept = profiles.select_features(wells, ["b", "inf", "a"], [])
    assert kept == ["b", "a"]
    with pytest.raises(DataError, match=r"left no features out of 1"):
        profiles.select_features(wells, ["inf"], [])


def test_consensus_by_hand():
    wells = pd.DataFrame(
        {
            "Metadata_TreatmentId": ["b", "a", "b", "a", "b"],
            "Metadata_Treatment": ["B", "A", "B", "A", "B"],
            "Metadata_pert_type": ["trt"] * 5,
            "Metadata_moa": ["m", "n", "m", "n", "m"],
            "Metadata_Plate": ["P1", "P1", "P2", "P2", "P3"],
            "f": [1.0, 4.0, 7.0, 6.0, 2.0],
        }
    )
    median = profiles.consensus_profiles(wells, ["f"], "median").set_index("Metadata_TreatmentId")
    # a: 4, 6 -> 5;  b: 1, 7, 2 -> 2
    assert median.loc["a", "f"] == 5.0 and median.loc["b", "f"] == 2.0
    assert median.loc["a", "Metadata_n_wells"] == 2 and median.loc["b", "Metadata_n_wells"] == 3
    assert median.loc["b", "Metadata_moa"] == "m"
    assert list(median.reset_index().columns) == [
        "Metadata_TreatmentId",
        "Metadata_Treatment",
        "Metadata_pert_type",
        "Metadata_moa",
        "Metadata_n_wells",
        "f",
    ]
    mean = profiles.consensus_profiles(wells, ["f"], "mean").set_index("Metadata_TreatmentId")
    assert mean.loc["b", "f"] == pytest.approx(10 / 3)
    with pytest.raises(ConfigError, match=r"profiles\.consensus: 'max'"):
        profiles.consensus_profiles(wells, ["f"], "max")
    wells.loc[4, "Metadata_moa"] = "other"
    with pytest.raises(DataError, match="treatment id 'b' has wells with different"):
        profiles.consensus_profiles(wells, ["f"], "median")


def test_step_defaults_are_the_documented_ones_and_pycytominers():
    # The defaults of the profile steps are the config schema's (config/README.md), which are
    # pycytominer's own defaults: three independent places that must agree.
    import inspect
    import warnings
    from pathlib import Path

    import yaml

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pycytominer

    ours = {k: v.default for k, v in inspect.signature(profiles.select_features).parameters.items()}
    theirs = {k: v.default for k, v in inspect.signature(pycytominer.feature_select).parameters.items()}
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    documented = schema["properties"]["profiles"]["properties"]
    for key in ("na_cutoff", "corr_threshold", "min_variance", "freq_cut", "unique_cut", "outlier_cutoff"):
        assert ours[key] == theirs[key] == documented[key]["default"], key
    ours = {k: v.default for k, v in inspect.signature(profiles.normalize_profiles).parameters.items()}
    theirs = {k: v.default for k, v in inspect.signature(pycytominer.normalize).parameters.items()}
    assert ours["mad_epsilon"] == theirs["mad_robustize_epsilon"] == 1e-18
    assert ours["spherize_method"] == theirs["spherize_method"] == "ZCA-cor"
    assert ours["spherize_epsilon"] == theirs["spherize_epsilon"] == 1e-6
    assert ours["method"] == "mad_robustize"  # DESIGN.md §5: robust z-scores against the controls
    assert inspect.signature(profiles.consensus_profiles).parameters["operation"].default == "median"
    assert inspect.signature(profiles.aggregate_wells).parameters["operation"].default == "median"


def test_selection_thresholds_reach_pycytominer():
    n = 40
    rng = np.random.default_rng(1)
    base = rng.standard_normal(n)
    wells = pd.DataFrame({"Metadata_Plate": ["P1"] * n, "Metadata_Well": [f"W{k}" for k in range(n)]})
    wells["a"] = base
    wells["near_a"] = base + 0.5 * rng.standard_normal(n)  # correlation about 0.9: kept at 0.99, not at 0.5
    wells["other"] = rng.standard_normal(n)
    wells["spike"] = rng.standard_normal(n)
    wells.loc[7, "spike"] = 50.0  # above an outlier cutoff of 10, far below the default 500
    features = ["a", "near_a", "other", "spike"]
    _, kept = profiles.select_features(
        wells, features, ["drop_na_columns", "correlation_threshold"], corr_threshold=0.99
    )
    assert kept == features
    _, kept = profiles.select_features(
        wells, features, ["drop_na_columns", "correlation_threshold"], corr_threshold=0.5
    )
    assert ("a" in kept) != ("near_a" in kept) and {"other", "spike"} <= set(kept)
    _, kept = profiles.select_features(wells, features, ["drop_na_columns", "drop_outliers"])
    assert kept == features
    _, kept = profiles.select_features(
        wells, features, ["drop_na_columns", "drop_outliers"], outlier_cutoff=10.0
    )
    assert kept == ["a", "near_a", "other"]
    # (na_cutoff cannot be seen from outside: a feature left with any NaN is dropped after selection)


def test_variance_and_frequency_thresholds_use_their_own_keys():
    # pycytominer 1.7: variance_threshold reads only min_variance; freq_cut/unique_cut belong to
    # frequency_threshold (they used to be documented here as variance_threshold settings and did nothing).
    n = 40
    wells = pd.DataFrame({"Metadata_Plate": ["P1"] * n, "Metadata_Well": [f"W{k}" for k in range(n)]})
    wells["tiny"] = np.tile([0.0, 0.02], n // 2)  # variance 1e-4 (population; sample 1.03e-4)
    wells["rare"] = [1.0, 1.0] + [0.0] * (n - 2)  # 2nd/1st most common 2/38 = 0.053; unique 2/40 = 0.05
    wells["spread"] = np.arange(n, dtype=float)  # variance ~137, 40 unique values
    features = ["tiny", "rare", "spread"]
    ops = ["drop_na_columns", "variance_threshold"]
    assert profiles.select_features(wells, features, ops)[1] == features  # default 1e-6 < 1e-4
    assert profiles.select_features(wells, features, ops, min_variance=1e-3)[1] == ["rare", "spread"]
    ops = ["drop_na_columns", "frequency_threshold"]
    # defaults 0.05 / 0.01: rare's frequency ratio 0.053 is not below 0.05 -> kept
    assert profiles.select_features(wells, features, ops)[1] == features
    # pycytominer drops a feature when EITHER ratio is below its cut:
    # freq_cut 0.1 -> rare (0.053) goes; tiny (20/20 = 1) and spread (1/1) stay
    assert profiles.select_features(wells, features, ops, freq_cut=0.1)[1] == ["tiny", "spread"]
    # unique_cut 0.1 -> tiny and rare (2 values / 40 wells = 0.05) go; spread (40/40) stays
    assert profiles.select_features(wells, features, ops, unique_cut=0.1)[1] == ["spread"]


def test_consensus_checks_every_treatment_column():
    wells = pd.DataFrame(
        {
            "Metadata_TreatmentId": ["a", "a"],
            "Metadata_Treatment": ["A", "A"],
            "Metadata_pert_type": ["trt", "trt"],
            "Metadata_moa": ["m", "m"],
            "f": [1.0, 3.0],
        }
    )
    assert profiles.consensus_profiles(wells, ["f"]).loc[0, "f"] == 2.0  # median of 1, 3 (default)
    for column, other in (
        ("Metadata_Treatment", "B"),
        ("Metadata_pert_type", "negcon"),
        ("Metadata_moa", None),
    ):
        bad = wells.copy()
        bad.loc[1, column] = other  # a missing MoA on one well counts as a different value too
        with pytest.raises(DataError, match=r"^treatment id 'a' has wells with different"):
            profiles.consensus_profiles(bad, ["f"])


def test_group_counts_come_in_sorted_order():
    wells = pd.DataFrame(
        {"Metadata_Plate": ["P3", "P1", "P2"], "Metadata_pert_type": ["negcon"] * 3, "B": ["z", "x", "y"]}
    )
    assert list(profiles.controls_per_plate(wells)) == ["P1", "P2", "P3"]
    assert list(profiles._controls_per_group(wells, "B")) == ["x", "y", "z"]


def test_auto_scope_spheres_on_the_pooled_controls():
    # Sphering estimates a covariance matrix: 'auto' fits it on all plates' controls together even
    # when every plate has enough controls for a per-plate robust z-score (normalization_plan).
    rng = np.random.default_rng(3)
    rows = [(p, f"C{k}", "negcon") for p in ("P1", "P2") for k in range(6)] + [
        ("P1", "T1", "trt"),
        ("P2", "T1", "trt"),
    ]
    wells = pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_pert_type"])
    wells[["f", "g"]] = rng.standard_normal((len(wells), 2)) + np.where(
        wells[["Metadata_Plate"]] == "P2", 3.0, 0.0
    )
    auto = profiles.normalize_profiles(wells, ["f", "g"], "spherize", scope="auto", min_controls_per_plate=2)
    pooled = profiles.normalize_profiles(wells, ["f", "g"], "spherize", scope="pooled")
    per_plate = profiles.normalize_profiles(wells, ["f", "g"], "spherize", scope="plate")
    pd.testing.assert_frame_equal(auto, pooled)
    assert not np.allclose(
        auto[profiles.feature_columns(auto)], per_plate[profiles.feature_columns(per_plate)]
    )
