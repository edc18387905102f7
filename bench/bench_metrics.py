"""Benchmark: vectorised FoE + both MAP flavours vs a straightforward per-query loop.

    .venv/bin/python bench/bench_metrics.py [--n 5000] [--moas 250] [--dim 64] [--seed 0]

Generates N treatment profiles around MoA centroids (some treatments get two labels 'a|b', some
none), computes the cosine matrix once, then times

* ``metrics.retrieval_metrics`` (one sort per block of query rows; also yields Recall@k%), and
* the reference loops ``enrichment_reference`` (scipy ``fisher_exact`` per query),
  ``map_ap_reference`` (scikit-learn ``average_precision_score`` per query) and
  ``interpolated_curve_reference`` (scikit-learn ``precision_recall_curve`` + the published walk),

in the same run, prints the speed-up and whether every per-query number agrees.  Goal: >= 20x.
Then the pipeline's own path, ``retrieval_metrics_from_profiles`` (block-wise, never an N x N
matrix), against the dense path it replaced, interleaved rounds: time and peak memory (tracemalloc).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from phenoprofiler_core import metrics


def generate(n: int, n_moas: int, dim: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((n_moas, dim))
    first = rng.integers(0, n_moas, n)
    second = rng.integers(0, n_moas, n)
    two_labels = rng.random(n) < 0.15
    no_label = rng.random(n) < 0.05
    profiles = (
        rng.standard_normal((n, dim))
        + 0.7 * centroids[first]
        + 0.35 * two_labels[:, None] * centroids[second]
    )
    moas = []
    for i in range(n):
        if no_label[i]:
            moas.append("")
        elif two_labels[i] and second[i] != first[i]:
            moas.append(f"moa{first[i]}|moa{second[i]}")
        else:
            moas.append(f"moa{first[i]}")
    return profiles, moas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="number of treatments")
    parser.add_argument("--moas", type=int, default=250, help="number of MoA labels")
    parser.add_argument("--dim", type=int, default=64, help="profile dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, default=7, help="interleaved rounds of the product-path comparison"
    )
    args = parser.parse_args()

    profiles, moas = generate(args.n, args.moas, args.dim, args.seed)
    S = metrics.cosine_similarity_matrix(profiles)
    M = metrics.moa_match_matrix(moas)
    print(
        f"{args.n} treatments, {args.moas} MoAs, dim {args.dim}; "
        f"{int((M.sum(1) > 1).sum())} FoE/map_ap queries, {int((M.sum(1) > 2).sum())} map_interpolated queries"
    )

    # Same work on both sides: FoE + map_ap + map_interpolated (Recall@k% timed separately below).
    # Best of 3 for the fast path (its first call also pays page faults); the loop runs once.
    t_fast = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fast = metrics.retrieval_metrics(S, M, recall_percents=())
        t_fast = min(t_fast, time.perf_counter() - t0)

    t0 = time.perf_counter()
    foe_ref = metrics.enrichment_reference(S, M)
    t_foe = time.perf_counter() - t0
    t0 = time.perf_counter()
    ap_ref = metrics.map_ap_reference(S, M)
    t_ap = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, curve_ref, interp_ref = metrics.interpolated_curve_reference(S, M)
    t_interp = time.perf_counter() - t0
    t_ref = t_foe + t_ap + t_interp

    q = foe_ref["query"].to_numpy()
    agree = {
        "FoE 2x2 tables": bool((foe_ref[["v11", "v12", "v21", "v22"]].to_numpy() == fast.foe_v[q]).all()),
        "FoE odds ratios": bool(
            np.allclose(foe_ref["odds_ratio"], fast.foe_odds_ratio[q], equal_nan=True, rtol=1e-12)
        ),
        "FoE p-values": bool(np.allclose(foe_ref["p_value"], fast.foe_p_value[q], rtol=1e-9, atol=0)),
        "map_ap per query": bool(
            np.allclose(ap_ref, fast.average_precision, equal_nan=True, rtol=0, atol=1e-12)
        ),
        "map_interpolated per query": bool(
            np.allclose(interp_ref, fast.interpolated_precision, equal_nan=True, rtol=0, atol=1e-12)
        ),
        "map_interpolated MAP": bool(
            np.isclose(np.mean(curve_ref), np.nanmean(fast.interpolated_precision), rtol=0, atol=1e-12)
        ),
    }
    t0 = time.perf_counter()
    fast_recall = metrics.retrieval_metrics(S, M).recall
    t_fast_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    recall_ref = metrics.recall_reference(S, M)
    t_recall_ref = time.perf_counter() - t0
    agree["Recall@1/3/5/10% per query"] = all(
        np.allclose(recall_ref[k], fast_recall[k], equal_nan=True, rtol=0, atol=1e-12) for k in recall_ref
    )

    summary = metrics.summarize_retrieval(fast)
    print(f"vectorised (FoE + map_ap + map_interpolated), best of 3: {t_fast:8.2f} s")
    print(
        f"per-query loop: FoE {t_foe:.2f} s + map_ap {t_ap:.2f} s + map_interpolated {t_interp:.2f} s = {t_ref:8.2f} s"
    )
    print(f"speed-up: {t_ref / t_fast:.1f}x (goal >= 20x)")
    print(
        f"with Recall@1/3/5/10% too: vectorised {t_fast_all:.2f} s; the recall loop alone {t_recall_ref:.2f} s"
    )
    for name, ok in agree.items():
        print(f"agree {name:28s}: {'yes' if ok else 'NO'}")
    for name in ("foe_top1_mean", "foe_top1_median", "foe_top1_n_significant", "map_interpolated", "map_ap"):
        print(f"{name:24s} {summary[name]['value']:10.4f}  ({summary[name]['n']} queries)")
    compare_product_paths(profiles, moas, rounds=args.rounds)
    if not all(agree.values()):
        raise SystemExit("vectorised and reference results disagree")


def compare_product_paths(profiles: np.ndarray, moas: list[str], *, rounds: int) -> None:
    """The pipeline's path (block-wise straight from profiles) against the dense one it replaced
    (N x N cosine and MoA-match matrices, then blocks), interleaved, same process and threads."""
    import tracemalloc

    def dense():
        S = metrics.cosine_similarity_matrix(profiles)
        return metrics.retrieval_metrics(S, metrics.moa_match_matrix(moas))

    def blockwise():
        return metrics.retrieval_metrics_from_profiles(profiles, moas)

    times = {"dense": [], "blockwise": []}
    for _ in range(rounds):
        for name, fn in (("dense", dense), ("blockwise", blockwise)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    peaks = {}
    for name, fn in (("dense", dense), ("blockwise", blockwise)):
        tracemalloc.start()
        fn()
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    same = np.allclose(dense().average_precision, blockwise().average_precision, equal_nan=True, atol=1e-12)
    med = {name: float(np.median(t)) for name, t in times.items()}
    print(f"product path, {rounds} interleaved rounds (median):")
    for name in ("dense", "blockwise"):
        print(f"  {name:9s} {med[name]:8.2f} s  peak {peaks[name] / 2**20:8.0f} MiB")
    print(
        f"  block-wise / dense: time x{med['blockwise'] / med['dense']:.2f}, "
        f"peak memory x{peaks['blockwise'] / peaks['dense']:.2f}; same map_ap: {'yes' if same else 'NO'}"
    )


if __name__ == "__main__":
    main()
