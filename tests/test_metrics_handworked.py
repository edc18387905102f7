"""Retrieval metrics against numbers worked out on paper from the published definitions (DESIGN.md §6).

Every expected value below is derived in the comments from the definitions (FoE: 99th percentile
threshold, 2x2 table, one-sided Fisher test, infinite-odds rule; map_ap: scikit-learn's average
precision; map_interpolated: the DeepProfilerExperiments walk over the recall grid; Recall@k%:
n = max(int(N*k/100), 1) after self, divided by the row sum of M including self), never from the
code under test.  The vectorised path (retrieval_metrics) and the per-query reference loops are
both checked against the same hand values, so a bug shared by both cannot hide behind their
agreement.
"""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
from scipy.stats import fisher_exact

from phenoprofiler_core import metrics

# ----------------------------------------------------------------------------- case A (N = 5)
# MoAs: t0 'a', t1 'a|b', t2 'b', t3 'c', t4 'a'.  Shared single labels:
#   t0 ~ t1, t4;   t1 ~ t0, t2, t4;   t2 ~ t1;   t3 ~ nobody;   t4 ~ t0, t1.
CASE_A_MOA = ["a", "a|b", "b", "c", "a"]
CASE_A_S = np.array(
    [
        [1.0, 0.8, 0.1, 0.6, 0.3],
        [0.8, 1.0, 0.7, 0.2, 0.5],
        [0.1, 0.7, 1.0, 0.4, 0.0],
        [0.6, 0.2, 0.4, 1.0, -0.3],
        [0.3, 0.5, 0.0, -0.3, 1.0],
    ]
)
NAN = float("nan")
# Per query, by hand (self scored -1 and labelled False):
#  t0: others by score t1 .8 hit, t3 .6 miss, t4 .3 hit, t2 .1 miss.
#      AP = (1/1 + 2/3)/2 = 5/6.   Recall: N = 5 -> n = 1 for every k; top t1 hit -> 1/(2+1).
#      FoE: others sorted [.1 .3 .6 .8]; 99th pct at index .99*3 = 2.97 -> .6 + .97*.2 = .794;
#      above t: t1 (hit) -> v = (1, 0, 1, 2); OR = inf -> published v22 = 2;
#      p = P(X >= 1 | 4 items, 2 same-MoA, 1 drawn) = 1 - C(2,1)/C(4,1) = 1/2.
#      Interpolated (sklearn curve from the lowest threshold up, self included, plus the appended
#      point): precision [2/5 1/2 2/3 1/2 1 1], recall [1 1 1 .5 .5 0], running max
#      [.4 .5 2/3 2/3 1 1].  Grid [1 .75 .5 .25 0]: g0 -> .4; g1 -> .4 (lag), j -> 3;
#      g2 -> 2/3; g3 -> 2/3, j -> 5; g4 -> 1.  Mean (.4+.4+2/3+2/3+1)/5 = 47/75.
#  t1: others t0 .8 hit, t2 .7 hit, t4 .5 hit, t3 .2 miss.  AP = 1.  Recall 1/(3+1).
#      FoE: sorted [.2 .5 .7 .8] -> t = .7 + .97*.1 = .797; above: t0 (hit) -> v = (1, 0, 2, 1);
#      OR inf -> 1;  p = 1 - P(X=0) = 1 - C(1,1)/C(4,1) = 3/4.
#      Interpolated: precision [3/5 3/4 1 1 1 1], recall [1 1 1 2/3 1/3 0], running max
#      [.6 .75 1 1 1 1]; g0 .6, g1 .6 (j -> 3), g2 1, g3 1 (j -> 5), g4 1.  Mean 4.2/5 = 21/25.
#  t2: one partner (t1 .7, top) -> AP = 1, recall 1/(1+1), not an interpolated query (< 2).
#      FoE: sorted [0 .1 .4 .7] -> t = .4 + .97*.3 = .691; v = (1, 0, 0, 3); OR inf -> 3;
#      p = P(X >= 1 | 4 items, 1 same, 1 drawn) = 1/4.
#  t3: no partner: not a query anywhere.
#  t4: others t1 .5 hit, t0 .3 hit, t2 0 miss, t3 -.3 miss.  AP = 1.  Recall 1/3.
#      FoE: sorted [-.3 0 .3 .5] -> t = .3 + .97*.2 = .494; v = (1, 0, 1, 2); OR inf -> 2; p = 1/2.
#      Interpolated: precision [2/5 1/2 2/3 1 1 1], recall [1 1 1 1 .5 0], running max
#      [.4 .5 2/3 1 1 1]; g0 .4, g1 .4 (j -> 4), g2 1, g3 1 (j -> 5), g4 1.  Mean 3.8/5 = 19/25.
CASE_A = {
    "n_positives": [2, 3, 1, 0, 2],
    "ap": [5 / 6, 1.0, 1.0, NAN, 1.0],
    "recall": [1 / 3, 1 / 4, 1 / 2, NAN, 1 / 3],
    "threshold": [0.794, 0.797, 0.691, NAN, 0.494],
    "v": [[1, 0, 1, 2], [1, 0, 2, 1], [1, 0, 0, 3], [1, 0, 1, 2]],  # queries t0, t1, t2, t4
    "published_or": [2.0, 1.0, 3.0, 2.0],
    "p": [1 / 2, 3 / 4, 1 / 4, 1 / 2],
    "interpolated": [47 / 75, 21 / 25, NAN, NAN, 19 / 25],
    "curve": [[0.4, 0.4, 2 / 3, 2 / 3, 1.0], [0.6, 0.6, 1.0, 1.0, 1.0], [0.4, 0.4, 1.0, 1.0, 1.0]],
}
QUERIES_A = [0, 1, 2, 4]


def _case_a():
    return metrics.retrieval_metrics(CASE_A_S, metrics.moa_match_matrix(CASE_A_MOA))


def test_case_a_match_matrix_by_hand():
    M = metrics.moa_match_matrix(CASE_A_MOA)
    expected = np.array(
        [
            [1, 1, 0, 0, 1],
            [1, 1, 1, 0, 1],
            [0, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [1, 1, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(M, expected)


def test_case_a_vectorised_per_query_values():
    r = _case_a()
    np.testing.assert_array_equal(r.n_positives, CASE_A["n_positives"])
    np.testing.assert_allclose(r.average_precision, CASE_A["ap"], atol=1e-12)
    np.testing.assert_allclose(r.interpolated_precision, CASE_A["interpolated"], atol=1e-12)
    for k in (1, 3, 5, 10):
        np.testing.assert_allclose(r.recall[k], CASE_A["recall"], atol=1e-12)
    np.testing.assert_allclose(r.foe_threshold, CASE_A["threshold"], atol=1e-12)
    np.testing.assert_array_equal(r.foe_v[QUERIES_A], CASE_A["v"])
    assert np.isinf(r.foe_odds_ratio[QUERIES_A]).all()  # v12 = 0 everywhere: sample OR infinite
    np.testing.assert_allclose(r.foe_p_value[QUERIES_A], CASE_A["p"], atol=1e-12)
    published = metrics.published_odds_ratio(r.foe_odds_ratio[QUERIES_A], r.foe_v[QUERIES_A, 3])
    np.testing.assert_allclose(published, CASE_A["published_or"])
    # t3 has no partner: NaN everywhere, as a non-query
    assert np.isnan(r.foe_threshold[3]) and np.isnan(r.foe_p_value[3]) and np.isnan(r.foe_odds_ratio[3])


def test_case_a_reference_loops_give_the_hand_values():
    M = metrics.moa_match_matrix(CASE_A_MOA)
    np.testing.assert_allclose(metrics.map_ap_reference(CASE_A_S, M), CASE_A["ap"], atol=1e-12)
    grid, mean_curve, per_query = metrics.interpolated_curve_reference(CASE_A_S, M)
    np.testing.assert_allclose(grid, [1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(per_query, CASE_A["interpolated"], atol=1e-12)
    np.testing.assert_allclose(mean_curve, np.mean(CASE_A["curve"], axis=0), atol=1e-12)
    recall = metrics.recall_reference(CASE_A_S, M)
    assert sorted(recall) == [1, 3, 5, 10]
    for k in (1, 3, 5, 10):
        np.testing.assert_allclose(recall[k], CASE_A["recall"], atol=1e-12)
    foe = metrics.enrichment_reference(CASE_A_S, M)
    assert foe["query"].tolist() == QUERIES_A
    np.testing.assert_allclose(foe["threshold"], [0.794, 0.797, 0.691, 0.494], atol=1e-12)
    np.testing.assert_array_equal(foe[["v11", "v12", "v21", "v22"]].to_numpy(), CASE_A["v"])
    assert np.isinf(foe["odds_ratio"]).all()
    np.testing.assert_allclose(foe["published_odds_ratio"], CASE_A["published_or"])
    np.testing.assert_allclose(foe["p_value"], CASE_A["p"], atol=1e-12)


def test_case_a_summary_by_hand():
    summary = metrics.summarize_retrieval(_case_a())
    # map_ap over the 4 queries: (5/6 + 1 + 1 + 1)/4 = 23/24
    assert summary["map_ap"]["value"] == pytest.approx(23 / 24) and summary["map_ap"]["n"] == 4
    # map_interpolated over t0, t1, t4: (47/75 + 63/75 + 57/75)/3 = 167/225
    assert summary["map_interpolated"]["value"] == pytest.approx(167 / 225)
    assert summary["map_interpolated"]["n"] == 3
    # Recall: (1/3 + 1/4 + 1/2 + 1/3)/4 = 17/48 for every k
    for k in (1, 3, 5, 10):
        assert summary[f"recall_top{k}pct"]["value"] == pytest.approx(17 / 48)
        assert summary[f"recall_top{k}pct"]["n"] == 4
    # FoE (published): infinite ORs replaced by v22 = 2, 1, 3, 2 -> mean 2
    assert summary["foe_top1_mean"]["value"] == pytest.approx(2.0) and summary["foe_top1_mean"]["n"] == 4
    # Holm-Sidak: smallest p 1/4 > 1 - 0.95**(1/4) = 0.0127 -> nothing significant, of 4 queries
    assert summary["foe_top1_n_significant"]["value"] == 0 and summary["foe_top1_n_significant"]["n"] == 4
    # the raw sample odds ratios are all infinite (v12 = 0): their median, kept as a diagnostic, is inf
    assert summary["foe_top1_median_raw"]["value"] == np.inf
    assert set(summary) == {
        "foe_top1_mean",
        "foe_top1_median",
        "foe_top1_median_raw",
        "foe_top1_n_significant",
        "map_interpolated",
        "map_ap",
        "recall_top1pct",
        "recall_top3pct",
        "recall_top5pct",
        "recall_top10pct",
    }


def test_summary_labels_say_which_published_variant():
    # DESIGN.md §6: each number is reported with its variant (the report and eval/summary.parquet
    # show these labels next to the values).
    summary = metrics.summarize_retrieval(_case_a(), alpha=0.01)
    assert summary["map_interpolated"]["variant"] == "DeepProfilerExperiments"
    assert summary["map_ap"]["variant"] == "PhenoProfiler"
    assert summary["recall_top5pct"]["variant"] == "PhenoProfiler"
    assert summary["foe_top1_mean"]["variant"] == "published (inf OR -> v22)"
    assert summary["foe_top1_n_significant"]["variant"] == "Holm-Sidak 0.01"
    for name, entry in summary.items():
        assert set(entry) == {"value", "n", "variant", "description"}, name
        assert isinstance(entry["description"], str) and len(entry["description"]) > 20, name
        assert isinstance(entry["n"], int) and isinstance(entry["value"], float), name


def test_summary_of_a_metric_without_queries_is_nan():
    # Every treatment has exactly one partner: no map_interpolated query (needs >= 2), value NaN, n 0;
    # map_ap still has 4 queries.  Pairs (t0, t1) and (t2, t3) of CASE_A_S:
    #   t0 ranks t1 first (.8) -> AP 1;  t1 ranks t0 first (.8) -> AP 1;
    #   t2 ranks t1 .7, t3 .4 -> AP 1/2;  t3 ranks t0 .6, t2 .4 -> AP 1/2.   map_ap = 3/4.
    summary = metrics.summarize_retrieval(
        metrics.retrieval_metrics(CASE_A_S[:4, :4], metrics.moa_match_matrix(["a", "a", "b", "b"]))
    )
    assert np.isnan(summary["map_interpolated"]["value"]) and summary["map_interpolated"]["n"] == 0
    assert summary["map_ap"]["value"] == pytest.approx(3 / 4) and summary["map_ap"]["n"] == 4


def test_case_a_foe_median_after_the_published_rule():
    # OR_i after the rule: 2, 1, 3, 2 -> median 2 (the raw sample odds ratios are all infinite).
    summary = metrics.summarize_retrieval(_case_a())
    assert summary["foe_top1_median"]["value"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- case T: ties (N = 4)
# t0 'a', t1 'a', t2 'b', t3 'a'.  Row 0: t1 .5 (hit) and t2 .5 (miss) tie, t3 .2 (hit).
CASE_T_MOA = ["a", "a", "b", "a"]
CASE_T_S = np.array(
    [
        [1.0, 0.5, 0.5, 0.2],
        [0.5, 1.0, 0.3, 0.1],
        [0.5, 0.3, 1.0, 0.4],
        [0.2, 0.1, 0.4, 1.0],
    ]
)


def test_tied_scores_by_hand():
    # Query 0, thresholds descending .5 {t1, t2}: tp 1, P 1/2, R 1/2;  .2 {+t3}: tp 2, P 2/3, R 1;
    #   -1 (self): P 2/4, R 1.
    # map_ap = sum (R_n - R_n-1) P_n = 1/2*1/2 + 1/2*2/3 = 7/12 (a tie is one threshold, not two ranks).
    # Interpolated: precision [1/2 2/3 1/2 1], recall [1 1 1/2 0], running max [1/2 2/3 2/3 1];
    #   grid [1 2/3 1/3 0]: g0 1/2; g1 1/2 (j -> 2); g2 2/3 (j -> 3); g3 1.  Mean (1/2+1/2+2/3+1)/4 = 2/3.
    # Recall (N = 4 -> n = 1): the tie at the top is broken by column order (stable sort, documented
    #   in metrics.py): t1 comes first, a hit -> 1/(2+1).
    # FoE: others sorted [.2 .5 .5] -> t = .5 + .98*0 = .5; nothing is > .5 -> v = (0, 0, 2, 1):
    #   an empty row, so (NaN, 1.0) as scipy's fisher_exact returns it.
    M = metrics.moa_match_matrix(CASE_T_MOA)
    r = metrics.retrieval_metrics(CASE_T_S, M)
    assert r.average_precision[0] == pytest.approx(7 / 12)
    assert metrics.map_ap_reference(CASE_T_S, M)[0] == pytest.approx(7 / 12)
    assert r.interpolated_precision[0] == pytest.approx(2 / 3)
    assert metrics.interpolated_curve_reference(CASE_T_S, M)[2][0] == pytest.approx(2 / 3)
    assert r.recall[1][0] == pytest.approx(1 / 3)
    assert metrics.recall_reference(CASE_T_S, M)[1][0] == pytest.approx(1 / 3)
    assert r.foe_threshold[0] == pytest.approx(0.5)
    assert r.foe_v[0].tolist() == [0, 0, 2, 1]
    scipy_result = fisher_exact([[0, 0], [2, 1]], alternative="greater")
    assert np.isnan(scipy_result.statistic) and scipy_result.pvalue == 1.0  # the convention we follow
    assert np.isnan(r.foe_odds_ratio[0]) and r.foe_p_value[0] == 1.0


def test_recall_tie_straddling_the_cut_off_takes_columns_in_order():
    # Query 0 of 4: t1 (miss) and t2 (hit) tie at .6 above t3 (hit) .1.  n = 1: the tie straddles the
    # cut-off; column order puts t1 first -> no hit -> 0/(2+1).  Swapping the two columns' labels
    # turns the same scores into a hit -> 1/3.
    S = np.array(
        [
            [1.0, 0.6, 0.6, 0.1],
            [0.6, 1.0, 0.2, 0.3],
            [0.6, 0.2, 1.0, 0.4],
            [0.1, 0.3, 0.4, 1.0],
        ]
    )
    miss_first = metrics.moa_match_matrix(["a", "b", "a", "a"])
    hit_first = metrics.moa_match_matrix(["a", "a", "b", "a"])
    assert metrics.retrieval_metrics(S, miss_first).recall[1][0] == 0.0
    assert metrics.recall_reference(S, miss_first)[1][0] == 0.0
    assert metrics.retrieval_metrics(S, hit_first).recall[1][0] == pytest.approx(1 / 3)
    assert metrics.recall_reference(S, hit_first)[1][0] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- case C (N = 100)
# S[i, j] = 1 - |i - j| / 100, so row 0 ranks t1 > t2 > ... > t99 (scores .99, .98, ..., .01).
# MoA 'a' for t0 and its partners at ranks 1, 3, 4, 8, 10, 50; every other treatment has no label.
N_C = 100
PARTNERS_C = [1, 3, 4, 8, 10, 50]


def _case_c():
    index = np.arange(N_C)
    S = 1.0 - np.abs(index[:, None] - index[None, :]) / 100.0
    moas = ["a" if i in [0, *PARTNERS_C] else "" for i in range(N_C)]
    return S, metrics.moa_match_matrix(moas)


def test_recall_at_each_k_by_hand():
    # N = 100: n = 1, 3, 5, 10 for k = 1, 3, 5, 10.  Row 0 has 6 partners (+ self = 7 in the row sum):
    # hits among ranks 1..n: {1} -> 1, {1,3} -> 2, {1,3,4} -> 3, {1,3,4,8,10} -> 5.
    S, M = _case_c()
    r = metrics.retrieval_metrics(S, M)
    reference = metrics.recall_reference(S, M)
    for k, hits in [(1, 1), (3, 2), (5, 3), (10, 5)]:
        assert r.recall[k][0] == pytest.approx(hits / 7), k
        assert reference[k][0] == pytest.approx(hits / 7), k


def test_average_precision_of_a_long_ranking_by_hand():
    # Hits at ranks 1, 3, 4, 8, 10, 50: precisions 1, 2/3, 3/4, 4/8, 5/10, 6/50;
    # AP = (300 + 200 + 225 + 150 + 150 + 36) / 300 / 6 = 1061/1800.
    S, M = _case_c()
    assert metrics.retrieval_metrics(S, M).average_precision[0] == pytest.approx(1061 / 1800)
    assert metrics.map_ap_reference(S, M)[0] == pytest.approx(1061 / 1800)


def test_foe_top_one_percent_of_a_long_ranking_by_hand():
    # Others of row 0: .01 ... .99 (99 values).  99th percentile: index .99*98 = 97.02 ->
    # .98 + .02*.01 = .9802.  Above it only t1 (.99, a partner): v = (1, 0, 5, 93) (93 = 99 - 6 others
    # of another MoA).  OR infinite -> published v22 = 93.  p = P(X >= 1 | 99, 6 same, 1 drawn) = 6/99.
    S, M = _case_c()
    r = metrics.retrieval_metrics(S, M)
    assert r.foe_threshold[0] == pytest.approx(0.9802)
    assert r.foe_v[0].tolist() == [1, 0, 5, 93]
    assert metrics.published_odds_ratio(r.foe_odds_ratio[:1], r.foe_v[:1, 3])[0] == 93.0
    assert r.foe_p_value[0] == pytest.approx(6 / 99)
    ref = metrics.enrichment_reference(S, M).set_index("query").loc[0]
    assert ref["threshold"] == pytest.approx(0.9802)
    assert [ref.v11, ref.v12, ref.v21, ref.v22] == [1, 0, 5, 93]
    assert ref["published_odds_ratio"] == 93.0 and ref["p_value"] == pytest.approx(6 / 99)


def test_foe_with_a_finite_odds_ratio_by_hand():
    # percentile 90: index .9*98 = 88.2 -> .89 + .2*.01 = .892; above: t1..t10 (10 items), of which
    # 5 partners (1, 3, 4, 8, 10): v = (5, 5, 1, 88); OR = 5*88 / (5*1) = 88 (finite: no quirk).
    # p = P(X >= 5) for X ~ hypergeometric(99 items, 6 partners, 10 drawn), the textbook sum.
    p_expected = sum(comb(6, x) * comb(93, 10 - x) for x in (5, 6)) / comb(99, 10)
    S, M = _case_c()
    r = metrics.retrieval_metrics(S, M, percentile=90.0)
    assert r.foe_threshold[0] == pytest.approx(0.892)
    assert r.foe_v[0].tolist() == [5, 5, 1, 88]
    assert r.foe_odds_ratio[0] == pytest.approx(88.0)
    assert metrics.published_odds_ratio(r.foe_odds_ratio[:1], r.foe_v[:1, 3])[0] == pytest.approx(88.0)
    assert r.foe_p_value[0] == pytest.approx(p_expected, rel=1e-9)
    ref = metrics.enrichment_reference(S, M, percentile=90.0).set_index("query").loc[0]
    assert [ref.v11, ref.v12, ref.v21, ref.v22] == [5, 5, 1, 88]
    assert ref["odds_ratio"] == pytest.approx(88.0) and ref["p_value"] == pytest.approx(p_expected, rel=1e-9)
    assert ref["published_odds_ratio"] == pytest.approx(88.0)  # finite: the rule does not apply


def test_foe_odds_ratio_unequal_to_v22_by_hand():
    # percentile 80 of row 0's others (.01 ... .99): index .8*98 = 78.4 -> .79 + .4*.01 = .794; above it
    # t1..t20 (20 items), 5 of them partners: v = (5, 15, 1, 78); OR = 5*78 / (15*1) = 26 (finite, so
    # the published rule keeps it, not v22 = 78).
    p_expected = sum(comb(6, x) * comb(93, 20 - x) for x in (5, 6)) / comb(99, 20)
    S, M = _case_c()
    r = metrics.retrieval_metrics(S, M, percentile=80.0)
    assert r.foe_v[0].tolist() == [5, 15, 1, 78]
    assert r.foe_odds_ratio[0] == pytest.approx(26.0)
    assert metrics.published_odds_ratio(r.foe_odds_ratio[:1], r.foe_v[:1, 3])[0] == pytest.approx(26.0)
    assert r.foe_p_value[0] == pytest.approx(p_expected, rel=1e-9)
    ref = metrics.enrichment_reference(S, M, percentile=80.0).set_index("query").loc[0]
    assert ref["threshold"] == pytest.approx(0.794)
    assert ref["odds_ratio"] == pytest.approx(26.0) and ref["published_odds_ratio"] == pytest.approx(26.0)


def test_holm_sidak_count_in_the_summary_by_hand():
    # Same S, labels: t0 ~ t1 ('y') and t98 ~ t99 ('z'); nobody else has a label.
    # t0: top other is t1 (.99) -> v = (1, 0, 0, 98), OR inf -> 98, p = 1/99.  t99 likewise (top t98).
    # t1 and t98 have two others tied at .99 -> threshold .99, nothing above: NaN OR, p = 1.
    # Holm-Sidak over the 4 queries, sorted p 1/99, 1/99, 1, 1:
    #   1/99 = .0101 <= 1 - .95**(1/4) = .0127 reject;  .0101 <= 1 - .95**(1/3) = .0170 reject;
    #   1 > 1 - .95**(1/2) stop.  -> 2 significant of 4.  FoE mean over the non-NaN: (98 + 98)/2.
    S, _ = _case_c()
    moas = [""] * N_C
    moas[0], moas[1], moas[98], moas[99] = "y", "y", "z", "z"
    r = metrics.retrieval_metrics(S, metrics.moa_match_matrix(moas))
    np.testing.assert_allclose(r.foe_p_value[[0, 1, 98, 99]], [1 / 99, 1.0, 1.0, 1 / 99])
    summary = metrics.summarize_retrieval(r)
    assert summary["foe_top1_n_significant"]["value"] == 2
    assert summary["foe_top1_n_significant"]["n"] == 4
    assert summary["foe_top1_mean"]["value"] == pytest.approx(98.0)
    assert summary["foe_top1_mean"]["n"] == 2
    # At alpha 0.01: 1/99 > 1 - .99**(1/4) = .0025 -> nothing significant.
    assert metrics.summarize_retrieval(r, alpha=0.01)["foe_top1_n_significant"]["value"] == 0


# ----------------------------------------------------------------------------- cosine, scale invariance


def test_cosine_similarity_by_hand():
    # rows (1,0), (1,1), (0,2), (-3,0), (0,0): cos = dot / (|a||b|); a zero row is 0 to everything.
    profiles = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    h = 1 / np.sqrt(2)
    expected = np.array(
        [
            [1, h, 0, -1, 0],
            [h, 1, h, -h, 0],
            [0, h, 1, 0, 0],
            [-1, -h, 0, 1, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    S = metrics.cosine_similarity_matrix(profiles)
    assert S.dtype == np.float64
    np.testing.assert_allclose(S, expected, atol=1e-12)


def _all_metrics(profiles, moas):
    S = metrics.cosine_similarity_matrix(profiles)
    r = metrics.retrieval_metrics(S, metrics.moa_match_matrix(moas))
    return S, r, metrics.summarize_retrieval(r)


def _scale_test_data():
    """40 treatment profiles around 5 MoA centroids, some with two labels, and a positive scale each."""
    rng = np.random.default_rng(7)
    n = 40
    centroids = rng.standard_normal((5, 8))
    labels = rng.integers(0, 5, n)
    profiles = centroids[labels] + 0.7 * rng.standard_normal((n, 8))
    moas = [f"m{k}" if i % 7 else f"m{k}|m{(k + 1) % 5}" for i, k in enumerate(labels)]
    scales = 10.0 ** rng.uniform(-3, 3, n)  # 1e-3 .. 1e3
    return profiles, moas, scales


def test_every_similarity_metric_is_invariant_to_scaling_a_profile():
    # Cosine ignores each profile's length: multiplying treatment profiles by positive constants
    # changes no similarity and so no metric.  A Euclidean similarity would reorder the neighbours
    # and fail this.
    profiles, moas, scales = _scale_test_data()
    S1, r1, s1 = _all_metrics(profiles, moas)
    S2, r2, s2 = _all_metrics(profiles * scales[:, None], moas)
    np.testing.assert_allclose(S2, S1, atol=1e-12)
    np.testing.assert_allclose(r2.average_precision, r1.average_precision, atol=1e-12)
    np.testing.assert_allclose(r2.interpolated_precision, r1.interpolated_precision, atol=1e-12)
    for k in r1.recall:
        np.testing.assert_allclose(r2.recall[k], r1.recall[k], atol=1e-12)
    np.testing.assert_array_equal(r2.foe_v, r1.foe_v)
    np.testing.assert_allclose(r2.foe_p_value, r1.foe_p_value, atol=1e-12)
    for name in s1:
        assert s2[name]["value"] == pytest.approx(s1[name]["value"], nan_ok=True), name
    # ...and the metrics are not trivially constant: a meaningful ranking was scored.
    assert 0.2 < s1["map_ap"]["value"] < 1.0


def test_euclidean_ranking_would_differ_on_the_scale_test_data():
    # Guard for the previous test: on its data, scaling changes most Euclidean nearest neighbours,
    # so a Euclidean similarity could not pass it by luck.
    profiles, _moas, scales = _scale_test_data()

    def nearest(p):
        d = np.linalg.norm(p[:, None] - p[None], axis=2)
        np.fill_diagonal(d, np.inf)
        return d.argmin(axis=1)

    assert (nearest(profiles) != nearest(profiles * scales[:, None])).sum() > len(profiles) // 2


# ----------------------------------------------------------------------------- inputs


def test_split_moa_handles_spaces_missing_values_and_separators():
    assert metrics.split_moa(" a | b |") == frozenset({"a", "b"})
    assert metrics.split_moa("a;b", sep=";") == frozenset({"a", "b"})
    assert metrics.split_moa("a;b") == frozenset({"a;b"})  # default separator is '|'
    assert metrics.split_moa(None) == frozenset()
    assert metrics.split_moa(float("nan")) == frozenset()
    assert metrics.split_moa("") == frozenset()


def test_match_matrix_with_another_separator():
    M = metrics.moa_match_matrix(["a;b", "b", "c", "a"], sep=";")
    expected = np.array([[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(M, expected)
    assert metrics.moa_match_matrix(["", ""]).tolist() == [[False, False], [False, False]]


def test_similarities_a_rounding_error_above_one_are_clipped():
    # A cosine of 1 + 1e-12 (rounding) must score exactly like 1.0.  Case A with t1 (a partner of t0)
    # and t3 (not one) both at the top of row 0: once clipped they tie, and the tie goes to the lower
    # column, t1: Recall@1 of t0 stays 1/3.  Unclipped, t3 would come first and give 0.
    exact = CASE_A_S.copy()
    exact[0, 1] = exact[1, 0] = exact[0, 3] = exact[3, 0] = 1.0
    rounded = exact.copy()
    rounded[0, 3] = rounded[3, 0] = 1.0 + 1e-12
    rounded[0, 0] = 1.0 + 2e-12
    M = metrics.moa_match_matrix(CASE_A_MOA)
    clipped, reference = metrics.retrieval_metrics(rounded, M), metrics.retrieval_metrics(exact, M)
    assert reference.recall[1][0] == pytest.approx(1 / 3)
    for k in (1, 3, 5, 10):
        np.testing.assert_array_equal(clipped.recall[k], reference.recall[k])
        np.testing.assert_array_equal(metrics.recall_reference(rounded, M)[k], reference.recall[k])
    np.testing.assert_array_equal(clipped.foe_threshold, reference.foe_threshold)
    np.testing.assert_array_equal(clipped.average_precision, reference.average_precision)
    np.testing.assert_array_equal(metrics.map_ap_reference(rounded, M), reference.average_precision)


def test_similarities_a_rounding_error_below_minus_one_are_clipped():
    # N = 3: row 0's others are t1 at -1 - 1e-12 and t2 at .5; the 99th percentile interpolates between
    # them (-1 + .99 * 1.5 = .485), so an unclipped -1 - 1e-12 would shift it.  Results must be identical.
    exact = np.array([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.2], [0.5, 0.2, 1.0]])
    rounded = exact.copy()
    rounded[0, 1] = rounded[1, 0] = -1.0 - 1e-12
    M = metrics.moa_match_matrix(["a", "a", "b"])
    ours, expected = metrics.enrichment_reference(rounded, M), metrics.enrichment_reference(exact, M)
    assert expected["threshold"].iloc[0] == pytest.approx(0.485)
    np.testing.assert_array_equal(ours["threshold"], expected["threshold"])
    np.testing.assert_array_equal(
        metrics.retrieval_metrics(rounded, M).foe_threshold, metrics.retrieval_metrics(exact, M).foe_threshold
    )
    # Recall over all others (k = 100): row 0 takes both others and so finds its partner t1 even at
    # -1 - 1e-12: 1/(1+1).  (Unclipped, t1 would sort below self and be missed at the cut-off.)
    for S in (rounded, exact):
        assert metrics.retrieval_metrics(S, M, recall_percents=(100,)).recall[100][0] == pytest.approx(1 / 2)
        assert metrics.recall_reference(S, M, percents=(100,))[100][0] == pytest.approx(1 / 2)


def test_an_integer_match_matrix_means_the_same_as_a_boolean_one():
    M = metrics.moa_match_matrix(CASE_A_MOA)
    as_int = M.astype(np.int64)  # 0/1, e.g. read back from a table
    r = metrics.retrieval_metrics(CASE_A_S, as_int)
    np.testing.assert_allclose(r.average_precision, CASE_A["ap"], atol=1e-12)
    np.testing.assert_array_equal(r.foe_v[QUERIES_A], CASE_A["v"])
    foe = metrics.enrichment_reference(CASE_A_S, as_int)
    np.testing.assert_array_equal(foe[["v11", "v12", "v21", "v22"]].to_numpy(), CASE_A["v"])
    np.testing.assert_allclose(metrics.map_ap_reference(CASE_A_S, as_int), CASE_A["ap"], atol=1e-12)
    np.testing.assert_allclose(metrics.recall_reference(CASE_A_S, as_int)[1], CASE_A["recall"], atol=1e-12)
    per_query = metrics.interpolated_curve_reference(CASE_A_S, as_int)[2]
    np.testing.assert_allclose(per_query, CASE_A["interpolated"], atol=1e-12)


def test_a_float_match_matrix_and_float32_similarities_are_accepted():
    # Tables read back from Parquet give 0.0/1.0 matches and float32 similarities: the same numbers
    # as the boolean / float64 inputs (the computation runs in float64 either way).
    M = metrics.moa_match_matrix(CASE_A_MOA)
    S32 = CASE_A_S.astype(np.float32)
    as_float = M.astype(np.float64)
    foe = metrics.enrichment_reference(S32, as_float)
    np.testing.assert_array_equal(foe[["v11", "v12", "v21", "v22"]].to_numpy(), CASE_A["v"])
    expected = metrics.enrichment_reference(S32.astype(np.float64), M)
    np.testing.assert_array_equal(foe["threshold"], expected["threshold"])
    r = metrics.retrieval_metrics(S32, as_float)
    np.testing.assert_array_equal(
        r.foe_threshold, metrics.retrieval_metrics(S32.astype(np.float64), M).foe_threshold
    )


def test_foe_table_is_integer_and_marks_non_queries():
    r = _case_a()
    assert r.foe_v.dtype.kind == "i"  # counts
    assert r.foe_v[3].tolist() == [-1, -1, -1, -1]  # t3 is not a query (an int table cannot hold NaN)


def test_all_treatments_sharing_one_moa_by_hand():
    # N = 3, one MoA, distinct scores: every query's two others are both partners.  This is the worked
    # example of interpolated_curve_reference's docstring (DeepProfilerExperiments walk):
    # precision [2/3 1 1 1], recall [1 1 .5 0], grid [1 .5 0] -> curve [2/3, 2/3, 1], mean 7/9.
    # map_ap = 1 (both partners outrank self); Recall@1: the top other is a partner -> 1/(2+1).
    S = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.5], [0.1, 0.5, 1.0]])
    M = metrics.moa_match_matrix(["a", "a", "a"])
    r = metrics.retrieval_metrics(S, M)
    np.testing.assert_allclose(r.interpolated_precision, [7 / 9] * 3, atol=1e-12)
    np.testing.assert_allclose(metrics.interpolated_curve_reference(S, M)[2], [7 / 9] * 3, atol=1e-12)
    np.testing.assert_allclose(r.average_precision, [1.0] * 3, atol=1e-12)
    np.testing.assert_allclose(r.recall[1], [1 / 3] * 3, atol=1e-12)


def test_recall_tie_with_a_single_partner():
    # N = 3, t0 and t1 share 'a'.  Row 0: t1 (partner) and t2 tie at .5; n = 1, the tie straddles the
    # cut-off and goes to the lower column, t1: Recall@1 = 1/(1+1).
    S = np.array([[1.0, 0.5, 0.5], [0.5, 1.0, 0.2], [0.5, 0.2, 1.0]])
    M = metrics.moa_match_matrix(["a", "a", "b"])
    assert metrics.retrieval_metrics(S, M).recall[1][0] == pytest.approx(1 / 2)
    assert metrics.recall_reference(S, M)[1][0] == pytest.approx(1 / 2)


def test_recall_of_every_other_treatment_by_hand():
    # k = 100: n = N = 4 is capped at the N - 1 = 3 others.  Case T row 0 ranks t1 (hit), t2, t3 (hit):
    # all 2 partners are found -> 2/(2+1).
    M = metrics.moa_match_matrix(CASE_T_MOA)
    assert metrics.retrieval_metrics(CASE_T_S, M, recall_percents=(100,)).recall[100][0] == pytest.approx(
        2 / 3
    )
    assert metrics.recall_reference(CASE_T_S, M, percents=(100,))[100][0] == pytest.approx(2 / 3)


def test_interpolated_reference_without_any_query():
    # Nobody has two partners: no curve to average; the mean curve is NaN at every one of the N points.
    M = metrics.moa_match_matrix(["a", "a", "b", "b"])
    grid, curve, per_query = metrics.interpolated_curve_reference(CASE_A_S[:4, :4], M)
    assert grid.shape == (4,) and curve.shape == (4,)
    assert np.isnan(curve).all() and np.isnan(per_query).all()


def test_cosine_similarity_is_computed_in_float64():
    profiles = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    S = metrics.cosine_similarity_matrix(profiles)
    assert S.dtype == np.float64
    assert S[0, 1] == pytest.approx(10 / 14, abs=1e-12)  # (3 + 4 + 3) / (sqrt(14) * sqrt(14))


@pytest.mark.parametrize(
    "S, M, message",
    [
        (np.zeros((2, 3)), np.zeros((2, 3), dtype=bool), "square"),
        (np.zeros(4), np.zeros(4, dtype=bool), "square"),
        (np.eye(3), np.eye(2, dtype=bool), "shape"),
        (np.ones((1, 1)), np.ones((1, 1), dtype=bool), "^need at least 2 treatments$"),
        (
            np.array([[1.0, np.inf], [np.inf, 1.0]]),
            np.eye(2, dtype=bool),
            "^similarity matrix has NaN or infinite values$",
        ),
    ],
)
def test_bad_matrices_are_rejected_by_every_entry_point(S, M, message):
    for function in (
        metrics.retrieval_metrics,
        metrics.map_ap_reference,
        metrics.recall_reference,
        metrics.enrichment_reference,
        metrics.interpolated_curve_reference,
    ):
        with pytest.raises(ValueError, match=message):
            function(S, M)


def test_fisher_vectorised_conventions_by_hand():
    # Tables [[v11, v12], [v21, v22]]:
    #   [[2, 1], [1, 4]]: OR = 2*4/(1*1) = 8; p = P(X >= 2 | 8 items, 3 in column 1, 3 drawn)
    #                     = [C(3,2)C(5,1) + C(3,3)C(5,0)] / C(8,3) = 16/56.
    #   [[0, 3], [2, 1]]: OR = 0; p = P(X >= 0) = 1.
    #   [[1, 2], [0, 0]]: second row empty -> (NaN, 1).
    #   [[1, 0], [0, 2]]: OR inf (v12 = v21 = 0); p = P(X >= 1 | 3, 1, 1) = 1/3.
    odds, p = metrics.fisher_greater([2, 0, 1, 1], [1, 3, 2, 0], [1, 2, 0, 0], [4, 1, 0, 2])
    assert odds[0] == pytest.approx(8.0) and p[0] == pytest.approx(16 / 56)
    assert odds[1] == 0.0 and p[1] == pytest.approx(1.0)
    assert np.isnan(odds[2]) and p[2] == 1.0
    assert np.isinf(odds[3]) and p[3] == pytest.approx(1 / 3)
    assert metrics.published_odds_ratio(odds, [4, 1, 0, 2]).tolist()[:2] == [8.0, 0.0]
    assert metrics.published_odds_ratio(odds, [4, 1, 0, 2])[3] == 2.0
    assert np.isnan(metrics.published_odds_ratio(odds, [4, 1, 0, 2])[2])  # NaN stays NaN
    # Empty columns (nothing of one MoA class) and equal v12 = v22 (not an empty margin):
    #   [[0, 3], [0, 1]] and [[2, 0], [3, 0]] -> (NaN, 1);
    #   [[2, 1], [1, 1]]: OR = 2*1/(1*1) = 2; p = P(X >= 2 | 5, 3, 3) = [C(3,2)C(2,1) + C(3,3)] / C(5,3) = 7/10.
    odds, p = metrics.fisher_greater([0, 2, 2], [3, 0, 1], [0, 3, 1], [1, 0, 1])
    assert np.isnan(odds[0]) and p[0] == 1.0
    assert np.isnan(odds[1]) and p[1] == 1.0
    assert odds[2] == pytest.approx(2.0) and p[2] == pytest.approx(0.7)
    for table, (o, pv) in zip([[[0, 3], [0, 1]], [[2, 0], [3, 0]], [[2, 1], [1, 1]]], zip(odds, p)):
        scipy_result = fisher_exact(table, alternative="greater")
        assert (np.isnan(o) and np.isnan(scipy_result.statistic)) or o == pytest.approx(
            scipy_result.statistic
        )
        assert pv == pytest.approx(scipy_result.pvalue)


def test_holm_sidak_edge_cases_by_hand():
    empty = metrics.holm_sidak_reject(np.array([]))
    assert empty.tolist() == [] and empty.dtype == bool  # a mask, even when empty
    # p = 0 is always significant; 0.05 alone: 1 - 0.95**1 = 0.05, so p <= 0.05 rejects.
    assert metrics.holm_sidak_reject(np.array([0.0, 0.5])).tolist() == [True, False]
    assert metrics.holm_sidak_reject(np.array([0.04]), alpha=0.05).tolist() == [True]
    assert metrics.holm_sidak_reject(np.array([0.04]), alpha=0.01).tolist() == [False]


def test_block_size_does_not_change_any_number():
    # Rows are processed in blocks; case A in blocks of 1, 2 and 5 rows must give the hand values.
    M = metrics.moa_match_matrix(CASE_A_MOA)
    for block_rows in (1, 2, 5):
        r = metrics.retrieval_metrics(CASE_A_S, M, block_rows=block_rows)
        np.testing.assert_allclose(r.average_precision, CASE_A["ap"], atol=1e-12)
        np.testing.assert_allclose(r.interpolated_precision, CASE_A["interpolated"], atol=1e-12)
        np.testing.assert_allclose(r.recall[1], CASE_A["recall"], atol=1e-12)
        np.testing.assert_array_equal(r.foe_v[QUERIES_A], CASE_A["v"])


def test_recall_percents_option_by_hand():
    # Only the asked-for k; N = 100 row 0 of case C with k = 2 -> n = 2: ranks {1, 2} -> 1 hit -> 1/7.
    S, M = _case_c()
    r = metrics.retrieval_metrics(S, M, recall_percents=(2,))
    assert sorted(r.recall) == [2]
    assert r.recall[2][0] == pytest.approx(1 / 7)
    assert metrics.recall_reference(S, M, percents=(2,))[2][0] == pytest.approx(1 / 7)
    assert metrics.DEFAULT_RECALL_PERCENTS == (1, 3, 5, 10)  # the paper's k
