"""Evaluation tables against numbers worked out on paper (DESIGN.md §6, copairs' definitions).

Profiles are 2-d unit vectors at chosen angles, so cosine similarity orders neighbours by angular
distance and every rank below is read off a circle.  Expected values come from the definitions:

* AP (copairs): mean over the positives of precision at each positive's rank;
* copairs' normalized AP: (AP - mu0) / (1 - mu0), clipped to [-1, 1], mu0 the expected AP of m
  positives among m + n ranked at random: m = 1, n = 1 -> (1 + 1/2)/2 = 3/4;
  m = 1, n = 2 -> (1 + 1/2 + 1/3)/3 = 11/18;
* p-value of a group's mAP: (#null draws > mAP + 1) / (null_size + 1); an AP null never exceeds 1,
  so a perfect mAP has p = 1 / (null_size + 1) whatever the draws;
* Benjamini-Hochberg: p_(i) * n / i, made monotone from the largest down.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from copairs.map.normalization import expected_ap

from phenoprofiler_core import evaluate

FEATURES = ["f0", "f1"]


def at(degrees: float) -> tuple[float, float]:
    rad = np.deg2rad(degrees)
    return float(np.cos(rad)), float(np.sin(rad))


def wells_table(rows) -> pd.DataFrame:
    """rows: (plate, well, treatment, pert_type, moa, angle in degrees)."""
    df = pd.DataFrame(
        [r[:5] for r in rows],
        columns=[
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_TreatmentId",
            "Metadata_pert_type",
            "Metadata_moa",
        ],
    )
    df["Metadata_Treatment"] = df["Metadata_TreatmentId"].str.upper()
    df[FEATURES] = np.array([at(r[5]) for r in rows])
    return df


# ----------------------------------------------------------------------------- normalized AP


def test_normalized_ap_by_hand():
    # mu0(1 pos, 1 neg) = 3/4, mu0(1 pos, 2 neg) = 11/18 (module docstring).
    ap = np.array([1.0, 0.5, 0.5, 0.875, 0.0, 1.5])
    n_pos = np.array([1, 1, 1, 1, 1, 1])
    n_total = np.array([3, 3, 2, 2, 2, 2])
    got = evaluate._normalized_ap(ap, n_pos, n_total, expected_ap)
    expected = [
        1.0,  # (1 - 11/18) / (7/18)
        -2 / 7,  # (1/2 - 11/18) / (7/18) = (-2/18) / (7/18)
        -1.0,  # (1/2 - 3/4) / (1/4)
        0.5,  # (7/8 - 3/4) / (1/4)
        -1.0,  # (0 - 3/4) / (1/4) = -3, clipped
        1.0,  # (3/2 - 3/4) / (1/4) = 3, clipped
    ]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_normalized_ap_without_negatives_is_zero_for_a_perfect_ap():
    # m positives and no negative: mu0 = 1, AP = 1 -> 0 / max(0, 1e-10) = 0 (no division by zero).
    got = evaluate._normalized_ap(np.array([1.0]), np.array([2]), np.array([2]), expected_ap)
    np.testing.assert_array_equal(got, [0.0])


# ----------------------------------------------------------------------------- p-values


def ap_rows(rows) -> pd.DataFrame:
    """rows: (group, average_precision, n_pos_pairs, n_total_pairs)."""
    return pd.DataFrame(rows, columns=["group", "average_precision", "n_pos_pairs", "n_total_pairs"])


def test_sampled_pvalues_by_hand():
    null_size = 39
    table = ap_rows(
        [
            # group a: two perfect APs of different configurations -> mAP 1, p = 1/40
            ("a", 1.0, 1, 2),
            ("a", 1.0, 1, 3),
            # left out before anything is computed: AP undefined, or no positive pair
            ("a", np.nan, 1, 2),
            ("a", 0.0, 0, 2),
            # group b: mAP 0.25, below every AP of (1 pos among 2), whose null is {1, 1/2}: p = 40/40
            ("b", 0.25, 1, 2),
        ]
    )
    result = evaluate._map_with_pvalues(
        table, "group", null_size=null_size, threshold=0.05, seed=3, null="sampled"
    )
    result = result.set_index("group")
    assert list(result.index) == ["a", "b"]
    assert (result["null"] == "sampled").all()
    np.testing.assert_allclose(result["mean_average_precision"], [1.0, 0.25], rtol=0, atol=1e-12)
    # normalized: a: ((1-3/4)/(1/4) + (1-11/18)/(7/18))/2 = 1; b: (1/4-3/4)/(1/4) = -2 -> -1
    np.testing.assert_allclose(result["mean_normalized_average_precision"], [1.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(result["p_value"], [1 / 40, 1.0], rtol=0, atol=1e-12)
    # BH over 2 tests: 1/40 * 2/1 = 0.05 (exactly the threshold: not below it), 1 * 2/2 = 1
    np.testing.assert_allclose(result["corrected_p_value"], [0.05, 1.0], rtol=0, atol=1e-12)
    assert result["below_p"].tolist() == [True, False]  # 0.025 < 0.05
    assert result["below_corrected_p"].tolist() == [False, False]  # 0.05 is not < 0.05
    # 19 draws: a perfect mAP has p = 1/20 = 0.05 exactly, which is not below 0.05 either
    result = evaluate._map_with_pvalues(table, "group", null_size=19, threshold=0.05, seed=3, null="sampled")
    assert result["p_value"].iloc[0] == 0.05 and not result["below_p"].iloc[0]


def test_groups_come_out_sorted_by_name():
    # like copairs' own null (a sorted groupby): the order of the AP rows does not matter
    table = ap_rows([("b", 0.25, 1, 2), ("a", 1.0, 1, 2), ("b", 0.25, 1, 2)])
    result = evaluate._map_with_pvalues(table, "group", null_size=9, threshold=0.05, seed=0, null="sampled")
    assert result["group"].tolist() == ["a", "b"]
    np.testing.assert_allclose(result["mean_average_precision"], [1.0, 0.25])
    np.testing.assert_allclose(result["p_value"], [0.1, 1.0])  # 1/10 and 10/10


def test_sampled_pvalue_of_a_middling_map_counts_strictly_greater_null_draws():
    # One positive among 2 ranks: null AP is 1 or 1/2, each half the time.  A mAP of exactly 1/2 is
    # beaten only by the draws of 1 (strictly greater), about half of them; ">=" would count all.
    null_size = 2000
    table = ap_rows([("a", 0.5, 1, 2), ("a", 0.5, 1, 2)])
    result = evaluate._map_with_pvalues(
        table, "group", null_size=null_size, threshold=0.05, seed=0, null="sampled"
    )
    p = float(result["p_value"].iloc[0])
    assert 0.45 < p < 0.55  # binomial(2000, 1/2) / 2001: 5 sd is 0.056 wide


def test_copairs_null_is_copairs_own_result():
    # null="copairs" hands the AP table to copairs' mean_average_precision (the reference): the same
    # p-values for the same seed; its per-group row lists ('indices') are not part of our table.
    import copairs.map as copairs_map

    table = ap_rows([("a", 1.0, 1, 2), ("a", 0.5, 1, 3), ("b", 0.25, 1, 2), ("b", 0.75, 1, 3)])
    ours = evaluate._map_with_pvalues(table, "group", null_size=50, threshold=0.05, seed=3, null="copairs")
    reference = copairs_map.mean_average_precision(
        table.assign(normalized_average_precision=0.0),
        ["group"],
        null_size=50,
        threshold=0.05,
        seed=3,
        progress_bar=False,
    )
    assert "indices" not in ours.columns and (ours["null"] == "copairs").all()
    np.testing.assert_allclose(
        ours["mean_average_precision"], [0.75, 0.5], atol=1e-12
    )  # (1 + .5)/2, (.25 + .75)/2
    np.testing.assert_allclose(ours["p_value"], reference["p_value"], rtol=0, atol=0)
    np.testing.assert_allclose(ours["corrected_p_value"], reference["corrected_p_value"], rtol=0, atol=0)
    # the sampled null is the same distribution drawn otherwise: other p-values for the same seed
    sampled = evaluate._map_with_pvalues(table, "group", null_size=50, threshold=0.05, seed=3, null="sampled")
    assert not np.allclose(sampled["p_value"], reference["p_value"])


def test_unknown_null_method_is_rejected():
    with pytest.raises(evaluate.ConfigError, match="null distribution"):
        evaluate._map_with_pvalues(
            ap_rows([("a", 1.0, 1, 2)]), "group", null_size=10, threshold=0.05, seed=0, null="exact"
        )


def test_auto_null_follows_the_budget(monkeypatch):
    table = ap_rows([("a", 1.0, 1, 2), ("b", 1.0, 1, 3)])
    # cost = null_size x sum of distinct n_total = 10 x (2 + 3) = 50
    monkeypatch.setattr(evaluate, "COPAIRS_NULL_BUDGET", 50)
    at_budget = evaluate._map_with_pvalues(table, "group", null_size=10, threshold=0.05, seed=0)
    assert (at_budget["null"] == "copairs").all()
    monkeypatch.setattr(evaluate, "COPAIRS_NULL_BUDGET", 49)
    over = evaluate._map_with_pvalues(table, "group", null_size=10, threshold=0.05, seed=0)
    assert (over["null"] == "sampled").all()
    np.testing.assert_allclose(over.set_index("group")["p_value"], [1 / 11, 1 / 11], atol=1e-12)


# ----------------------------------------------------------------------------- activity


# Angles (degrees) on one circle:  a1 0, a2 10  |  b1 45, b2 135  |  controls c1 90 (plate P2), c2 270.
#   a1: a2 (10 away) first, then c1 / c2 (90)           -> AP 1
#   a2: a1 (10), c1 (80), c2 (100)                      -> AP 1
#   b1: c1 (45), b2 (90), c2 (135)                      -> AP 1/2
#   b2: c1 (45), b1 (90), c2 (135)                      -> AP 1/2
# mAP a = 1, b = 1/2; normalized (1 pos, 2 neg, mu0 11/18): a 1, b -2/7.
# Controls only on the query's plate (c1 is on P2, all others on P1): negatives {c2} only ->
#   b1: b2 (90), c2 (135) -> AP 1; b2 likewise; normalized (1 pos, 1 neg, mu0 3/4): 1.
ACTIVITY_ROWS = [
    ("P1", "A01", "b", "trt", "m1", 45),
    ("P1", "A02", "a", "trt", "m2", 0),
    ("P1", "A03", "dmso", "negcon", "", 270),
    ("P1", "A04", "b", "trt", "m1", 135),
    ("P1", "A05", "a", "trt", "m2", 10),
    ("P2", "A01", "dmso", "negcon", "", 90),
]


def test_activity_map_by_hand():
    wells = wells_table(ACTIVITY_ROWS)
    result = evaluate.activity_map(wells, FEATURES, null_size=99, seed=0, null="sampled")
    assert list(result.columns) == evaluate.ACTIVITY_COLUMNS
    assert result["Metadata_TreatmentId"].tolist() == ["a", "b"]  # sorted, controls are no queries
    assert result["Metadata_Treatment"].tolist() == ["A", "B"]
    assert result["Metadata_moa"].tolist() == ["m2", "m1"]
    assert result["n_wells"].tolist() == [2, 2]
    np.testing.assert_allclose(result["mean_average_precision"], [1.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(result["mean_normalized_average_precision"], [1.0, -2 / 7], atol=1e-12)
    assert result["p_value"].iloc[0] == pytest.approx(1 / 100, abs=1e-12)
    # b's null (1 pos among 3): AP 1, 1/2, 1/3 each a third of the time; > 1/2 only for 1
    assert 0.15 < result["p_value"].iloc[1] < 0.55
    assert result["below_corrected_p"].tolist() == [True, False]
    assert result.attrs["note"] == ""


def test_activity_map_with_controls_of_the_same_plate_only():
    wells = wells_table(ACTIVITY_ROWS)
    result = evaluate.activity_map(
        wells, FEATURES, null_size=99, seed=0, same_plate_negcon=True, null="sampled"
    )
    np.testing.assert_allclose(result["mean_average_precision"], [1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(result["mean_normalized_average_precision"], [1.0, 1.0], atol=1e-12)


def test_activity_map_says_why_it_is_empty():
    no_controls = wells_table([r for r in ACTIVITY_ROWS if r[3] != "negcon"])
    result = evaluate.activity_map(no_controls, FEATURES, null_size=10)
    assert result.empty and result.attrs["note"] == evaluate.NOTE_NO_NEGCON
    assert list(result.columns) == evaluate.ACTIVITY_COLUMNS
    single = wells_table([ACTIVITY_ROWS[0], ACTIVITY_ROWS[1], ACTIVITY_ROWS[2]])  # one well per treatment
    result = evaluate.activity_map(single, FEATURES, null_size=10)
    assert result.empty and result.attrs["note"] == evaluate.NOTE_NO_REPLICATES
    assert list(result.columns) == evaluate.ACTIVITY_COLUMNS


# ----------------------------------------------------------------------------- MoA consistency


# Consensus profiles: t1 'x' 0, t2 'x' 10, t3 'y' 90, t4 'y' 200; left out: a control labelled 'x' at
# 170 and an unlabelled treatment at 5 (either would move x's or y's ranks if it took part).
#   t1 (x): t2 (10), t3 (90), t4 (160)  -> AP 1        t2 (x): t1 (10), t3 (80), t4 (170) -> AP 1
#   t3 (y): t2 (80), t1 (90), t4 (110)  -> AP 1/3      t4 (y): t3 (110), t1 (160), t2 (170) -> AP 1
# mAP x = 1, y = (1/3 + 1)/2 = 2/3;  mu0(1 pos, 2 neg) = 11/18:
# normalized y = ((1/3 - 11/18)/(7/18) + 1)/2 = (-5/7 + 1)/2 = 1/7.
CONSENSUS_ROWS = [
    ("-", "-", "t3", "trt", "y", 90),
    ("-", "-", "t1", "trt", "x", 0),
    ("-", "-", "ctl", "negcon", "x", 170),
    ("-", "-", "t4", "trt", "y", 200),
    ("-", "-", "t0", "trt", "", 5),
    ("-", "-", "t2", "trt", "x|z", 10),  # 'z' is no one else's: no z row; t2's negatives stay t3, t4
]


def test_consistency_map_by_hand():
    consensus = wells_table(CONSENSUS_ROWS).drop(columns=["Metadata_Plate", "Metadata_Well"])
    result = evaluate.consistency_map(consensus, FEATURES, null_size=99, seed=0, null="sampled")
    assert list(result.columns) == evaluate.CONSISTENCY_COLUMNS
    assert result["Metadata_moa_label"].tolist() == ["x", "y"]
    assert result["n_treatments"].tolist() == [2, 2]
    np.testing.assert_allclose(result["mean_average_precision"], [1.0, 2 / 3], atol=1e-12)
    np.testing.assert_allclose(result["mean_normalized_average_precision"], [1.0, 1 / 7], atol=1e-12)
    assert result["p_value"].iloc[0] == pytest.approx(1 / 100, abs=1e-12)
    assert (result["null"] == "sampled").all()
    # y: beaten by the null draws of AP 1 (a third); BH over 2: x 2/100 < .05, y stays above
    assert result["below_p"].tolist() == [True, False]
    assert result["below_corrected_p"].tolist() == [True, False]
    assert result.attrs["note"] == ""


def test_consistency_map_splits_labels_at_the_given_separator():
    rows = [(*r[:4], r[4].replace("|", ";"), r[5]) for r in CONSENSUS_ROWS]
    consensus = wells_table(rows).drop(columns=["Metadata_Plate", "Metadata_Well"])
    result = evaluate.consistency_map(consensus, FEATURES, null_size=99, sep=";", null="sampled")
    assert result["Metadata_moa_label"].tolist() == ["x", "y"]
    np.testing.assert_allclose(result["mean_average_precision"], [1.0, 2 / 3], atol=1e-12)


def test_activity_map_defaults():
    # DESIGN.md §6: 10000 null draws, seed 0, alpha 0.05
    wells = wells_table(ACTIVITY_ROWS)
    default = evaluate.activity_map(wells, FEATURES, null="sampled")
    explicit = evaluate.activity_map(wells, FEATURES, null_size=10000, threshold=0.05, seed=0, null="sampled")
    pd.testing.assert_frame_equal(default, explicit)
    assert default["p_value"].iloc[0] == pytest.approx(1 / 10001, abs=1e-12)
    assert (default["null"] == "sampled").all()


def test_consistency_map_defaults():
    # DESIGN.md §6: copairs' null of 10000 draws, seed 0, alpha 0.05, MoA labels split at '|'.
    consensus = wells_table(CONSENSUS_ROWS).drop(columns=["Metadata_Plate", "Metadata_Well"])
    default = evaluate.consistency_map(consensus, FEATURES, null="sampled")
    explicit = evaluate.consistency_map(
        consensus, FEATURES, null_size=10000, threshold=0.05, seed=0, sep="|", null="sampled"
    )
    pd.testing.assert_frame_equal(default, explicit)
    assert default["Metadata_moa_label"].tolist() == ["x", "y"]  # 'x|z' counts for x
    assert default["p_value"].iloc[0] == pytest.approx(1 / 10001, abs=1e-12)
    # y (mAP 2/3, one positive among 3): beaten by the null's draws of AP 1, about a third of them
    assert 0.3 < default["p_value"].iloc[1] < 0.37 and not default["below_p"].iloc[1]


def test_consistency_map_says_why_it_is_empty():
    consensus = wells_table(CONSENSUS_ROWS).drop(columns=["Metadata_Plate", "Metadata_Well"])
    one = consensus[consensus["Metadata_TreatmentId"].isin(["t1", "ctl", "t0"])]
    result = evaluate.consistency_map(one, FEATURES, null_size=10)
    assert result.empty and result.attrs["note"] == evaluate.NOTE_FEW_ANNOTATED
    assert list(result.columns) == evaluate.CONSISTENCY_COLUMNS
    unshared = consensus[consensus["Metadata_TreatmentId"].isin(["t1", "t3"])]
    result = evaluate.consistency_map(unshared, FEATURES, null_size=10)
    assert result.empty and result.attrs["note"] == evaluate.NOTE_NO_SHARED_MOA
    assert list(result.columns) == evaluate.CONSISTENCY_COLUMNS


# ----------------------------------------------------------------------------- FoE / MAP / recall


def test_treatment_means_by_hand():
    wells = pd.DataFrame(
        {
            "Metadata_TreatmentId": ["b", "a", "b", "a", "a"],
            "Metadata_Treatment": ["B", "A", "B", "A", "A"],
            "Metadata_pert_type": ["trt"] * 5,
            "Metadata_moa": ["m", "n", "m", "n", "n"],
            "f0": [1.0, 2.0, 3.0, 4.0, 9.0],
            "f1": [0.0, -3.0, 2.0, 0.0, 0.0],
        }
    )
    means = evaluate.treatment_means(wells, ["f0", "f1"])
    assert means["Metadata_TreatmentId"].tolist() == ["a", "b"]
    assert means["Metadata_Treatment"].tolist() == ["A", "B"]
    assert means["n_wells"].tolist() == [3, 2]
    np.testing.assert_allclose(means[["f0", "f1"]], [[5.0, -1.0], [2.0, 1.0]])


# Wells (angles); treatment means keep the angle of its wells when they point the same way:
#   t1 'x': (1, 0) and (3, 0) -> (2, 0), angle 0      t2 'x': 10      t3 'y': 90      t4 'y': 200
#   left out: a control labelled 'x' at 170, and an unlabelled treatment at 5.
# map_ap (sklearn AP over the other treatments): t1 1, t2 1, t3 1/3, t4 1 (ranks as in the
# consistency case); every treatment has one same-MoA partner.
def test_foe_map_recall_by_hand():
    rows = [
        ("P1", "A01", "t1", "trt", "x", 0),
        ("P1", "A02", "t2", "trt", "x|z", 10),  # z is no one else's: t2 ~ t1 only
        ("P1", "A03", "t3", "trt", "y", 90),
        ("P1", "A04", "t4", "trt", "y", 200),
        ("P1", "A05", "ctl", "negcon", "x", 170),
        ("P1", "A06", "t0", "trt", "", 5),
        ("P1", "A07", "t1", "trt", "x", 0),
    ]
    wells = wells_table(rows)
    wells.loc[6, FEATURES] = [3.0, 0.0]
    table = evaluate.foe_map_recall(wells, FEATURES)
    assert list(table.columns[:6]) == [*evaluate.TREATMENT_COLUMNS, "n_wells", "n_same_moa"]
    assert table["Metadata_TreatmentId"].tolist() == ["t1", "t2", "t3", "t4"]
    assert table["n_wells"].tolist() == [2, 1, 1, 1]
    assert table["n_same_moa"].tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(table["map_ap"], [1.0, 1.0, 1 / 3, 1.0], atol=1e-12)
    # Recall@k% with N = 4: n = max(int(4k/100), 1) = 1 neighbour; hit for t1, t2, t4; divided by
    # the same-MoA count including self (2).
    for k in (1, 3, 5, 10):
        np.testing.assert_allclose(table[f"recall_top{k}pct"], [0.5, 0.5, 0.0, 0.5], atol=1e-12)
    # FoE 2x2 tables: with 3 others the 99th percentile lies between the two most similar: only the
    # nearest is above it.  v = (same above, other above, same below, other below).
    np.testing.assert_array_equal(
        table[["foe_v11", "foe_v12", "foe_v21", "foe_v22"]].to_numpy(),
        [[1, 0, 0, 2], [1, 0, 0, 2], [0, 1, 1, 1], [1, 0, 0, 2]],
    )
    # Fisher one-sided p of v11 >= 1 with 1 same-MoA among 3, one drawn: 1/3; Holm-Sidak over 4
    # queries of p = 1/3 (and t3's p = 1) rejects none at 0.05.
    np.testing.assert_allclose(table["foe_p_value"], [1 / 3, 1 / 3, 1.0, 1 / 3], atol=1e-12)
    assert not table["foe_significant_holm_sidak"].any()
    assert table.attrs["note"] == ""
    # Threshold: 99th percentile of the 3 other cosines (linear, at index .99 * 2 = 1.98 of the sorted):
    #   t1: cos 10, 90, 160 -> 0 + .98 (cos 10 - 0);   t2: cos 10, 80, 170 -> cos 80 + .98 (cos 10 - cos 80)
    #   t3: cos 80, 90, 110 -> 0 + .98 cos 80;         t4: cos 110, 160, 170 -> cos 160 + .98 (cos 110 - cos 160)
    c = lambda deg: np.cos(np.deg2rad(deg))  # noqa: E731
    np.testing.assert_allclose(
        table["foe_threshold"],
        [0.98 * c(10), c(80) + 0.98 * (c(10) - c(80)), 0.98 * c(80), c(160) + 0.98 * (c(110) - c(160))],
        atol=1e-9,
    )
    # Odds ratio v11 v22 / (v12 v21): 1*2/0 = inf for t1, t2, t4 (published code: v22 = 2 instead);
    # t3: 0*1/(1*1) = 0.
    np.testing.assert_array_equal(table["foe_odds_ratio"], [np.inf, np.inf, 0.0, np.inf])
    np.testing.assert_array_equal(table["foe_odds_ratio_published"], [2.0, 2.0, 0.0, 2.0])
    # Holm-Sidak at alpha 0.9 over the 4 queries: sorted p 1/3, 1/3, 1/3, 1 against 1 - 0.1^(1/m) for
    # m = 4, 3, 2, 1: .438, .536, .684, .9 -> the three p = 1/3 are rejected, t3's p = 1 is not.
    lenient = evaluate.foe_map_recall(wells, FEATURES, alpha=0.9)
    assert lenient["foe_significant_holm_sidak"].tolist() == [True, True, False, True]
    assert lenient["foe_significant_holm_sidak"].dtype == bool


def test_foe_map_recall_options_reach_the_metrics():
    # sep ';' (t2 'x;z' shares x with t1), the median instead of the 99th percentile, Recall@50%.
    rows = [
        ("P1", "A01", "t1", "trt", "x", 0),
        ("P1", "A02", "t2", "trt", "x;z", 10),
        ("P1", "A03", "t3", "trt", "y", 90),
        ("P1", "A04", "t4", "trt", "y", 200),
    ]
    table = evaluate.foe_map_recall(
        wells_table(rows), FEATURES, sep=";", percentile=50, recall_percents=(50,)
    )
    assert table["n_same_moa"].tolist() == [1, 1, 1, 1]
    # medians of the 3 other cosines: t1 cos 90 = 0, t2 cos 80, t3 cos 90 = 0, t4 cos 160
    c = lambda deg: np.cos(np.deg2rad(deg))  # noqa: E731
    np.testing.assert_allclose(table["foe_threshold"], [0.0, c(80), 0.0, c(160)], atol=1e-9)
    # Recall@50%: n = int(4 * 50 / 100) = 2 neighbours; one hit each except t3 (t2, t1: no y) -> / 2
    assert [c for c in table.columns if c.startswith("recall_")] == ["recall_top50pct"]
    np.testing.assert_allclose(table["recall_top50pct"], [0.5, 0.5, 0.0, 0.5])


def test_foe_map_recall_says_why_it_is_empty():
    rows = [("P1", "A01", "t1", "trt", "x", 0), ("P1", "A02", "ctl", "negcon", "x", 10)]
    table = evaluate.foe_map_recall(wells_table(rows), FEATURES)
    assert table.empty and table.attrs["note"] == evaluate.NOTE_FEW_ANNOTATED
    assert list(table.columns) == [*evaluate.TREATMENT_COLUMNS, "n_wells", "n_same_moa"]
    # two annotated treatments with no MoA in common: a table, but no query
    rows = [("P1", "A01", "t1", "trt", "x", 0), ("P1", "A02", "t2", "trt", "y", 10)]
    table = evaluate.foe_map_recall(wells_table(rows), FEATURES)
    assert len(table) == 2 and table.attrs["note"] == evaluate.NOTE_NO_SHARED_MOA
    assert table["n_same_moa"].tolist() == [0, 0]
