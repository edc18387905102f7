"""Retrieval metrics on hand-checkable cases, and vectorised == per-query reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import fisher_exact

from phenoprofiler_core import metrics

# A 4-treatment example worked out by hand (query 0 = treatment 0, MoA 'a'):
#   treatments 1 and 2 share MoA 'a' with it, treatment 3 has MoA 'b'.
#   Row 0 similarities to 1, 2, 3: 0.9 (same), 0.2 (same), 0.5 (other); self is scored -1.
#   Ranking: 1 (hit), 3 (miss), 2 (hit), self.
HAND_S = np.array(
    [
        [1.0, 0.9, 0.2, 0.5],
        [0.9, 1.0, 0.3, 0.1],
        [0.2, 0.3, 1.0, 0.4],
        [0.5, 0.1, 0.4, 1.0],
    ]
)
HAND_MOA = ["a", "a", "a", "b"]


def test_moa_matching_shares_any_single_label():
    M = metrics.moa_match_matrix(["a|b", "a", "b", "c", "", "b|a"])
    assert M[0, 1] and M[0, 2] and M[1, 0]  # 'a|b' matches 'a' and 'b' (whole-string matching would not)
    assert M[0, 5]  # label order does not matter
    assert not M[0, 3] and not M[1, 2]
    assert not M[4].any() and not M[:, 4].any()  # no labels: matches nothing, not even itself
    assert M[0, 0] and M[3, 3]


def test_fisher_table_and_odds_ratio_by_hand():
    # [[3, 1], [2, 10]]: OR = 3*10 / (1*2) = 15.
    # One-sided p = P(X >= 3), X ~ hypergeometric(16 items, 5 same-MoA, 4 drawn)
    #   = [C(5,3)C(11,1) + C(5,4)C(11,0)] / C(16,4) = (110 + 5) / 1820.
    odds, p = metrics.fisher_greater([3], [1], [2], [10])
    assert odds[0] == pytest.approx(15.0)
    assert p[0] == pytest.approx(115 / 1820)
    scipy_result = fisher_exact([[3, 1], [2, 10]], alternative="greater")
    assert odds[0] == pytest.approx(scipy_result.statistic) and p[0] == pytest.approx(scipy_result.pvalue)


def test_infinite_odds_rule_and_empty_margin():
    # v12 = 0 -> sample OR infinite -> the published code reports v22 (here 5) instead.
    odds, p = metrics.fisher_greater([2, 0], [0, 0], [1, 3], [5, 4])
    assert np.isinf(odds[0])
    assert metrics.published_odds_ratio(odds, [5, 4])[0] == 5.0
    # An empty row (nothing above the threshold) gives (NaN, 1.0), as scipy does.
    assert np.isnan(odds[1]) and p[1] == 1.0


def test_holm_sidak_by_hand():
    # sorted p 0.01, 0.03, 0.04: 1-(0.99)^3 = 0.0297 < 0.05 rejects; 1-(0.97)^2 = 0.0591 stops.
    assert metrics.holm_sidak_reject(np.array([0.01, 0.04, 0.03]), 0.05).tolist() == [True, False, False]


def test_foe_of_the_hand_example():
    # Others of query 0: 0.9 (same), 0.2 (same), 0.5 (other).  99th percentile of [0.2, 0.5, 0.9]:
    # index 0.99*2 = 1.98 -> t = 0.5 + 0.98*0.4 = 0.892.  Only 0.9 (same MoA) is above t:
    # v11=1, v12=0, v21=1, v22=1 -> OR infinite -> published OR = v22 = 1;
    # p = P(X >= 1), 3 items, 2 same-MoA, 1 drawn = 2/3.
    r = metrics.retrieval_metrics(HAND_S, metrics.moa_match_matrix(HAND_MOA))
    assert r.foe_threshold[0] == pytest.approx(0.892)
    assert r.foe_v[0].tolist() == [1, 0, 1, 1]
    assert np.isinf(r.foe_odds_ratio[0])
    assert metrics.published_odds_ratio(r.foe_odds_ratio, r.foe_v[:, 3])[0] == 1.0
    assert r.foe_p_value[0] == pytest.approx(2 / 3)


def test_average_precision_on_paper():
    # Ranking hit, miss, hit: AP = (1/1 + 2/3) / 2 = 5/6.
    M = metrics.moa_match_matrix(HAND_MOA)
    r = metrics.retrieval_metrics(HAND_S, M)
    assert r.average_precision[0] == pytest.approx(5 / 6)
    assert metrics.map_ap_reference(HAND_S, M)[0] == pytest.approx(5 / 6)
    # Another ranking by hand: hit, miss, hit, miss, hit -> (1 + 2/3 + 3/5) / 3.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    S = np.eye(6)
    S[0, 1:] = S[1:, 0] = scores
    moas = ["x", "x", "y", "x", "y", "x"]
    r = metrics.retrieval_metrics(S, metrics.moa_match_matrix(moas))
    assert r.average_precision[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_both_map_flavours_on_the_hand_example():
    # scikit-learn's curve for query 0, lowest threshold first (self at -1 included):
    #   precision [2/4, 2/3, 1/2, 1/1, 1 (appended)], recall [1, 1, 1/2, 1/2, 0];
    #   running max [1/2, 2/3, 2/3, 1, 1].  Grid (N = 4): [1, 2/3, 1/3, 0].
    # Published walk (store, then advance while grid[g] < recall[j]):
    #   g0 -> max[0] = 1/2;  g1 -> max[0] = 1/2 (lag), j moves to 2;
    #   g2 -> max[2] = 2/3, j moves to 4;  g3 -> max[4] = 1.   Mean = (1/2+1/2+2/3+1)/4 = 2/3.
    # Textbook interpolation (max precision at recall >= r) would give (2/3+2/3+1+1)/4 = 5/6.
    M = metrics.moa_match_matrix(HAND_MOA)
    r = metrics.retrieval_metrics(HAND_S, M)
    assert r.interpolated_precision[0] == pytest.approx(2 / 3)
    grid, _curve, per_query = metrics.interpolated_curve_reference(HAND_S, M)
    assert grid.tolist() == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert per_query[0] == pytest.approx(2 / 3)
    # map_ap of the same query is 5/6 (previous test): the two published flavours differ.
    assert r.average_precision[0] == pytest.approx(5 / 6)
    # Treatment 3 (MoA 'b') has no same-MoA partner: never a query.
    assert np.isnan(r.interpolated_precision[3]) and np.isnan(r.average_precision[3])


def test_interpolated_needs_two_other_positives():
    S = HAND_S.copy()
    M = metrics.moa_match_matrix(["a", "a", "b", "b"])  # each query has exactly one partner
    r = metrics.retrieval_metrics(S, M)
    assert np.isnan(r.interpolated_precision).all()
    assert not np.isnan(r.average_precision).any()


def test_recall_of_the_hand_example():
    # N = 4: n = max(int(4*k/100), 1) = 1 for k = 1..10.  Query 0's best other is treatment 1 (hit);
    # recall = 1 / (2 others + self) = 1/3.
    r = metrics.retrieval_metrics(HAND_S, metrics.moa_match_matrix(HAND_MOA))
    for k in (1, 3, 5, 10):
        assert r.recall[k][0] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 70))
    profiles = rng.standard_normal((n, 4))
    if seed % 2 == 0:
        profiles = np.round(profiles)  # exact ties in similarity
    S = metrics.cosine_similarity_matrix(profiles)
    if seed % 4 == 0:
        S = np.round(S, 1)
    first = rng.integers(0, 5, n)
    moas = [
        f"m{a}|m{(a + 1) % 5}" if rng.random() < 0.2 else ("" if rng.random() < 0.1 else f"m{a}")
        for a in first
    ]
    M = metrics.moa_match_matrix(moas)
    fast = metrics.retrieval_metrics(S, M, block_rows=9)

    foe = metrics.enrichment_reference(S, M)
    q = foe["query"].to_numpy()
    np.testing.assert_array_equal(foe[["v11", "v12", "v21", "v22"]].to_numpy(), fast.foe_v[q])
    np.testing.assert_allclose(foe["odds_ratio"], fast.foe_odds_ratio[q])
    np.testing.assert_allclose(foe["p_value"], fast.foe_p_value[q], rtol=1e-9)
    np.testing.assert_allclose(metrics.map_ap_reference(S, M), fast.average_precision, atol=1e-12)
    _, _curve, per_query = metrics.interpolated_curve_reference(S, M)
    np.testing.assert_allclose(per_query, fast.interpolated_precision, atol=1e-12)
    reference_recall = metrics.recall_reference(S, M)
    for k, values in reference_recall.items():
        np.testing.assert_allclose(values, fast.recall[k], atol=1e-12)


def test_summary_counts_queries_and_variants():
    M = metrics.moa_match_matrix(HAND_MOA)
    summary = metrics.summarize_retrieval(metrics.retrieval_metrics(HAND_S, M))
    assert summary["map_ap"]["n"] == 3  # treatments 0-2 each have two same-MoA partners
    assert summary["map_interpolated"]["n"] == 3
    assert summary["map_interpolated"]["variant"] != summary["map_ap"]["variant"]
    assert summary["foe_top1_mean"]["value"] >= 0


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="square"):
        metrics.retrieval_metrics(np.zeros((2, 3)), np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        metrics.retrieval_metrics(np.full((3, 3), np.nan), np.eye(3, dtype=bool))


# ----------------------------------------------------------------------------- FoE median


def test_foe_median_follows_the_published_infinite_odds_rule():
    # Five queries (each has a same-MoA partner); odds ratios 2, inf, inf, inf and NaN (empty margin).
    # Published rule: inf -> v22, so the ORs are 2, 7, 3, 9 (NaN skipped):
    #   mean = 21/4 = 5.25, median = (3 + 7)/2 = 5.  The raw median of 2, inf, inf, inf is inf.
    result = metrics.RetrievalResult(
        n_positives=np.ones(5, dtype=int),
        foe_v=np.array([[1, 1, 1, 10], [1, 0, 1, 7], [1, 0, 1, 3], [1, 0, 1, 9], [0, 0, 2, 4]]),
        foe_threshold=np.zeros(5),
        foe_odds_ratio=np.array([2.0, np.inf, np.inf, np.inf, np.nan]),
        foe_p_value=np.full(5, 0.5),
        average_precision=np.full(5, 0.5),
        interpolated_precision=np.full(5, np.nan),
        recall={1: np.full(5, 0.5)},
    )
    summary = metrics.summarize_retrieval(result)
    assert summary["foe_top1_mean"]["value"] == pytest.approx(5.25)
    assert summary["foe_top1_median"]["value"] == pytest.approx(5.0)
    assert summary["foe_top1_median"]["n"] == 4
    assert np.isinf(summary["foe_top1_median_raw"]["value"])
    assert "diagnostic" in summary["foe_top1_median_raw"]["variant"]


# ----------------------------------------------------------------------------- block-wise


def _random_moas(rng, n, n_labels=5):
    first = rng.integers(0, n_labels, n)
    return [
        f"m{a}|m{(a + 1) % n_labels}" if rng.random() < 0.2 else ("" if rng.random() < 0.1 else f"m{a}")
        for a in first
    ]


@pytest.mark.parametrize("seed", range(4))
def test_blockwise_from_profiles_equals_the_dense_matrices(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 90))
    profiles = rng.standard_normal((n, 6)) + np.repeat(rng.standard_normal((1, 6)), n, axis=0)
    moas = _random_moas(rng, n)
    dense = metrics.retrieval_metrics(
        metrics.cosine_similarity_matrix(profiles), metrics.moa_match_matrix(moas), block_rows=n
    )
    blocked = metrics.retrieval_metrics_from_profiles(profiles, moas, block_rows=7)
    np.testing.assert_array_equal(dense.n_positives, blocked.n_positives)
    np.testing.assert_array_equal(dense.foe_v, blocked.foe_v)
    for name in (
        "foe_threshold",
        "foe_odds_ratio",
        "foe_p_value",
        "average_precision",
        "interpolated_precision",
    ):
        np.testing.assert_allclose(getattr(dense, name), getattr(blocked, name), rtol=1e-9, atol=1e-12)
    for k in dense.recall:
        np.testing.assert_allclose(dense.recall[k], blocked.recall[k], atol=1e-12)


# ----------------------------------------------------------------------------- copairs AP, block-wise


def _copairs():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import copairs.map as copairs_map
        from copairs.matching import assign_reference_index
    return copairs_map, assign_reference_index


def test_replicate_ap_by_hand_and_as_copairs_ranks_ties():
    # Treatment A has wells a1 = (1, 0) and a2 = (0.5, 0.866); controls c1 = (1, 0.1),
    # c2 = (0, 1), c3 = (0.5, -0.866).
    # a1: positive a2 at cos 0.5; negatives c1 0.995, c2 0, c3 0.5 (tied with a2: the positive
    #     ranks first) -> ranking c1, a2, c3, c2 -> AP = 1/2.
    # a2: positive a1 at 0.5; negatives c2 0.866, c1 0.584, c3 -0.5 -> c2, c1, a1 -> AP = 1/3.
    s = np.sqrt(3) / 2
    profiles = np.array([[1, 0], [0.5, s], [1, 0.1], [0, 1], [0.5, -s]])
    groups = np.array([0, 0, 1, 1, 1])
    is_control = np.array([False, False, True, True, True])
    ap = metrics.replicate_average_precision(profiles, groups, is_control)
    assert ap["row"].tolist() == [0, 1]
    assert ap["average_precision"].tolist() == pytest.approx([1 / 2, 1 / 3])
    assert ap["n_pos_pairs"].tolist() == [1, 1] and ap["n_total_pairs"].tolist() == [4, 4]
    # copairs itself on the same wells
    copairs_map, assign_reference_index = _copairs()
    meta = pd.DataFrame({"t": ["A", "A", "D", "D", "D"], "negcon": is_control})
    meta = assign_reference_index(meta, "negcon", reference_col="ref", default_value=-1)
    reference = copairs_map.average_precision(
        meta, profiles, ["t", "ref"], [], [], ["negcon", "ref"], progress_bar=False
    )
    assert reference["average_precision"][:2].tolist() == pytest.approx([1 / 2, 1 / 3])


def _wells(rng, n_plates=3, n_treatments=7, n_controls=3, dim=5, rounded=False):
    rows, values = [], []
    for plate in range(n_plates):
        for t in range(n_treatments):
            for _ in range(int(rng.integers(0, 3))):  # 0-2 wells per plate: some treatments single
                rows.append((f"P{plate}", f"T{t}", False))
                values.append(rng.standard_normal(dim) + t % 3)
        for _ in range(n_controls):
            rows.append((f"P{plate}", "DMSO", True))
            values.append(rng.standard_normal(dim))
    meta = pd.DataFrame(rows, columns=["plate", "t", "negcon"])
    profiles = np.array(values)
    # rounded to half-integers: many exact ties, never a zero row (cosine undefined)
    return meta, (np.round(profiles) + 0.5 if rounded else profiles)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("count_by", ["comparison", "sorting"])
def test_replicate_ap_equals_copairs(seed, count_by, monkeypatch):
    # Both ways of counting the negatives ranked before a positive (few positives: comparisons;
    # many, e.g. positive controls: a sort), and both ways of scoring the positives (pair by pair;
    # one product of a large group with itself), must give copairs' numbers.
    monkeypatch.setattr(metrics, "_FEW_POSITIVES", 10**6 if count_by == "comparison" else 0)
    monkeypatch.setattr(metrics, "_BIG_GROUP", 10**9 if count_by == "comparison" else 2)
    rng = np.random.default_rng(seed)
    meta, profiles = _wells(rng, rounded=seed % 2 == 0)  # rounded: many exact ties
    same_plate = seed % 3 == 0
    copairs_map, assign_reference_index = _copairs()
    ref_meta = assign_reference_index(meta.copy(), "negcon", reference_col="ref", default_value=-1)
    reference = copairs_map.average_precision(
        ref_meta,
        profiles,
        ["t", "ref"],
        [],
        ["plate"] if same_plate else [],
        ["negcon", "ref"],
        progress_bar=False,
    )
    reference = reference[~reference["negcon"] & (reference["n_pos_pairs"] > 0)]
    ours = metrics.replicate_average_precision(
        profiles,
        pd.factorize(meta["t"])[0],
        meta["negcon"].to_numpy(),
        pools=pd.factorize(meta["plate"])[0] if same_plate else None,
        block_rows=4,
    )
    assert ours["row"].tolist() == reference.index.tolist()
    np.testing.assert_allclose(ours["average_precision"], reference["average_precision"], rtol=1e-12)
    np.testing.assert_array_equal(ours["n_pos_pairs"], reference["n_pos_pairs"])
    np.testing.assert_array_equal(ours["n_total_pairs"], reference["n_total_pairs"])


@pytest.mark.parametrize("seed", range(6))
def test_multilabel_ap_equals_copairs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(12, 40))
    profiles = rng.standard_normal((n, 4))
    if seed % 2 == 0:
        profiles = np.round(profiles) + 0.5  # exact ties, no zero row
    moas = [m or "m0" for m in _random_moas(rng, n, n_labels=4)]
    copairs_map, _ = _copairs()
    meta = pd.DataFrame({"label": [sorted(metrics.split_moa(m)) for m in moas], "row": np.arange(n)})
    reference = copairs_map.multilabel.average_precision(
        meta, profiles, ["label"], [], [], ["label"], multilabel_col="label", progress_bar=False
    )
    ours = metrics.multilabel_average_precision(profiles, moas, block_rows=5)
    key = ["row", "label"]
    merged = ours.merge(reference, on=key, suffixes=("", "_copairs"), how="outer", indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"]
    np.testing.assert_allclose(merged["average_precision"], merged["average_precision_copairs"], rtol=1e-12)
    np.testing.assert_array_equal(merged["n_pos_pairs"], merged["n_pos_pairs_copairs"])
    np.testing.assert_array_equal(merged["n_total_pairs"], merged["n_total_pairs_copairs"])
