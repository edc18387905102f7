"""Benchmark one feature set's profiles (DESIGN.md §6) and summarise all sets.

``phenoprofiler evaluate --profiles profiles/<set> --out eval/<set>`` writes

* ``map_activity.parquet`` — copairs mAP per treatment: its replicate wells against negative-control
  wells, p-values from copairs' null, Benjamini–Hochberg corrected; ``below_corrected_p`` marks the
  treatments "retrieved" (phenotypically active);
* ``map_consistency.parquet`` — copairs multilabel mAP per MoA label on consensus profiles
  (a treatment's positives share that label, its negatives share no label with it);
* ``foe_map_recall.parquet`` — per query treatment: FoE 2×2 table / odds ratio / Fisher p at the top
  1%, ``map_ap``, ``map_interpolated`` and Recall@k% (:mod:`phenoprofiler_core.metrics`).  Treatment
  profiles here are the mean of the treatment's well profiles, similarity is cosine.

``phenoprofiler evaluate --summary eval/<set> ... --out eval/summary.parquet`` writes one row per
(set, metric) with the variant that was computed, for the report.

Negative controls and treatments without MoA labels are never MoA queries.  ``--same-wells-as``
restricts the wells to those every listed set also has, so sets are compared on the same wells.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics
from .errors import DataError
from .io import write_parquet
from .profiles import TREATMENT_COLUMNS, consensus_profiles, feature_columns

log = logging.getLogger(__name__)

WELL_KEYS = ["Metadata_Plate", "Metadata_Well"]
EVAL_FILES = ("map_activity", "map_consistency", "foe_map_recall")


def _copairs_map():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import copairs.map as copairs_map
        from copairs.matching import UnpairedException
    # copairs narrates every step at INFO; our log should show our steps.
    logging.getLogger("copairs").setLevel(max(logging.WARNING, logging.getLogger().level))
    return copairs_map, UnpairedException


def _read_profiles(path: Path, required: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    if not path.is_file():
        raise DataError(f"profile table not found: {path}")
    df = pd.read_parquet(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    features = feature_columns(df)
    if not features:
        raise DataError(f"{path}: no feature columns")
    values = df[features].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise DataError(f"{path}: row {row} has NaN/inf features; profiles must be finite to compare")
    df["Metadata_moa"] = df["Metadata_moa"].fillna("").astype(str)
    return df, features


# ----------------------------------------------------------------------------- copairs


def activity_map(
    wells: pd.DataFrame,
    features: list[str],
    *,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    same_plate_negcon: bool = False,
) -> pd.DataFrame:
    """copairs phenotypic activity: replicate wells of a treatment vs negative-control wells."""
    copairs_map, UnpairedException = _copairs_map()
    from copairs.matching import assign_reference_index

    meta = wells[[c for c in wells.columns if c.startswith("Metadata_")]].reset_index(drop=True).copy()
    meta["Metadata_negcon"] = (meta["Metadata_pert_type"] == "negcon").to_numpy()
    if not meta["Metadata_negcon"].any():
        raise DataError("activity mAP: no negative-control wells (Metadata_pert_type == 'negcon')")
    # A unique reference index per control well: controls are never each other's replicates, and
    # a pair is negative only when it joins a treatment well with a control well.
    meta = assign_reference_index(
        meta, "Metadata_negcon", reference_col="Metadata_reference_index", default_value=-1
    )
    feats = wells[features].to_numpy(dtype=np.float64)
    try:
        ap = copairs_map.average_precision(
            meta,
            feats,
            pos_sameby=["Metadata_TreatmentId", "Metadata_reference_index"],
            pos_diffby=[],
            neg_sameby=["Metadata_Plate"] if same_plate_negcon else [],
            neg_diffby=["Metadata_negcon", "Metadata_reference_index"],
            progress_bar=False,
        )
    except UnpairedException as exc:
        log.warning("activity mAP: %s (no treatment has two wells?) - writing an empty table", exc)
        return pd.DataFrame(
            columns=list(TREATMENT_COLUMNS)
            + ["n_wells", "mean_average_precision", "p_value", "corrected_p_value", "below_corrected_p"]
        )
    ap = ap[~ap["Metadata_negcon"]]
    result = copairs_map.mean_average_precision(
        ap, ["Metadata_TreatmentId"], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False
    ).drop(columns=["indices"], errors="ignore")
    info = (
        wells.groupby("Metadata_TreatmentId")
        .agg(**{c: (c, "first") for c in TREATMENT_COLUMNS[1:]}, n_wells=("Metadata_Well", "size"))
        .reset_index()
    )
    result = info.merge(result, on="Metadata_TreatmentId", how="inner")
    return result.sort_values("Metadata_TreatmentId").reset_index(drop=True)


def consistency_map(
    consensus: pd.DataFrame,
    features: list[str],
    *,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    sep: str = "|",
) -> pd.DataFrame:
    """copairs multilabel MoA consistency on consensus (treatment-level) profiles, per MoA label."""
    copairs_map, UnpairedException = _copairs_map()
    keep = (consensus["Metadata_pert_type"] != "negcon") & (
        consensus["Metadata_moa"].map(metrics.split_moa).map(len) > 0
    )
    table = consensus[keep].reset_index(drop=True)
    columns = [
        "Metadata_moa_label",
        "n_treatments",
        "mean_average_precision",
        "p_value",
        "corrected_p_value",
        "below_corrected_p",
    ]
    if len(table) < 2:
        log.warning("MoA consistency: fewer than 2 annotated treatments - writing an empty table")
        return pd.DataFrame(columns=columns)
    meta = table[list(TREATMENT_COLUMNS)].copy()
    meta["Metadata_moa_label"] = [sorted(metrics.split_moa(m, sep)) for m in table["Metadata_moa"]]
    feats = table[features].to_numpy(dtype=np.float64)
    try:
        ap = copairs_map.multilabel.average_precision(
            meta,
            feats,
            pos_sameby=["Metadata_moa_label"],
            pos_diffby=[],
            neg_sameby=[],
            neg_diffby=["Metadata_moa_label"],
            multilabel_col="Metadata_moa_label",
            progress_bar=False,
        )
    except UnpairedException as exc:
        log.warning("MoA consistency: %s (no two treatments share a label) - writing an empty table", exc)
        return pd.DataFrame(columns=columns)
    result = copairs_map.mean_average_precision(
        ap, ["Metadata_moa_label"], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False
    ).drop(columns=["indices"], errors="ignore")
    counts = ap.groupby("Metadata_moa_label").size().rename("n_treatments").reset_index()
    result = counts.merge(result, on="Metadata_moa_label", how="inner")
    return result.sort_values("Metadata_moa_label").reset_index(drop=True)


# ----------------------------------------------------------------------------- FoE / MAP / recall


def treatment_means(wells: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Treatment profiles = mean of the treatment's well profiles (DESIGN.md §6)."""
    grouped = wells.groupby("Metadata_TreatmentId", sort=True)
    info = grouped.agg(**{c: (c, "first") for c in TREATMENT_COLUMNS[1:]}, n_wells=("Metadata_Well", "size"))
    means = grouped[features].mean()
    return pd.concat([info, means], axis=1).reset_index()


def foe_map_recall(
    wells: pd.DataFrame,
    features: list[str],
    *,
    percentile: float = 99.0,
    recall_percents: Sequence[int] = metrics.DEFAULT_RECALL_PERCENTS,
    alpha: float = 0.05,
    sep: str = "|",
) -> pd.DataFrame:
    """Per-query FoE, map_ap, map_interpolated and Recall@k% over annotated, non-control treatments."""
    treatments = treatment_means(wells, features)
    keep = (treatments["Metadata_pert_type"] != "negcon") & (
        treatments["Metadata_moa"].map(metrics.split_moa).map(len) > 0
    )
    treatments = treatments[keep].reset_index(drop=True)
    if len(treatments) < 2:
        raise DataError(
            f"MoA retrieval needs at least 2 non-control treatments with Metadata_moa labels; found {len(treatments)}"
        )
    S = metrics.cosine_similarity_matrix(treatments[features].to_numpy())
    M = metrics.moa_match_matrix(treatments["Metadata_moa"], sep)
    result = metrics.retrieval_metrics(S, M, percentile=percentile, recall_percents=recall_percents)
    table = treatments[list(TREATMENT_COLUMNS) + ["n_wells"]].copy()
    table["n_same_moa"] = result.n_positives
    for k, name in enumerate(("foe_v11", "foe_v12", "foe_v21", "foe_v22")):
        table[name] = result.foe_v[:, k]
    table["foe_threshold"] = result.foe_threshold
    table["foe_odds_ratio"] = result.foe_odds_ratio
    table["foe_odds_ratio_published"] = metrics.published_odds_ratio(
        result.foe_odds_ratio, result.foe_v[:, 3]
    )
    table["foe_p_value"] = result.foe_p_value
    is_query = result.n_positives >= 1
    significant = np.zeros(len(table), dtype=bool)
    significant[is_query] = metrics.holm_sidak_reject(result.foe_p_value[is_query], alpha)
    table["foe_significant_holm_sidak"] = significant
    table["map_ap"] = result.average_precision
    table["map_interpolated"] = result.interpolated_precision
    for percent, values in result.recall.items():
        table[f"recall_top{percent}pct"] = values
    table.attrs["n_treatments"] = len(table)
    return table


def _result_from_table(table: pd.DataFrame) -> metrics.RetrievalResult:
    recall_columns = [c for c in table.columns if c.startswith("recall_top") and c.endswith("pct")]
    return metrics.RetrievalResult(
        n_positives=table["n_same_moa"].to_numpy(),
        foe_v=table[["foe_v11", "foe_v12", "foe_v21", "foe_v22"]].to_numpy(),
        foe_threshold=table["foe_threshold"].to_numpy(),
        foe_odds_ratio=table["foe_odds_ratio"].to_numpy(dtype=np.float64),
        foe_p_value=table["foe_p_value"].to_numpy(dtype=np.float64),
        average_precision=table["map_ap"].to_numpy(dtype=np.float64),
        interpolated_precision=table["map_interpolated"].to_numpy(dtype=np.float64),
        recall={
            int(c[len("recall_top") : -len("pct")]): table[c].to_numpy(dtype=np.float64)
            for c in recall_columns
        },
    )


# ----------------------------------------------------------------------------- driver


def common_wells(profile_dirs: Sequence[str | Path]) -> set[tuple]:
    """(plate, well) pairs present in every listed set's selected.parquet."""
    shared: set[tuple] | None = None
    for directory in profile_dirs:
        path = Path(directory) / "selected.parquet"
        if not path.is_file():
            raise DataError(f"--same-wells-as: {path} not found")
        keys = pd.read_parquet(path, columns=WELL_KEYS)
        these = set(map(tuple, keys.astype(str).to_numpy()))
        shared = these if shared is None else shared & these
    return shared or set()


def evaluate_profiles(
    profiles_dir: str | Path,
    out_dir: str | Path,
    *,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    percentile: float = 99.0,
    recall_percents: Sequence[int] = metrics.DEFAULT_RECALL_PERCENTS,
    same_plate_negcon: bool = False,
    same_wells_as: Sequence[str | Path] = (),
    consensus_operation: str = "median",
    sep: str = "|",
) -> dict[str, Path]:
    """Compute and write the three evaluation tables of one feature set."""
    profiles_dir, out_dir = Path(profiles_dir), Path(out_dir)
    required = WELL_KEYS + list(TREATMENT_COLUMNS)
    wells, features = _read_profiles(profiles_dir / "selected.parquet", required)
    consensus, consensus_features = _read_profiles(
        profiles_dir / "consensus.parquet", list(TREATMENT_COLUMNS)
    )
    if same_wells_as:
        shared = common_wells(same_wells_as)
        keys = list(map(tuple, wells[WELL_KEYS].astype(str).to_numpy()))
        keep = np.array([k in shared for k in keys], dtype=bool)
        if not keep.any():
            raise DataError(f"{profiles_dir}: no wells in common with {list(map(str, same_wells_as))}")
        if not keep.all():
            log.info(
                "evaluating %d of %d wells (those every set has); consensus recomputed",
                keep.sum(),
                len(wells),
            )
            wells = wells[keep].reset_index(drop=True)
            consensus = consensus_profiles(wells, features, consensus_operation)
            consensus_features = features
    activity = activity_map(
        wells,
        features,
        null_size=null_size,
        threshold=threshold,
        seed=seed,
        same_plate_negcon=same_plate_negcon,
    )
    consistency = consistency_map(
        consensus, consensus_features, null_size=null_size, threshold=threshold, seed=seed, sep=sep
    )
    retrieval = foe_map_recall(
        wells, features, percentile=percentile, recall_percents=recall_percents, alpha=threshold, sep=sep
    )
    paths = {name: out_dir / f"{name}.parquet" for name in EVAL_FILES}
    write_parquet(activity, paths["map_activity"])
    write_parquet(consistency, paths["map_consistency"])
    write_parquet(retrieval, paths["foe_map_recall"])
    return paths


def summarize_set(eval_dir: str | Path, *, alpha: float = 0.05) -> pd.DataFrame:
    """One row per metric of one set: set, metric, variant, value, n (queries/treatments/labels), description."""
    eval_dir = Path(eval_dir)
    tables = {}
    for name in EVAL_FILES:
        path = eval_dir / f"{name}.parquet"
        if not path.is_file():
            raise DataError(f"evaluation table not found: {path}")
        tables[name] = pd.read_parquet(path)
    rows = []

    def add(metric, value, n, variant, description):
        rows.append(
            dict(
                set=eval_dir.name,
                metric=metric,
                variant=variant,
                value=float(value),
                n=int(n),
                description=description,
            )
        )

    def mean_or_nan(series):
        return float(series.astype(float).mean()) if len(series) else float("nan")

    activity = tables["map_activity"]
    add(
        "map_activity",
        mean_or_nan(activity["mean_average_precision"]),
        len(activity),
        "copairs",
        "copairs mAP of a treatment's replicate wells against negcon wells, mean over treatments",
    )
    add(
        "fraction_retrieved_activity",
        mean_or_nan(activity["below_corrected_p"]),
        len(activity),
        f"copairs BH {alpha}",
        f"fraction of treatments whose BH-corrected copairs p-value is below {alpha}",
    )
    consistency = tables["map_consistency"]
    add(
        "map_consistency",
        mean_or_nan(consistency["mean_average_precision"]),
        len(consistency),
        "copairs multilabel",
        "copairs multilabel mAP on consensus profiles (positives share the label), mean over MoA labels",
    )
    add(
        "fraction_retrieved_consistency",
        mean_or_nan(consistency["below_corrected_p"]),
        len(consistency),
        f"copairs BH {alpha}",
        f"fraction of MoA labels whose BH-corrected copairs p-value is below {alpha}",
    )
    retrieval = tables["foe_map_recall"]
    if len(retrieval):
        for metric, e in metrics.summarize_retrieval(_result_from_table(retrieval), alpha=alpha).items():
            add(metric, e["value"], e["n"], e["variant"], e["description"])
    return pd.DataFrame(rows, columns=["set", "metric", "variant", "value", "n", "description"])


def write_summary(eval_dirs: Sequence[str | Path], out: str | Path, *, alpha: float = 0.05) -> pd.DataFrame:
    summary = pd.concat([summarize_set(d, alpha=alpha) for d in eval_dirs], ignore_index=True)
    write_parquet(summary, out)
    return summary


# ----------------------------------------------------------------------------- CLI


def _run(args: argparse.Namespace) -> None:
    if args.summary:
        summary = write_summary(args.summary, args.out, alpha=args.threshold)
        with pd.option_context("display.width", 200, "display.max_colwidth", 40):
            print(summary[["set", "metric", "value", "n"]].to_string(index=False))
        return
    paths = evaluate_profiles(
        args.profiles,
        args.out,
        null_size=args.null_size,
        threshold=args.threshold,
        seed=args.seed,
        percentile=args.foe_percentile,
        recall_percents=args.recall_percents,
        same_plate_negcon=args.same_plate_negcon,
        same_wells_as=args.same_wells_as or (),
        consensus_operation=args.consensus,
        sep=args.moa_separator,
    )
    for path in paths.values():
        print(path)


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="copairs mAP, FoE, MAP and Recall@k of a feature set; or --summary of all sets",
        description=__doc__.splitlines()[0],
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profiles", help="profiles/<set> folder (selected.parquet, consensus.parquet)")
    source.add_argument(
        "--summary",
        nargs="+",
        metavar="EVAL_DIR",
        help="eval/<set> folders to summarise into --out (one row per set and metric)",
    )
    parser.add_argument(
        "--out", required=True, help="eval/<set> folder, or eval/summary.parquet with --summary"
    )
    parser.add_argument(
        "--same-wells-as",
        nargs="*",
        metavar="PROFILES_DIR",
        help="profiles/<set> folders: evaluate only wells that all of them have",
    )
    parser.add_argument("--null-size", type=int, default=10000, help="copairs null distribution size")
    parser.add_argument(
        "--threshold", type=float, default=0.05, help="significance level (copairs BH, FoE Holm-Sidak)"
    )
    parser.add_argument("--seed", type=int, default=0, help="copairs null seed")
    parser.add_argument(
        "--foe-percentile", type=float, default=99.0, help="FoE similarity percentile (99 = top 1%%)"
    )
    parser.add_argument(
        "--recall-percents", type=int, nargs="+", default=list(metrics.DEFAULT_RECALL_PERCENTS)
    )
    parser.add_argument(
        "--same-plate-negcon",
        action="store_true",
        help="activity: compare a well only with negcon wells of its own plate",
    )
    parser.add_argument(
        "--consensus", default="median", help="consensus operation when --same-wells-as drops wells"
    )
    parser.add_argument("--moa-separator", default="|", help="separator between MoA labels")
    parser.set_defaults(func=_run)
