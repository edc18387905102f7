"""Whole-dataset steps at scale: block-wise evaluation equals the dense / copairs computation, and its
memory grows with the number of treatments N, not with N².

Speed is measured in ``bench/bench_scale.py`` (time and peak memory at BBBC022 and JUMP size), not
asserted here.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest

from phenoprofiler_core import evaluate, metrics


def synthetic_wells(*, n_treatments=24, n_plates=3, replicates=2, controls=4, dim=12, n_moas=6, seed=0):
    """Wells shaped like a screen: each treatment on `replicates` wells of every plate, controls on
    every plate, one or two MoA labels per treatment around MoA centroids."""
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((n_moas, dim)) * 2
    first = rng.integers(0, n_moas, n_treatments)
    second = rng.integers(0, n_moas, n_treatments)
    rows, values = [], []
    for plate in range(n_plates):
        well = 0
        for t in range(n_treatments):
            moa = f"m{first[t]}" if t % 5 else f"m{first[t]}|m{second[t]}"
            for _ in range(replicates):
                rows.append((f"P{plate}", f"W{well:03d}", f"T{t:03d}", f"cpd{t}", "trt", moa))
                values.append(centroids[first[t]] + rng.standard_normal(dim))
                well += 1
        for _ in range(controls):
            rows.append((f"P{plate}", f"W{well:03d}", "DMSO", "DMSO", "negcon", ""))
            values.append(rng.standard_normal(dim))
            well += 1
    columns = [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_TreatmentId",
        "Metadata_Treatment",
        "Metadata_pert_type",
        "Metadata_moa",
    ]
    features = [f"f{j}" for j in range(dim)]
    wells = pd.concat(
        [pd.DataFrame(rows, columns=columns), pd.DataFrame(np.array(values), columns=features)], axis=1
    )
    return wells, features


def copairs_activity(wells, features, *, null_size, seed, same_plate=False):
    """Activity mAP the way copairs' own pipeline computes it: pair lists, then mAP + p-values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import copairs.map as copairs_map
        from copairs.matching import assign_reference_index
    meta = wells[[c for c in wells.columns if c.startswith("Metadata_")]].copy()
    meta["negcon"] = meta["Metadata_pert_type"] == "negcon"
    meta = assign_reference_index(meta, "negcon", reference_col="ref", default_value=-1)
    ap = copairs_map.average_precision(
        meta,
        wells[features].to_numpy(),
        ["Metadata_TreatmentId", "ref"],
        [],
        ["Metadata_Plate"] if same_plate else [],
        ["negcon", "ref"],
        progress_bar=False,
    )
    ap = ap[~ap["negcon"]]
    return copairs_map.mean_average_precision(
        ap, ["Metadata_TreatmentId"], null_size=null_size, threshold=0.05, seed=seed, progress_bar=False
    ).sort_values("Metadata_TreatmentId")


@pytest.mark.parametrize("same_plate", [False, True])
def test_activity_equals_copairs_own_pipeline(same_plate):
    wells, features = synthetic_wells(seed=3)
    ours = evaluate.activity_map(wells, features, null_size=1000, seed=0, same_plate_negcon=same_plate)
    reference = copairs_activity(wells, features, null_size=1000, seed=0, same_plate=same_plate)
    assert ours["Metadata_TreatmentId"].tolist() == reference["Metadata_TreatmentId"].tolist()
    for column in (
        "mean_average_precision",
        "mean_normalized_average_precision",
        "p_value",
        "corrected_p_value",
    ):
        np.testing.assert_allclose(ours[column], reference[column], rtol=1e-9, err_msg=column)


def test_consistency_equals_copairs_own_pipeline():
    wells, features = synthetic_wells(seed=4)
    consensus = evaluate.treatment_means(wells, features)
    ours = evaluate.consistency_map(consensus, features, null_size=1000, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import copairs.map as copairs_map
    table = consensus[consensus["Metadata_pert_type"] != "negcon"].reset_index(drop=True)
    meta = pd.DataFrame({"Metadata_moa_label": [sorted(metrics.split_moa(m)) for m in table["Metadata_moa"]]})
    ap = copairs_map.multilabel.average_precision(
        meta,
        table[features].to_numpy(),
        ["Metadata_moa_label"],
        [],
        [],
        ["Metadata_moa_label"],
        multilabel_col="Metadata_moa_label",
        progress_bar=False,
    )
    reference = copairs_map.mean_average_precision(
        ap, ["Metadata_moa_label"], null_size=1000, threshold=0.05, seed=0, progress_bar=False
    ).sort_values("Metadata_moa_label")
    assert ours["Metadata_moa_label"].tolist() == reference["Metadata_moa_label"].tolist()
    for column in ("mean_average_precision", "p_value", "corrected_p_value"):
        np.testing.assert_allclose(ours[column], reference[column], rtol=1e-9, err_msg=column)


def test_blockwise_retrieval_equals_dense_on_wells():
    wells, features = synthetic_wells(n_treatments=60, seed=5)
    table = evaluate.foe_map_recall(wells, features)
    treatments = evaluate.treatment_means(wells, features)
    treatments = treatments[treatments["Metadata_pert_type"] != "negcon"].reset_index(drop=True)
    dense = metrics.retrieval_metrics(
        metrics.cosine_similarity_matrix(treatments[features].to_numpy()),
        metrics.moa_match_matrix(treatments["Metadata_moa"]),
    )
    assert table["Metadata_TreatmentId"].tolist() == treatments["Metadata_TreatmentId"].tolist()
    np.testing.assert_allclose(table["map_ap"], dense.average_precision, atol=1e-12)
    np.testing.assert_allclose(table["map_interpolated"], dense.interpolated_precision, atol=1e-12)
    np.testing.assert_allclose(table["foe_odds_ratio"], dense.foe_odds_ratio, rtol=1e-12)
    np.testing.assert_array_equal(table[["foe_v11", "foe_v12", "foe_v21", "foe_v22"]].to_numpy(), dense.foe_v)
    np.testing.assert_allclose(table["recall_top10pct"], dense.recall[10], atol=1e-12)


def test_treatment_metrics_memory_stays_far_below_n_squared():
    """20,000 treatments: a dense N x N float64 similarity matrix alone would be 3.2 GB."""
    n, dim = 20_000, 16
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n // 20, n)
    profiles = rng.standard_normal((n // 20, dim))[labels] + rng.standard_normal((n, dim))
    moas = [f"moa{a}" if a % 7 else f"moa{a}|moa{a + 1}" for a in labels]
    dense_bytes = n * n * 8
    tracemalloc.start()
    try:
        result = metrics.retrieval_metrics_from_profiles(profiles, moas)
        _, retrieval_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        ap = metrics.multilabel_average_precision(profiles, moas)
        _, consistency_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(
        f"N={n}: retrieval peak {retrieval_peak / 2**20:.0f} MiB, consistency peak "
        f"{consistency_peak / 2**20:.0f} MiB; N^2 x 8 bytes = {dense_bytes / 2**20:.0f} MiB"
    )
    assert np.isfinite(result.average_precision).sum() > 0.9 * n and len(ap) > n
    assert retrieval_peak < dense_bytes / 8
    assert consistency_peak < dense_bytes / 8


# ----------------------------------------------------------------------------- the AP null


def test_sampled_null_draws_copairs_null_distribution():
    # By hand: 2 positives among 3 ranks, each of the 3 position pairs equally likely:
    #   {1,2}: (1/1 + 2/2)/2 = 1;  {1,3}: (1/1 + 2/3)/2 = 5/6;  {2,3}: (1/2 + 2/3)/2 = 7/12.
    draws = metrics.null_average_precision(2, 3, 30_000, seed=0)
    values, counts = np.unique(np.round(draws, 6), return_counts=True)
    np.testing.assert_allclose(values, np.round([7 / 12, 5 / 6, 1.0], 6))
    np.testing.assert_allclose(counts / draws.size, 1 / 3, atol=0.015)
    # Against copairs' own null (all ranks permuted), both sampling regimes (few and many positives).
    from copairs.compute import random_ap
    from copairs.map.normalization import expected_ap
    from scipy.stats import ks_2samp

    for k, n in ((3, 40), (12, 30), (1, 7)):
        ours = metrics.null_average_precision(k, n, 20_000, seed=1)
        theirs = random_ap(20_000, k, n, seed=2)
        assert ks_2samp(ours, theirs).pvalue > 1e-3, (k, n)
        # the mean is copairs' exact expected AP under random ranking
        assert abs(ours.mean() - expected_ap(k, n - k)) < 5 * ours.std() / np.sqrt(ours.size), (k, n)


def test_sampled_null_p_values_agree_with_copairs_null():
    wells, features = synthetic_wells(seed=6, n_treatments=30)
    treated = (wells["Metadata_pert_type"] == "trt").to_numpy()
    noise = np.random.default_rng(7).standard_normal((treated.sum(), len(features))) * 4
    wells.loc[treated, features] = wells.loc[treated, features].to_numpy() + noise  # weak signal
    exact = evaluate.activity_map(wells, features, null_size=4000, seed=0, null="copairs")
    sampled = evaluate.activity_map(wells, features, null_size=4000, seed=0, null="sampled")
    assert set(exact["null"]) == {"copairs"} and set(sampled["null"]) == {"sampled"}
    np.testing.assert_allclose(sampled["mean_average_precision"], exact["mean_average_precision"], rtol=1e-12)
    p, q = exact["p_value"].to_numpy(), sampled["p_value"].to_numpy()
    tolerance = 5 * np.sqrt(np.maximum(p * (1 - p), 1e-4) / 4000) + 2 / 4000  # Monte-Carlo error
    assert (np.abs(p - q) <= tolerance).all(), np.c_[p, q]
    assert 0.05 < np.median(p) < 0.95  # the check is not only about p-values pinned at the floor
