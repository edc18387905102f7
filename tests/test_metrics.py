"""Retrieval metrics on hand-checkable cases, and vectorised == per-query reference."""

from __future__ import annotations

import numpy as np
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
