"""Retrieval metrics on treatment profiles (DESIGN.md §6): pure functions over arrays.

Everything here takes a similarity matrix ``S`` (N × N, cosine between treatment profiles) and a
boolean MoA-match matrix ``M`` (``M[i, j]`` = treatments i and j share at least one MoA label) and
returns per-query numbers; :mod:`phenoprofiler_core.evaluate` turns them into files.

Two implementations are kept side by side on purpose:

* :func:`retrieval_metrics` — the one the pipeline uses: one ``argsort`` per block of query rows,
  then cumulative sums and gathers, no Python loop over queries.
* ``*_reference`` functions — a plain loop over queries that calls the same library routines the
  published code calls (``scipy.stats.fisher_exact``, scikit-learn's ``average_precision_score`` and
  ``precision_recall_curve``).  They are slow and obviously correct; tests and
  ``bench/bench_metrics.py`` check that both agree.

Published behaviours reproduced on purpose (so numbers are comparable with the papers):

* FoE: an infinite sample odds ratio is replaced by the count of (sim ≤ t, other MoA) — the quirk in
  PhenoProfiler's ``enrichment_analysis``; a NaN odds ratio (a margin of the table is empty) stays NaN
  as scipy returns it and is left out of the mean.
* ``map_interpolated``: DeepProfilerExperiments ``profiling/metrics.py``
  ``interpolated_precision_recall_curve`` with its one-step-lagged walk over the recall grid; queries
  need ≥ 2 other same-MoA treatments.  The curve is scikit-learn's current
  ``precision_recall_curve`` (full curve down to the lowest threshold; older scikit-learn releases
  stopped it at full recall, which changes only the first two grid points).
* ``map_ap``: mean of ``average_precision_score(M[i], S[i])`` with self set to (False, −1).
* Recall@k%: ``n = max(int(N·k/100), 1)`` hits after self, divided by the row sum of M *including*
  self.  Ties in similarity at the cut-off are broken by column order (a stable sort); the published
  code used numpy's default unstable sort, so only exact ties can differ.

Similarities are clipped to [−1, 1] first (cosine can leave the range by a rounding error), which
also makes the self entry (−1) the minimum of its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import hypergeom

DEFAULT_RECALL_PERCENTS = (1, 3, 5, 10)
# FoE counts neighbours above the 99th percentile of a query's similarities: the top 1 % (DESIGN.md §6)
DEFAULT_FOE_PERCENTILE = 99.0

# ----------------------------------------------------------------------------- inputs


def split_moa(moa: str | None, sep: str = "|") -> frozenset[str]:
    """Labels of one MoA string ('a|b' -> {'a', 'b'}); empty/None -> no label."""
    if moa is None or (isinstance(moa, float) and np.isnan(moa)):
        return frozenset()
    return frozenset(label.strip() for label in str(moa).split(sep) if label.strip())


def moa_match_matrix(moas: Sequence[str], sep: str = "|") -> np.ndarray:
    """``M[i, j]`` is True when treatments i and j share ANY single MoA label.

    Multi-label strings are split on ``sep`` first: matching whole strings (the seed code's bug)
    would call 'a|b' and 'a' different MoAs.  A treatment without labels matches nothing, not even
    itself.
    """
    label_sets = [split_moa(m, sep) for m in moas]
    vocabulary = sorted(set().union(*label_sets)) if label_sets else []
    column = {label: k for k, label in enumerate(vocabulary)}
    indicator = np.zeros((len(label_sets), max(len(vocabulary), 1)), dtype=np.float32)
    for i, labels in enumerate(label_sets):
        for label in labels:
            indicator[i, column[label]] = 1.0
    return (indicator @ indicator.T) > 0


def cosine_similarity_matrix(profiles: np.ndarray) -> np.ndarray:
    """Cosine similarity between rows (float64); a zero row has similarity 0 to everything."""
    from sklearn.metrics.pairwise import cosine_similarity

    return cosine_similarity(np.asarray(profiles, dtype=np.float64))


def _validated(
    similarity: np.ndarray, moa_match: np.ndarray, clip: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    S = np.asarray(similarity, dtype=np.float64)
    M = np.asarray(moa_match, dtype=bool)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"similarity matrix must be square, got shape {S.shape}")
    if M.shape != S.shape:
        raise ValueError(f"MoA match matrix shape {M.shape} differs from similarity shape {S.shape}")
    if S.shape[0] < 2:
        raise ValueError("need at least 2 treatments")
    if not np.isfinite(S).all():
        raise ValueError("similarity matrix has NaN or infinite values")
    if clip and (S.min() < -1.0 or S.max() > 1.0):  # copy only when a rounding error left the range
        S = np.clip(S, -1.0, 1.0)
    return S, M


# ----------------------------------------------------------------------------- Fisher test


def fisher_greater(v11, v12, v21, v22) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised one-sided (greater) Fisher exact test on 2×2 tables [[v11, v12], [v21, v22]].

    Same conventions as ``scipy.stats.fisher_exact(table, alternative="greater")``: sample odds
    ratio v11·v22 / (v12·v21), ``inf`` when the denominator is 0, and (NaN, 1.0) when a row or column
    of the table sums to 0.  The p-value is the hypergeometric tail scipy uses.
    """
    v11, v12, v21, v22 = (np.asarray(v, dtype=np.int64) for v in (v11, v12, v21, v22))
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = np.where((v21 > 0) & (v12 > 0), (v11 * v22) / (v21 * v12), np.inf)
    n1 = v11 + v12
    n2 = v21 + v22
    p = hypergeom.cdf(v12, n1 + n2, n1, v12 + v22)
    p = np.minimum(np.asarray(p, dtype=np.float64), 1.0)
    empty = (n1 == 0) | (n2 == 0) | (v11 + v21 == 0) | (v12 + v22 == 0)
    odds = np.where(empty, np.nan, odds).astype(np.float64)
    p = np.where(empty, 1.0, p)
    return odds, p


def published_odds_ratio(odds: np.ndarray, v22: np.ndarray) -> np.ndarray:
    """FoE quirk of the published code: an infinite odds ratio is replaced by v22."""
    odds = np.asarray(odds, dtype=np.float64)
    return np.where(np.isinf(odds), np.asarray(v22, dtype=np.float64), odds)


def holm_sidak_reject(p_values: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Which p-values stay significant after Holm–Šidak step-down correction."""
    from statsmodels.stats.multitest import multipletests

    p_values = np.asarray(p_values, dtype=np.float64)
    if p_values.size == 0:
        return np.zeros(0, dtype=bool)
    with np.errstate(divide="ignore"):  # p = 0 makes statsmodels take log(0); the result is right
        reject, _, _, _ = multipletests(p_values, alpha=alpha, method="holm-sidak")
    return reject


# ----------------------------------------------------------------------------- vectorised


@dataclass
class RetrievalResult:
    """Per-query results of :func:`retrieval_metrics` (arrays of length N, NaN where not a query)."""

    n_positives: np.ndarray  # other treatments sharing a MoA label
    foe_v: np.ndarray  # (N, 4) table v11, v12, v21, v22 at the top-percentile threshold
    foe_threshold: np.ndarray
    foe_odds_ratio: np.ndarray  # sample odds ratio as scipy returns it (inf / NaN possible)
    foe_p_value: np.ndarray
    average_precision: np.ndarray  # map_ap per query
    interpolated_precision: np.ndarray  # map_interpolated per query (mean of its lagged curve)
    recall: dict[int, np.ndarray]  # percent -> recall per query


def _ragged_suffix_max_exclusive(
    values: np.ndarray, row: np.ndarray, position: np.ndarray, n_rows: int
) -> np.ndarray:
    """For entries grouped by ``row`` (``position`` = index within the row), max over later entries."""
    width = int(position.max()) + 2 if position.size else 1
    padded = np.full((n_rows, width), -np.inf)
    padded[row, position] = values
    suffix = np.maximum.accumulate(padded[:, ::-1], axis=1)[:, ::-1]
    return suffix[row, position + 1]


def _block_metrics(S_block, M_block, rows, n_total, percentile, recall_percents, lin):
    """All metrics for query rows ``rows`` (S_block/M_block are those rows, self already blanked).

    Only the similarity VALUES are sorted (no argsort, no gathers): everything a threshold curve
    needs about a positive is how many items score >= / > it, found by binary search in its sorted
    row, and how many positives score >= it.  Ties therefore behave exactly like scikit-learn's
    threshold curves, whatever order a sort would put them in.
    """
    C, N = S_block.shape
    positives = M_block.sum(axis=1)
    vals = np.sort(S_block, axis=1)  # ascending; self (-1) is a row minimum
    # The similarities to the OTHER treatments: the sorted row minus one -1 (self or an equal value).
    others = vals[:, 1:]

    prow, pcol = np.nonzero(M_block)
    svals = S_block[prow, pcol]
    o = np.lexsort((-svals, prow))  # within each row, best-scored positive first
    prow, svals = prow[o], svals[o]
    row_start = np.concatenate([[0], np.cumsum(positives)[:-1]]).astype(np.int64)
    ppos = np.arange(prow.size) - row_start[prow]
    n_ge = np.empty(prow.size)
    n_gt = np.empty(prow.size)
    for r in np.nonzero(positives)[0]:
        seg = slice(row_start[r], row_start[r] + positives[r])
        n_ge[seg] = N - np.searchsorted(vals[r], svals[seg], side="left")
        n_gt[seg] = N - np.searchsorted(vals[r], svals[seg], side="right")
    # positives scored >= this one (tp at its threshold): end of its run of equal scores.
    same_as_next = np.zeros(prow.size, dtype=bool)
    same_as_next[:-1] = (prow[1:] == prow[:-1]) & (svals[1:] == svals[:-1])
    run_end = np.where(same_as_next, prow.size, np.arange(prow.size))
    run_end = np.minimum.accumulate(run_end[::-1])[::-1] if prow.size else run_end
    level = (run_end - row_start[prow] + 1).astype(np.float64)

    # --- map_ap: sklearn's step integral = mean over positives of precision at their threshold.
    precision_hit = level / n_ge
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.bincount(prow, weights=precision_hit, minlength=C) / positives
    ap = np.where(positives >= 1, ap, np.nan)

    # --- map_interpolated (DeepProfilerExperiments walk).  Curve points are score groups; the value
    # stored at grid point g >= 1 is the running max of precision from the lowest threshold up to the
    # first point whose recall is <= grid[g-1].  That point is the lowest-threshold point of the
    # largest reached tp level T with T/P <= grid[g-1], so the value is
    #   max(best hit precision of any higher level, precision of that first point of level T),
    # and the first point of level T has as many items as score above the next positive.
    # Grid point 0 gets the precision at the lowest threshold, P/N.
    P = positives.astype(np.float64)
    interp_sum = np.zeros(C)
    if prow.size:
        is_last = np.ones(prow.size, dtype=bool)
        is_last[:-1] = prow[1:] != prow[:-1]
        nxt = np.minimum(np.arange(prow.size) + 1, prow.size - 1)
        n_gt_next = np.where(is_last, float(N), n_gt[nxt])
        level_next = np.where(is_last, np.inf, level[nxt])
        best_higher = np.maximum(_ragged_suffix_max_exclusive(precision_hit, prow, ppos, C), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            first_point = np.where(n_gt_next > 0, level / n_gt_next, 0.0)
            p_row = P[prow]
            # Grid indices h in [1, N-1] (grid[g-1] = lin[N-g]) whose value is in [T/P, T_next/P).
            lo = np.clip(np.searchsorted(lin, level / p_row, side="left"), 1, n_total)
            hi = np.clip(np.searchsorted(lin, level_next / p_row, side="left"), 1, n_total)
        weight = (hi - lo).astype(np.float64)
        contribution = np.where(weight > 0, weight * np.maximum(best_higher, first_point), 0.0)
        interp_sum += np.bincount(prow, weights=contribution, minlength=C)
        # Level 0 (recall 0): the curve's appended point (precision 1) is its first point unless some
        # negatives outrank every positive (then a real point with precision 0 comes first).
        is_first = ppos == 0
        f_rows = prow[is_first]
        level0_first = np.where(n_gt[is_first] == 0, 1.0, 0.0)
        best_all = np.zeros(C)
        np.maximum.at(best_all, prow, precision_hit)
        hi0 = np.clip(np.searchsorted(lin, level[is_first] / P[f_rows], side="left"), 1, n_total)
        weight0 = (hi0 - 1).astype(np.float64)
        interp_sum[f_rows] += np.where(weight0 > 0, weight0 * np.maximum(best_all[f_rows], level0_first), 0.0)
    interp = (interp_sum + P / N) / n_total
    interp = np.where(positives >= 2, interp, np.nan)

    # --- FoE at the top (100 - percentile)%: threshold from the similarities to the other treatments.
    threshold = np.percentile(others, percentile, axis=1)
    # The rows are sorted and the threshold lies at or above the value at floor(virtual index), so
    # only the columns from there on can be above it: count there, not along the whole row.
    lo = max(int(np.floor((N - 2) * percentile / 100)) - 1, 0)
    above = (others[:, lo:] > threshold[:, None]).sum(axis=1)
    v11 = np.bincount(prow, weights=svals > threshold[prow], minlength=C).astype(np.int64)
    v12 = above - v11
    v21 = positives - v11
    v22 = (N - 1) - v11 - v12 - v21
    odds, pval = fisher_greater(v11, v12, v21, v22)

    # --- Recall@k%: hits among the n best other treatments; ties at the cut-off by column order.
    recalls = {}
    for percent in recall_percents:
        n = min(max(int(n_total * percent / 100), 1), N - 1)
        j0 = (N - 1) - n
        cut = others[:, j0]  # n-th largest similarity to another treatment
        # Sorted rows: values above the cut lie after j0; values equal to it reach below j0 only
        # where the value just below j0 equals it (a tie), counted row by row.
        tail = others[:, j0:]
        n_greater = (tail > cut[:, None]).sum(axis=1)
        n_equal = (tail == cut[:, None]).sum(axis=1)
        if j0 > 0:
            for r in np.nonzero(others[:, j0 - 1] == cut)[0]:
                n_equal[r] += int((others[r, :j0] == cut[r]).sum())
        hits = np.bincount(prow, weights=svals > cut[prow], minlength=C)
        ties_pos = np.bincount(prow, weights=svals == cut[prow], minlength=C)
        need = n - n_greater
        hits = hits + np.where(n_equal == need, ties_pos, 0.0)
        for r in np.nonzero((n_equal > need) & (positives >= 1))[0]:
            # Only rows with a tie straddling the cut-off: take the first `need` by column.
            row_s = S_block[r].copy()
            row_s[rows[r]] = np.nan  # self is not a candidate
            tied = np.nonzero(row_s == cut[r])[0][: need[r]]
            hits[r] += M_block[r, tied].sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls[percent] = np.where(positives >= 1, hits / (positives + 1), np.nan)

    foe_v = np.stack([v11, v12, v21, v22], axis=1)
    is_query = positives >= 1
    return dict(
        n_positives=positives,
        foe_v=np.where(is_query[:, None], foe_v, -1),
        foe_threshold=np.where(is_query, threshold, np.nan),
        foe_odds_ratio=np.where(is_query, odds, np.nan),
        foe_p_value=np.where(is_query, pval, np.nan),
        average_precision=ap,
        interpolated_precision=interp,
        recall=recalls,
    )


def _stack_blocks(parts: list[dict], recall_percents: Sequence[int]) -> RetrievalResult:
    cat = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    return RetrievalResult(
        n_positives=cat("n_positives"),
        foe_v=np.concatenate([p["foe_v"] for p in parts], axis=0),
        foe_threshold=cat("foe_threshold"),
        foe_odds_ratio=cat("foe_odds_ratio"),
        foe_p_value=cat("foe_p_value"),
        average_precision=cat("average_precision"),
        interpolated_precision=cat("interpolated_precision"),
        recall={k: np.concatenate([p["recall"][k] for p in parts]) for k in recall_percents},
    )


def retrieval_metrics(
    similarity: np.ndarray,
    moa_match: np.ndarray,
    *,
    percentile: float = DEFAULT_FOE_PERCENTILE,
    recall_percents: Sequence[int] = DEFAULT_RECALL_PERCENTS,
    block_rows: int = 512,
) -> RetrievalResult:
    """FoE table, both MAP flavours and Recall@k% for every query row of a given S and M.

    Rows are processed in blocks of ``block_rows``; S and M themselves are N × N, so this form is
    for small N and for checking :func:`retrieval_metrics_from_profiles`, which never holds them.
    """
    S, M = _validated(similarity, moa_match, clip=False)  # clipped block by block, in place
    N = S.shape[0]
    lin = np.linspace(0.0, 1.0, num=N)  # the published recall grid, ascending
    parts = []
    for start in range(0, N, block_rows):
        rows = np.arange(start, min(start + block_rows, N))
        S_block = np.clip(S[rows], -1.0, 1.0, out=np.empty((rows.size, N)))
        M_block = M[rows]  # fancy indexing copies
        S_block[np.arange(rows.size), rows] = -1.0
        M_block[np.arange(rows.size), rows] = False
        parts.append(_block_metrics(S_block, M_block, rows, N, percentile, tuple(recall_percents), lin))
    return _stack_blocks(parts, recall_percents)


def unit_rows(profiles: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64); a zero row stays zero (cosine 0 to everything, as
    scikit-learn's ``cosine_similarity``)."""
    X = np.asarray(profiles, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1)
    norms[norms == 0] = 1.0
    return X / norms[:, None]


def label_indicator(moas: Sequence[str], sep: str = "|"):
    """Sparse (N × labels) 0/1 matrix: row i has a 1 for each of its MoA labels."""
    from scipy.sparse import csr_matrix

    label_sets = [split_moa(m, sep) for m in moas]
    vocabulary = sorted(set().union(*label_sets)) if label_sets else []
    column = {label: k for k, label in enumerate(vocabulary)}
    rows = np.repeat(np.arange(len(label_sets)), [len(s) for s in label_sets])
    cols = np.array([column[label] for labels in label_sets for label in sorted(labels)], dtype=np.int64)
    data = np.ones(rows.size, dtype=np.float32)
    return csr_matrix((data, (rows, cols)), shape=(len(label_sets), max(len(vocabulary), 1))), vocabulary


def rows_per_block(n_columns: int, *, block_bytes: int = 256 * 2**20, max_rows: int = 512) -> int:
    """Query rows per block so one float64 block of similarities stays near ``block_bytes``."""
    return int(max(1, min(max_rows, block_bytes // (8 * max(n_columns, 1)))))


def retrieval_metrics_from_profiles(
    profiles: np.ndarray,
    moas: Sequence[str],
    *,
    sep: str = "|",
    percentile: float = DEFAULT_FOE_PERCENTILE,
    recall_percents: Sequence[int] = DEFAULT_RECALL_PERCENTS,
    block_rows: int | None = None,
) -> RetrievalResult:
    """:func:`retrieval_metrics` of the cosine similarities of ``profiles`` and the MoA matches of
    ``moas``, without ever holding an N × N matrix.

    Each block of query rows gets its similarity rows (one matrix product with the unit profiles)
    and its MoA-match rows (a sparse product of label indicators), so memory is
    O(block_rows × N + N × dim) however many treatments there are; time is O(N² × dim), as every
    pair must be scored once.
    """
    unit = unit_rows(profiles)
    N = unit.shape[0]
    if N < 2:
        raise ValueError("need at least 2 treatments")
    if len(moas) != N:
        raise ValueError(f"{len(moas)} MoA strings for {N} profiles")
    if not np.isfinite(unit).all():
        raise ValueError("profiles have NaN or infinite values")
    indicator, _ = label_indicator(moas, sep)
    indicator_t = indicator.T.tocsr()
    block_rows = block_rows or rows_per_block(N)
    lin = np.linspace(0.0, 1.0, num=N)
    parts = []
    for start in range(0, N, block_rows):
        rows = np.arange(start, min(start + block_rows, N))
        S_block = unit[rows] @ unit.T
        np.clip(S_block, -1.0, 1.0, out=S_block)
        M_block = (indicator[rows] @ indicator_t).toarray() > 0
        S_block[np.arange(rows.size), rows] = -1.0
        M_block[np.arange(rows.size), rows] = False
        parts.append(_block_metrics(S_block, M_block, rows, N, percentile, tuple(recall_percents), lin))
        del S_block, M_block
    return _stack_blocks(parts, recall_percents)


# ----------------------------------------------------------------------------- copairs AP, block-wise
#
# copairs (``copairs.map.average_precision``) lists every positive and negative pair and ranks each
# profile's pairs; for activity that is (treatment wells × control wells) pairs and for MoA
# consistency (treatments²) pairs, held in memory at once (plus a duckdb self-join for the
# multilabel form): O(N²) memory at JUMP size.  The functions below compute the same average
# precisions query block by query block.  They follow copairs' conventions exactly, so its
# ``mean_average_precision`` (null distributions, p-values, BH) runs unchanged on their output:
#   * similarity = cosine of the float64 profiles, stored as float32; ranks sort by (1 - sim) in
#     float32, and a positive tied with a negative ranks first;
#   * AP = mean over the positives (best first, k = 1..P) of k / (k + negatives ranked before it);
#   * n_pos_pairs = P, n_total_pairs = P + negatives; a query without negatives has AP 1.
# tests/test_metrics.py checks both against copairs itself.

_KEY_SPAN = 4.0  # keys (1 - cosine) lie in [0, 2] (+ float32 rounding); rows are offset by 4


def _unit(X: np.ndarray, rows) -> np.ndarray:
    """Rows of X as float64 unit vectors, computed as copairs' cosine does (a zero row gives NaN).

    Element for element the same as normalizing the whole float64 matrix, so callers can keep X in
    its stored precision (float32 profiles: half the memory) and normalize block by block.
    """
    block = np.asarray(X[rows], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return block / np.linalg.norm(block, axis=1)[:, None]


def _keys(query_unit: np.ndarray, candidate_unit: np.ndarray) -> np.ndarray:
    """copairs' ranking keys 1 - sim, with sim the float32 cosine."""
    sims = (query_unit @ candidate_unit.T).astype(np.float32)
    return np.float32(1.0) - sims


def _pair_keys(X: np.ndarray, first: np.ndarray, second: np.ndarray, chunk: int) -> np.ndarray:
    """Keys of the pairs (first[i], second[i]) by row-wise dot products, a chunk of pairs at a time."""
    out = np.empty(first.size, dtype=np.float32)
    for start in range(0, first.size, chunk):
        a = _unit(X, first[start : start + chunk])
        b = _unit(X, second[start : start + chunk])
        out[start : start + chunk] = np.float32(1.0) - np.einsum("ij,ij->i", a, b).astype(np.float32)
    return out


def _before_sorted(pos_keys: np.ndarray, neg_row: np.ndarray, neg_sorted: np.ndarray) -> np.ndarray:
    """For each positive, the negatives of its query row ranked before it (key strictly smaller).

    ``neg_sorted`` rows are ascending and padded with keys > 3 (never counted).  Rows are laid end
    to end with an offset of 4 per row, so one ``searchsorted`` serves every row (keys are
    multiples of 2^-24 below 3, so the offset sums are exact in float64).
    """
    n_rows, width = neg_sorted.shape
    offsets = _KEY_SPAN * np.arange(n_rows, dtype=np.float64)
    flat = (neg_sorted.astype(np.float64) + offsets[:, None]).ravel()
    before = np.searchsorted(flat, pos_keys.astype(np.float64) + offsets[neg_row], side="left")
    return before - neg_row.astype(np.int64) * width


def _before_counted(pos_keys: np.ndarray, owner: np.ndarray, neg_keys: np.ndarray) -> np.ndarray:
    """The same count by direct comparison, one pass per positive rank: cheaper than sorting the
    negatives when every query has only a few positives (replicate wells)."""
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=neg_keys.shape[0])
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(owner.size, dtype=np.int64)
    rank[order] = np.arange(owner.size) - first[owner[order]]
    before = np.empty(owner.size, dtype=np.int64)
    for j in range(int(counts.max()) if counts.size else 0):
        at = np.flatnonzero(rank == j)
        before[at] = (neg_keys[owner[at]] < pos_keys[at][:, None]).sum(axis=1)
    return before


def _ap_from_before(slot: np.ndarray, pos_keys: np.ndarray, before: np.ndarray, n_slots: int):
    """copairs' AP of each slot: positives best first (k = 1..P), mean of k / (k + before)."""
    order = np.lexsort((pos_keys, slot))
    slot, before = slot[order], before[order]
    n_pos = np.bincount(slot, minlength=n_slots)
    first = np.concatenate([[0], np.cumsum(n_pos)[:-1]])
    k = np.arange(slot.size) - first[slot] + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.bincount(slot, weights=k / (k + before), minlength=n_slots) / n_pos
    return ap, n_pos


def _sorted_padded(keys: np.ndarray, is_negative: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's negative keys ascending, non-negatives pushed to the end as 3.5; counts per row."""
    if is_negative is None:
        return np.sort(keys, axis=1), np.full(keys.shape[0], keys.shape[1], dtype=np.int64)
    padded = np.where(is_negative, keys, np.float32(3.5))
    padded.sort(axis=1)
    return padded, is_negative.sum(axis=1).astype(np.int64)


# Queries with at most this many positives count their negatives by comparison, not by sorting.
_FEW_POSITIVES = 8
# Groups of at least this many rows (positive controls) get their positive keys from one product of
# the group with itself, when it has at most _PAIR_MATRIX_CELLS cells (128 MiB of float32 keys).
_BIG_GROUP = 64
_PAIR_MATRIX_CELLS = 2**25


def replicate_average_precision(
    profiles: np.ndarray,
    groups: np.ndarray,
    is_reference: np.ndarray,
    *,
    pools: np.ndarray | None = None,
    block_rows: int | None = None,
    pair_chunk: int = 2**22,
) -> pd.DataFrame:
    """copairs' phenotypic-activity AP of every non-reference row, block-wise.

    Positives of row i: the other non-reference rows of its group (its replicate wells).
    Negatives: the reference rows (control wells), restricted to i's pool when ``pools`` is given
    (e.g. plate codes, copairs ``neg_sameby=plate``).  Same result as ``copairs.map.average_precision``
    with pos_sameby=[group, reference index], neg_diffby=[is_reference, reference index] and
    neg_sameby=[pool], for the non-reference rows; rows without a replicate are left out (copairs
    gives them NaN, and its mAP drops them).  ``profiles`` may stay float32: rows are converted to
    float64 block by block.

    Returns one row per query: ``row`` (position in the input), ``average_precision``,
    ``n_pos_pairs``, ``n_total_pairs``.
    """
    # Row-major: rows are gathered at random (replicates sit on other plates), and a column-major
    # array (what a pandas frame's to_numpy() gives) makes every gathered row touch the whole array.
    X = np.ascontiguousarray(profiles)
    groups = np.asarray(groups)
    is_reference = np.asarray(is_reference, dtype=bool)
    pools = np.zeros(len(X), dtype=np.int64) if pools is None else np.asarray(pools)
    queries = np.flatnonzero(~is_reference)
    group_codes, inverse = np.unique(groups[queries], return_inverse=True)
    size = np.bincount(inverse, minlength=group_codes.size)
    queries, inverse = queries[size[inverse] >= 2], inverse[size[inverse] >= 2]
    # members of each group, in row order, for the positive pairs
    members = queries[np.argsort(inverse, kind="stable")]
    starts = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=group_codes.size))])
    code_of = dict(zip(queries.tolist(), inverse.tolist()))
    chunk = max(1, pair_chunk // max(X.shape[1], 1))
    # Large groups (positive controls replicate on every plate, so their pairs grow with the plates
    # squared) get their keys from one product of the group with itself instead of pair by pair.
    group_size = np.diff(starts)
    position = np.zeros(len(X), dtype=np.int64)
    position[members] = np.arange(members.size) - np.repeat(starts[:-1], group_size)
    group_keys = {}
    for c in np.flatnonzero(group_size >= _BIG_GROUP):
        if group_size[c] ** 2 <= _PAIR_MATRIX_CELLS:
            unit = _unit(X, members[starts[c] : starts[c + 1]])
            group_keys[int(c)] = _keys(unit, unit)
    frames = []
    for pool in np.unique(pools[queries]) if queries.size else []:
        in_pool = queries[pools[queries] == pool]
        # fewest positives first, so a block is (nearly) all replicate wells or all positive controls
        in_pool = in_pool[np.argsort(size[[code_of[q] for q in in_pool]], kind="stable")]
        references = np.flatnonzero(is_reference & (pools == pool))
        reference_unit = _unit(X, references)
        step = block_rows or rows_per_block(max(references.size, 1), max_rows=4096)
        for start in range(0, in_pool.size, step):
            block = in_pool[start : start + step]
            code = np.array([code_of[q] for q in block.tolist()])
            lo, hi = starts[code], starts[code + 1]
            owner = np.repeat(np.arange(block.size), hi - lo)
            partner = members[np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])]
            keep = partner != block[owner]
            owner, partner = owner[keep], partner[keep]
            query_unit = _unit(X, block)
            pair_code = code[owner]
            from_matrix = np.isin(pair_code, list(group_keys))
            pos_keys = np.empty(owner.size, dtype=np.float32)
            by_pair = ~from_matrix
            pos_keys[by_pair] = _pair_keys(X, block[owner[by_pair]], partner[by_pair], chunk)
            for c in np.unique(pair_code[from_matrix]):
                sel = np.flatnonzero(pair_code == c)
                pos_keys[sel] = group_keys[int(c)][position[block[owner[sel]]], position[partner[sel]]]
            n_pos_max = int((hi - lo).max()) - 1
            if references.size == 0:
                before = np.zeros(owner.size, dtype=np.int64)
            elif n_pos_max <= _FEW_POSITIVES:
                before = _before_counted(pos_keys, owner, _keys(query_unit, reference_unit))
            else:
                neg_sorted, _ = _sorted_padded(_keys(query_unit, reference_unit), None)
                before = _before_sorted(pos_keys, owner, neg_sorted)
            ap, n_pos = _ap_from_before(owner, pos_keys, before, block.size)
            frames.append(
                pd.DataFrame(
                    dict(
                        row=block,
                        average_precision=ap,
                        n_pos_pairs=n_pos,
                        n_total_pairs=n_pos + references.size,
                    )
                )
            )
    if not frames:
        return pd.DataFrame(columns=["row", "average_precision", "n_pos_pairs", "n_total_pairs"])
    return pd.concat(frames, ignore_index=True).sort_values("row", kind="stable").reset_index(drop=True)


def multilabel_average_precision(
    profiles: np.ndarray, moas: Sequence[str], *, sep: str = "|", block_rows: int | None = None
) -> pd.DataFrame:
    """copairs' multilabel MoA-consistency AP of every (profile, label) pair, block-wise.

    For row i and each of its labels L shared with another row: positives = the other rows with L,
    negatives = the rows sharing no label with i.  Same result as
    ``copairs.map.multilabel.average_precision`` with pos_sameby=[labels], neg_diffby=[labels].

    Returns one row per (query, label): ``row``, ``label``, ``average_precision``, ``n_pos_pairs``,
    ``n_total_pairs``.
    """
    X = np.asarray(profiles)
    unit = _unit(X, slice(None))
    indicator, vocabulary = label_indicator(moas, sep)
    indicator = indicator.tocsc()
    indicator_t = indicator.T.tocsr()
    label_size = np.asarray(indicator.sum(axis=0)).ravel().astype(np.int64)
    members = [
        indicator.indices[indicator.indptr[j] : indicator.indptr[j + 1]] for j in range(len(vocabulary))
    ]
    by_row = indicator.tocsr()
    N = unit.shape[0]
    step = block_rows or rows_per_block(N)
    frames = []
    for start in range(0, N, step):
        rows = np.arange(start, min(start + step, N))
        # (query, label) slots of the block: the labels of each row shared with another row
        slot_row, slot_label = [], []
        for r in rows:
            for label in by_row.indices[by_row.indptr[r] : by_row.indptr[r + 1]]:
                if label_size[label] >= 2:
                    slot_row.append(r - start)
                    slot_label.append(label)
        if not slot_row:
            continue
        slot_row, slot_label = np.array(slot_row), np.array(slot_label)
        keys = _keys(unit[rows], unit)
        shares = (by_row[rows] @ indicator_t).toarray() > 0
        neg_sorted, n_neg = _sorted_padded(keys, ~shares)
        counts = label_size[slot_label]
        slot = np.repeat(np.arange(slot_row.size), counts)
        partner = np.concatenate([members[label] for label in slot_label])
        keep = partner != rows[slot_row[slot]]
        slot, partner = slot[keep], partner[keep]
        pos_keys = keys[slot_row[slot], partner]
        before = _before_sorted(pos_keys, slot_row[slot], neg_sorted)
        ap, n_pos = _ap_from_before(slot, pos_keys, before, slot_row.size)
        frames.append(
            pd.DataFrame(
                dict(
                    row=rows[slot_row],
                    label=[vocabulary[j] for j in slot_label],
                    average_precision=ap,
                    n_pos_pairs=n_pos,
                    n_total_pairs=n_pos + n_neg[slot_row],
                )
            )
        )
    if not frames:
        return pd.DataFrame(columns=["row", "label", "average_precision", "n_pos_pairs", "n_total_pairs"])
    return pd.concat(frames, ignore_index=True)


def summarize_retrieval(result: RetrievalResult, *, alpha: float = 0.05) -> dict[str, dict]:
    """Metric name -> {value, n (queries), variant (short name), description}."""

    def entry(values, variant, description, reduce=np.mean):
        values = np.asarray(values, dtype=np.float64)
        values = values[~np.isnan(values)]
        value = float(reduce(values)) if values.size else float("nan")
        return dict(value=value, n=int(values.size), variant=variant, description=description)

    foe_query = result.n_positives >= 1
    odds = result.foe_odds_ratio[foe_query]
    published = published_odds_ratio(odds, result.foe_v[foe_query, 3])
    p = result.foe_p_value[foe_query]
    reject = holm_sidak_reject(p, alpha)
    out = {
        "foe_top1_mean": entry(
            published,
            "published (inf OR -> v22)",
            "mean odds ratio at the top 1%; an infinite OR counts as count(sim<=t, other MoA) as in the "
            "published code; tables with an empty margin (NaN OR) are skipped",
        ),
        "foe_top1_median": entry(
            published,
            "published (inf OR -> v22)",
            "median odds ratio at the top 1% after the published infinite-odds rule (as the mean)",
            np.median,
        ),
        "foe_top1_median_raw": entry(
            odds,
            "diagnostic: raw sample OR",
            "median of the raw sample odds ratios (no infinite-odds rule): inf as soon as more than half "
            "the queries have nothing of another MoA above the threshold; a diagnostic, not comparable",
            np.median,
        ),
        "foe_top1_n_significant": dict(
            value=float(reject.sum()),
            n=int(p.size),
            variant=f"Holm-Sidak {alpha}",
            description=f"queries whose one-sided Fisher p stays below {alpha} after Holm-Sidak correction",
        ),
        "map_interpolated": entry(
            result.interpolated_precision,
            "DeepProfilerExperiments",
            "interpolated_precision_recall_curve with its one-step-lagged walk; queries with >=2 other same-MoA",
        ),
        "map_ap": entry(
            result.average_precision,
            "PhenoProfiler",
            "mean sklearn average_precision_score with self=(False,-1); queries with >=1 other same-MoA",
        ),
    }
    for percent, values in result.recall.items():
        out[f"recall_top{percent}pct"] = entry(
            values,
            "PhenoProfiler",
            f"same-MoA hits in the next max(int(N*{percent}/100),1) after self / row sum including self",
        )
    return out


# ----------------------------------------------------------------------------- references


def enrichment_reference(similarity, moa_match, percentile: float = DEFAULT_FOE_PERCENTILE) -> pd.DataFrame:
    """Per-query FoE table by a plain loop with ``scipy.stats.fisher_exact`` (the published recipe)."""
    from scipy.stats import fisher_exact

    S, M = _validated(similarity, moa_match)
    N = S.shape[0]
    records = []
    for i in range(N):
        others = np.arange(N) != i
        matches = M[i, others]
        if matches.sum() < 1:
            continue
        sims = S[i, others]
        t = np.percentile(sims, percentile)
        v11 = int(np.sum((sims > t) & matches))
        v12 = int(np.sum((sims > t) & ~matches))
        v21 = int(np.sum((sims <= t) & matches))
        v22 = int(np.sum((sims <= t) & ~matches))
        res = fisher_exact([[v11, v12], [v21, v22]], alternative="greater")
        odds = float(res.statistic)
        records.append(
            dict(
                query=i,
                threshold=t,
                v11=v11,
                v12=v12,
                v21=v21,
                v22=v22,
                odds_ratio=odds,
                published_odds_ratio=float(v22) if np.isinf(odds) else odds,
                p_value=float(res.pvalue),
            )
        )
    return pd.DataFrame(records)


def map_ap_reference(similarity, moa_match) -> np.ndarray:
    """Per-query ``average_precision_score`` with self set to (False, −1); NaN for non-queries."""
    from sklearn.metrics import average_precision_score

    S, M = _validated(similarity, moa_match)
    out = np.full(S.shape[0], np.nan)
    for i in range(S.shape[0]):
        truth = M[i].copy()
        score = S[i].copy()
        truth[i] = False
        score[i] = -1.0
        if truth.sum() > 0:
            out[i] = average_precision_score(truth, score)
    return out


def interpolated_curve_reference(similarity, moa_match) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepProfilerExperiments' interpolated curve, walked query by query.

    Returns (recall grid from 1 down to 0, curve averaged over queries, per-query curve means; NaN
    for rows that are not queries).

    Worked example (3 treatments, query 0; its two others are both same-MoA, scores 0.9 and 0.1;
    self is scored -1 and labelled False):  scikit-learn's curve from the lowest threshold up is
    precision [2/3, 1, 1, 1(appended)], recall [1, 1, 0.5, 0].  Running max: [2/3, 1, 1, 1].  Grid
    (N = 3): [1, 0.5, 0].  g=0 stores max[0] = 2/3, then j advances while 1 < recall[j] (never);
    g=1 stores max[0] = 2/3 (the lag), then j advances past recall 1, 1 to j=2 (recall 0.5);
    g=2 stores max[2] = 1.  Query mean = (2/3 + 2/3 + 1)/3 = 7/9; textbook interpolation gives
    (2/3 + 1 + 1)/3 = 8/9.
    """
    from sklearn.metrics import precision_recall_curve

    S, M = _validated(similarity, moa_match)
    N = S.shape[0]
    grid = np.linspace(0.0, 1.0, num=N)[::-1]
    curves = []
    per_query = np.full(N, np.nan)
    for i in range(N):
        truth = M[i].copy()
        score = S[i].copy()
        truth[i] = False
        score[i] = -1.0
        if truth.sum() < 2:  # published: diagonal blanked, then "row sum > 1"
            continue
        precision, recall, _ = precision_recall_curve(truth, score)
        running_max = np.maximum.accumulate(precision)
        curve = np.zeros(N)
        j = 0
        for g in range(N):
            curve[g] = running_max[j]  # value first, then advance: the one-step lag
            while grid[g] < recall[j]:
                j += 1
        curves.append(curve)
        per_query[i] = curve.mean()
    mean_curve = np.mean(curves, axis=0) if curves else np.full(N, np.nan)
    return grid, mean_curve, per_query


def recall_reference(
    similarity, moa_match, percents: Sequence[int] = DEFAULT_RECALL_PERCENTS
) -> dict[int, np.ndarray]:
    """Recall@k% by a plain loop: stable sort of the others by similarity, self excluded."""
    S, M = _validated(similarity, moa_match)
    N = S.shape[0]
    out = {}
    for percent in percents:
        n = min(max(int(N * percent / 100), 1), N - 1)
        values = np.full(N, np.nan)
        for i in range(N):
            others = np.delete(np.arange(N), i)
            matches = M[i, others]
            if matches.sum() < 1:
                continue
            ranking = np.argsort(-S[i, others], kind="stable")
            values[i] = matches[ranking[:n]].sum() / (matches.sum() + 1)  # +1: self counts in the row sum
        out[percent] = values
    return out


# ----------------------------------------------------------------------------- AP null distribution
#
# copairs' p-values compare a mAP with the mAP of random rankings: for each distinct (positives k,
# ranked total n) it draws ``null_size`` random rankings by permuting all n ranks (an n-wide
# integer row per draw), i.e. O(null_size × n) work and memory per configuration.  MoA consistency
# has a configuration per distinct (label size, count of unrelated treatments): hundreds at BBBC022
# size, thousands at JUMP size, each with n ~ the number of treatments, so that null grows like N².
# :func:`null_average_precision` draws the same distribution - the AP of k positions chosen
# uniformly without replacement among n - in O(null_size × k).


def _random_positions(k: int, n: int, size: int, rng: np.random.Generator, chunk_cells: int = 2**24):
    """``size`` sorted draws of k distinct positions (0-based) uniform among n."""
    if k * k <= 2 * n:
        # Few positives: draw with replacement, redraw the rows that repeated a position.
        draws = np.sort(rng.integers(0, n, size=(size, k)), axis=1)
        while True:
            repeated = np.flatnonzero((np.diff(draws, axis=1) == 0).any(axis=1)) if k > 1 else []
            if len(repeated) == 0:
                return draws
            draws[repeated] = np.sort(rng.integers(0, n, size=(len(repeated), k)), axis=1)
    # Many positives: the k smallest of n random keys, a chunk of draws at a time.
    out = np.empty((size, k), dtype=np.int64)
    rows = max(1, chunk_cells // n)
    for start in range(0, size, rows):
        keys = rng.random((min(rows, size - start), n))
        out[start : start + rows] = np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1)
    return out


def null_average_precision(n_pos: int, n_total: int, null_size: int, seed: int) -> np.ndarray:
    """AP of ``n_pos`` positives placed uniformly at random among ``n_total`` ranks, ``null_size``
    draws (float32, as copairs' null): AP = mean over positives i (best first) of i / rank_i."""
    rng = np.random.default_rng([seed, n_pos, n_total])  # the same draws whatever else is computed
    if n_pos >= n_total:
        return np.ones(null_size, dtype=np.float32)
    ranks = _random_positions(n_pos, n_total, null_size, rng) + 1
    precision = np.arange(1, n_pos + 1, dtype=np.float32) / ranks
    return (precision.sum(axis=1) / n_pos).astype(np.float32)


def copairs_null_cost(configs: np.ndarray, null_size: int) -> int:
    """Integers copairs' null permutes for these distinct (n_pos, n_total) configurations."""
    configs = np.asarray(configs)
    return int(null_size) * int(configs[:, 1].sum()) if configs.size else 0
