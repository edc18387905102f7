"""Benchmark one feature set's profiles (DESIGN.md §6) and summarise all sets.

``phenoprofiler evaluate --profiles profiles/<set> --out eval/<set>`` writes

* ``map_activity.parquet`` — copairs mAP per treatment: its replicate wells against negative-control
  wells, p-values from copairs' null, Benjamini–Hochberg corrected; ``below_corrected_p`` marks the
  treatments "retrieved" (phenotypically active);
* ``map_consistency.parquet`` — copairs multilabel mAP per MoA label on consensus profiles
  (a treatment's positives share that label, its negatives share no label with it);
* ``foe_map_recall.parquet`` — per query treatment: FoE 2×2 table / odds ratio / Fisher p at the top
  1%, ``map_ap``, ``map_interpolated`` and Recall@k% (:mod:`phenoprofiler_core.metrics`).  Treatment
  profiles here are the mean of the treatment's well profiles, similarity is cosine;
* ``notes.json`` — why a table is empty (``{"map_activity": "...", ...}``; "" when it is not).

Average precisions are computed block-wise with copairs' exact conventions
(:func:`metrics.replicate_average_precision`, :func:`metrics.multilabel_average_precision`), then
copairs' ``mean_average_precision`` gives the mAP, its null p-values and BH correction; copairs'
own pair lists grow with (treatment wells × control wells) and (treatments²), too big at JUMP size.
copairs' null is used unless it would permute more than ``COPAIRS_NULL_BUDGET`` integers; then the
same null distribution is drawn in O(positives) per draw (the ``null`` column says which).  No step
holds an N × N matrix of treatments.

``--level treatment`` (a published one-profile-per-treatment table): activity is n/a (it ranks
replicate *wells* against control *wells*); the MoA metrics run on the treatment rows.

``phenoprofiler evaluate --table PATH --level well|treatment [column options] --out DIR`` evaluates
an existing profile table: the profile steps (normalize unless ``--normalized``, select, consensus)
into ``DIR/profiles/``, the tables above into ``DIR``, and ``DIR/summary.parquet``.

``phenoprofiler evaluate --summary eval/<set> ... --out eval/summary.parquet`` writes one row per
(set, metric): the variant computed, the value, and ``note`` (why the value is NaN; "" otherwise).

Negative controls and treatments without MoA labels are never MoA queries.  ``--same-wells-as``
restricts the wells to those every listed set also has, so sets are compared on the same wells.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics
from .errors import ConfigError, DataError
from .io import write_json, write_parquet
from .profiles import TREATMENT_COLUMNS, consensus_profiles, feature_columns

log = logging.getLogger(__name__)

WELL_KEYS = ["Metadata_Plate", "Metadata_Well"]
EVAL_FILES = ("map_activity", "map_consistency", "foe_map_recall")
NOTES_FILE = "notes.json"
LEVELS = ("well", "treatment")

# copairs' mAP table columns, shared by activity and consistency
MAP_COLUMNS = [
    "mean_average_precision",
    "mean_normalized_average_precision",
    "p_value",
    "corrected_p_value",
    "below_p",
    "below_corrected_p",
    "null",
]
ACTIVITY_COLUMNS = [*TREATMENT_COLUMNS, "n_wells", *MAP_COLUMNS]
CONSISTENCY_COLUMNS = ["Metadata_moa_label", "n_treatments", *MAP_COLUMNS]
# Reasons a table is empty (or a metric NaN), shown in the report next to the missing number.
NOTE_TREATMENT_LEVEL = "treatment-level table: activity needs replicate wells and control wells"
NOTE_NO_NEGCON = "no negative-control wells to rank replicates against"
NOTE_NO_REPLICATES = "no treatment has >= 2 replicate wells"
NOTE_NO_SHARED_MOA = "no MoA label shared by >= 2 treatments"
NOTE_FEW_ANNOTATED = "fewer than 2 non-control treatments with MoA labels"
NOTE_NO_MOA_OF_THREE = "no MoA with >= 3 treatments (a query needs >= 2 other same-MoA treatments)"
NOTE_EMPTY_MARGIN = "every query's 2x2 table has an empty margin (odds ratio undefined)"


def _copairs_map():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import copairs.map as copairs_map
        from copairs.map.normalization import expected_ap
    # copairs narrates every step at INFO; our log should show our steps.
    logging.getLogger("copairs").setLevel(max(logging.WARNING, logging.getLogger().level))
    return copairs_map, expected_ap


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
    finite = np.isfinite(df[features].to_numpy()).all(axis=1)  # in the stored precision: no copy to float64
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{path}: row {row} has NaN/inf features; profiles must be finite to compare")
    df["Metadata_moa"] = df["Metadata_moa"].fillna("").astype(str)
    return df, features


def _with_note(table: pd.DataFrame, note: str) -> pd.DataFrame:
    table.attrs["note"] = note
    return table


# ----------------------------------------------------------------------------- copairs


def _normalized_ap(ap: np.ndarray, n_pos: np.ndarray, n_total: np.ndarray, expected_ap) -> np.ndarray:
    """copairs' normalized AP, (AP - μ0) / (1 - μ0), with μ0 from copairs' ``expected_ap`` once per
    distinct (positives, negatives) configuration (copairs evaluates it per row, each costing a
    Python sum over the ranked list)."""
    configs = np.stack([n_pos, n_total - n_pos], axis=1).astype(np.int64)
    unique, inverse = np.unique(configs, axis=0, return_inverse=True)
    mu0 = np.array([expected_ap(int(m), int(n)) for m, n in unique], dtype=float)[inverse.ravel()]
    return np.clip((ap - mu0) / np.maximum(1 - mu0, 1e-10), -1.0, 1.0)


# copairs draws its null by permuting all n ranks for every distinct (positives, total) configuration;
# above this many integers permuted (about a minute on one core) the same null distribution is drawn
# in O(positives) per draw instead (metrics.null_average_precision).  Activity with replicate wells
# stays far below it even at JUMP size (a few configurations); MoA consistency exceeds it from a few
# thousand labelled treatments on.
COPAIRS_NULL_BUDGET = 2 * 10**9
NULL_METHODS = ("auto", "copairs", "sampled")


def _sampled_map_pvalues(ap_table: pd.DataFrame, sameby: str, *, null_size: int, seed: int) -> pd.DataFrame:
    """copairs' mAP p-values (a group's null = the mean of its members' AP nulls, draw by draw;
    p = (#null > mAP + 1) / (null_size + 1)) with nulls from :func:`metrics.null_average_precision`."""
    configs = ap_table[["n_pos_pairs", "n_total_pairs"]].to_numpy(dtype=np.int64)
    unique, inverse = np.unique(configs, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    nulls = np.stack([metrics.null_average_precision(int(k), int(n), null_size, seed) for k, n in unique])
    groups = ap_table.groupby(sameby, sort=True, observed=True).indices
    rows = []
    for key, positions in groups.items():
        mean_ap = float(ap_table["average_precision"].to_numpy()[positions].mean())
        null = nulls[inverse[positions]].mean(axis=0)
        rows.append(
            {
                sameby: key,
                "mean_average_precision": mean_ap,
                "mean_normalized_average_precision": float(
                    ap_table["normalized_average_precision"].to_numpy()[positions].mean()
                ),
                "p_value": (int((null > mean_ap).sum()) + 1) / (null_size + 1),
            }
        )
    return pd.DataFrame(rows)


def _map_with_pvalues(
    ap_table: pd.DataFrame, sameby: str, *, null_size, threshold, seed, null: str = "auto"
) -> pd.DataFrame:
    """mAP per ``sameby`` group, p-values against the AP null, BH-corrected (copairs' procedure).

    ``null``: ``copairs`` (copairs' own ``mean_average_precision``), ``sampled`` (the same null
    distribution drawn in O(positives), :func:`metrics.null_average_precision`), or ``auto``:
    copairs' unless its null would permute more than ``COPAIRS_NULL_BUDGET`` integers.  The
    ``null`` column of the result says which.
    """
    if null not in NULL_METHODS:
        raise ConfigError(f"null distribution must be one of {NULL_METHODS}, got {null!r}")
    copairs_map, expected_ap = _copairs_map()
    from copairs.map.hierarchical_fdr import apply_fdr_correction

    ap_table = ap_table[ap_table["average_precision"].notna() & (ap_table["n_pos_pairs"] > 0)].copy()
    ap_table["normalized_average_precision"] = _normalized_ap(
        ap_table["average_precision"].to_numpy(dtype=float),
        ap_table["n_pos_pairs"].to_numpy(),
        ap_table["n_total_pairs"].to_numpy(),
        expected_ap,
    )
    if null == "auto":
        configs = ap_table[["n_pos_pairs", "n_total_pairs"]].drop_duplicates().to_numpy()
        cost = metrics.copairs_null_cost(configs, null_size)
        null = "copairs" if cost <= COPAIRS_NULL_BUDGET else "sampled"
        if null == "sampled":
            log.info(
                "%s: copairs' null would permute %.1e integers (%d configurations); drawing the same "
                "null in O(positives) per draw instead",
                sameby,
                cost,
                len(configs),
            )
    if null == "copairs":
        result = copairs_map.mean_average_precision(
            ap_table.reset_index(drop=True),
            [sameby],
            null_size=null_size,
            threshold=threshold,
            seed=seed,
            progress_bar=False,
        ).drop(columns=["indices"], errors="ignore")
    else:
        result = apply_fdr_correction(
            _sampled_map_pvalues(ap_table.reset_index(drop=True), sameby, null_size=null_size, seed=seed)
        )
        result["below_p"] = result["p_value"] < threshold
        result["below_corrected_p"] = result["corrected_p_value"] < threshold
    result["null"] = null
    return result


def activity_map(
    wells: pd.DataFrame,
    features: list[str],
    *,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    same_plate_negcon: bool = False,
    null: str = "auto",
) -> pd.DataFrame:
    """copairs phenotypic activity: replicate wells of a treatment vs negative-control wells.

    A well's positives are the other wells of its treatment, its negatives the control wells (of
    its own plate with ``same_plate_negcon``); controls are never each other's replicates.
    """
    empty = pd.DataFrame(columns=ACTIVITY_COLUMNS)
    wells = wells.reset_index(drop=True)
    is_negcon = (wells["Metadata_pert_type"] == "negcon").to_numpy()
    if not is_negcon.any():
        log.warning("activity mAP: %s - writing an empty table", NOTE_NO_NEGCON)
        return _with_note(empty, NOTE_NO_NEGCON)
    groups = pd.factorize(wells["Metadata_TreatmentId"])[0]
    pools = pd.factorize(wells["Metadata_Plate"])[0] if same_plate_negcon else None
    # float32 profiles stay float32 here: the AP kernel converts block by block (as copairs' float64)
    ap = metrics.replicate_average_precision(wells[features].to_numpy(), groups, is_negcon, pools=pools)
    if ap.empty:
        log.warning("activity mAP: %s - writing an empty table", NOTE_NO_REPLICATES)
        return _with_note(empty, NOTE_NO_REPLICATES)
    ap["Metadata_TreatmentId"] = wells["Metadata_TreatmentId"].to_numpy()[ap["row"].to_numpy()]
    result = _map_with_pvalues(
        ap, "Metadata_TreatmentId", null_size=null_size, threshold=threshold, seed=seed, null=null
    )
    info = (
        wells.groupby("Metadata_TreatmentId")
        .agg(**{c: (c, "first") for c in TREATMENT_COLUMNS[1:]}, n_wells=("Metadata_Well", "size"))
        .reset_index()
    )
    result = info.merge(result, on="Metadata_TreatmentId", how="inner")
    return _with_note(result.sort_values("Metadata_TreatmentId").reset_index(drop=True)[ACTIVITY_COLUMNS], "")


def consistency_map(
    consensus: pd.DataFrame,
    features: list[str],
    *,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    sep: str = "|",
    null: str = "auto",
) -> pd.DataFrame:
    """copairs multilabel MoA consistency on consensus (treatment-level) profiles, per MoA label."""
    keep = (consensus["Metadata_pert_type"] != "negcon") & (
        consensus["Metadata_moa"].map(lambda m: len(metrics.split_moa(m, sep))) > 0
    )
    table = consensus[keep].reset_index(drop=True)
    empty = pd.DataFrame(columns=CONSISTENCY_COLUMNS)
    if len(table) < 2:
        log.warning("MoA consistency: %s - writing an empty table", NOTE_FEW_ANNOTATED)
        return _with_note(empty, NOTE_FEW_ANNOTATED)
    ap = metrics.multilabel_average_precision(
        table[features].to_numpy(dtype=np.float64), table["Metadata_moa"].tolist(), sep=sep
    )
    if ap.empty:
        log.warning("MoA consistency: %s - writing an empty table", NOTE_NO_SHARED_MOA)
        return _with_note(empty, NOTE_NO_SHARED_MOA)
    ap = ap.rename(columns={"label": "Metadata_moa_label"})
    result = _map_with_pvalues(
        ap, "Metadata_moa_label", null_size=null_size, threshold=threshold, seed=seed, null=null
    )
    counts = ap.groupby("Metadata_moa_label").size().rename("n_treatments").reset_index()
    result = counts.merge(result, on="Metadata_moa_label", how="inner")
    return _with_note(
        result.sort_values("Metadata_moa_label").reset_index(drop=True)[CONSISTENCY_COLUMNS], ""
    )


# ----------------------------------------------------------------------------- FoE / MAP / recall


def treatment_means(wells: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Treatment profiles = mean of the treatment's well profiles (DESIGN.md §6)."""
    grouped = wells.groupby("Metadata_TreatmentId", sort=True)
    info = grouped.agg(
        **{c: (c, "first") for c in TREATMENT_COLUMNS[1:]}, n_wells=("Metadata_TreatmentId", "size")
    )
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
    """Per-query FoE, map_ap, map_interpolated and Recall@k% over annotated, non-control treatments.

    Block-wise over query treatments (:func:`metrics.retrieval_metrics_from_profiles`): memory
    grows with the number of treatments, not with its square.
    """
    # Only annotated, non-control wells take part: drop the others before averaging (at JUMP size
    # most wells have no MoA label).
    labelled = {m: len(metrics.split_moa(m, sep)) > 0 for m in wells["Metadata_moa"].unique()}
    keep = (wells["Metadata_pert_type"] != "negcon").to_numpy() & wells["Metadata_moa"].map(
        labelled
    ).to_numpy()
    treatments = treatment_means(wells[keep], features)
    columns = list(TREATMENT_COLUMNS) + ["n_wells", "n_same_moa"]
    if len(treatments) < 2:
        log.warning("MoA retrieval: %s - writing an empty table", NOTE_FEW_ANNOTATED)
        return _with_note(pd.DataFrame(columns=columns), NOTE_FEW_ANNOTATED)
    result = metrics.retrieval_metrics_from_profiles(
        treatments[features].to_numpy(),
        treatments["Metadata_moa"].tolist(),
        sep=sep,
        percentile=percentile,
        recall_percents=recall_percents,
    )
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
    return _with_note(table, "" if is_query.any() else NOTE_NO_SHARED_MOA)


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
    level: str = "well",
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
    """Compute and write the three evaluation tables of one feature set, and ``notes.json``."""
    if level not in LEVELS:
        raise ConfigError(f"evaluate level must be one of {LEVELS}, got {level!r}")
    profiles_dir, out_dir = Path(profiles_dir), Path(out_dir)
    if level == "well":  # the well table first: it is the one a well-level set cannot do without
        wells, features = _read_profiles(
            profiles_dir / "selected.parquet", WELL_KEYS + list(TREATMENT_COLUMNS)
        )
    consensus, consensus_features = _read_profiles(
        profiles_dir / "consensus.parquet", list(TREATMENT_COLUMNS)
    )
    if level == "treatment":
        if same_wells_as:
            log.info("treatment-level profiles: --same-wells-as does not apply (no wells)")
        wells, features = consensus, consensus_features
        activity = _with_note(pd.DataFrame(columns=ACTIVITY_COLUMNS), NOTE_TREATMENT_LEVEL)
    else:
        if same_wells_as:
            shared = common_wells(same_wells_as)
            keys = list(map(tuple, wells[WELL_KEYS].astype(str).to_numpy()))
            keep = np.array([k in shared for k in keys], dtype=bool)
            if not keep.any():
                raise DataError(
                    f"{profiles_dir}: no wells in common with {list(map(str, same_wells_as))} "
                    "(a profile table of other plates: set its external same_wells: false)"
                )
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
    if level == "treatment" and "Metadata_n_wells" in consensus.columns and len(retrieval):
        n_wells = consensus.set_index("Metadata_TreatmentId")["Metadata_n_wells"]
        retrieval["n_wells"] = retrieval["Metadata_TreatmentId"].map(n_wells).to_numpy()
    notes = dict(
        level=level,
        recall_percents=list(recall_percents),
        map_activity=activity.attrs.get("note", ""),
        map_consistency=consistency.attrs.get("note", ""),
        foe_map_recall=retrieval.attrs.get("note", ""),
    )
    paths = {name: out_dir / f"{name}.parquet" for name in EVAL_FILES}
    write_parquet(activity, paths["map_activity"])
    write_parquet(consistency, paths["map_consistency"])
    write_parquet(retrieval, paths["foe_map_recall"])
    paths["notes"] = out_dir / NOTES_FILE
    write_json(notes, paths["notes"])
    return paths


def _retrieval_note(metric: str, result: metrics.RetrievalResult, table_note: str) -> str:
    """Why a FoE / MAP / recall summary value is NaN."""
    if table_note:
        return table_note
    if not (result.n_positives >= 1).any():
        return NOTE_NO_SHARED_MOA
    if metric == "map_interpolated":
        return NOTE_NO_MOA_OF_THREE
    if metric.startswith("foe_top1_m"):
        return NOTE_EMPTY_MARGIN
    return "no query treatment"


def summarize_set(eval_dir: str | Path, *, alpha: float = 0.05, name: str | None = None) -> pd.DataFrame:
    """One row per metric of one set: set, metric, variant, value, n (queries/treatments/labels),
    description, note (why value is NaN; "" otherwise)."""
    eval_dir = Path(eval_dir)
    tables = {}
    for table_name in EVAL_FILES:
        path = eval_dir / f"{table_name}.parquet"
        if not path.is_file():
            raise DataError(f"evaluation table not found: {path}")
        tables[table_name] = pd.read_parquet(path)
    notes_path = eval_dir / NOTES_FILE
    notes = json.loads(notes_path.read_text()) if notes_path.is_file() else {}
    rows = []

    def add(metric, value, n, variant, description, note=""):
        value = float(value)
        rows.append(
            dict(
                set=name or eval_dir.name,
                metric=metric,
                variant=variant,
                value=value,
                n=int(n),
                description=description,
                note=(note or "no result") if np.isnan(value) else "",
            )
        )

    def mean_or_nan(series):
        return float(series.astype(float).mean()) if len(series) else float("nan")

    def copairs_variant(table, base):
        sampled = "null" in table.columns and (table["null"] == "sampled").any()
        return f"{base}, sampled null" if sampled else base

    activity = tables["map_activity"]
    activity_note = notes.get("map_activity", "")
    add(
        "map_activity",
        mean_or_nan(activity["mean_average_precision"]),
        len(activity),
        copairs_variant(activity, "copairs"),
        "copairs mAP of a treatment's replicate wells against negcon wells, mean over treatments",
        activity_note,
    )
    add(
        "fraction_retrieved_activity",
        mean_or_nan(activity["below_corrected_p"]),
        len(activity),
        copairs_variant(activity, f"copairs BH {alpha}"),
        f"fraction of treatments whose BH-corrected copairs p-value is below {alpha}",
        activity_note,
    )
    consistency = tables["map_consistency"]
    consistency_note = notes.get("map_consistency", "")
    add(
        "map_consistency",
        mean_or_nan(consistency["mean_average_precision"]),
        len(consistency),
        copairs_variant(consistency, "copairs multilabel"),
        "copairs multilabel mAP on consensus profiles (positives share the label), mean over MoA labels",
        consistency_note,
    )
    add(
        "fraction_retrieved_consistency",
        mean_or_nan(consistency["below_corrected_p"]),
        len(consistency),
        copairs_variant(consistency, f"copairs BH {alpha}"),
        f"fraction of MoA labels whose BH-corrected copairs p-value is below {alpha}",
        consistency_note,
    )
    retrieval = tables["foe_map_recall"]
    if len(retrieval):
        result = _result_from_table(retrieval)
    else:
        percents = notes.get("recall_percents", list(metrics.DEFAULT_RECALL_PERCENTS))
        result = metrics.RetrievalResult(
            n_positives=np.zeros(0, dtype=int),
            foe_v=np.zeros((0, 4), dtype=int),
            foe_threshold=np.zeros(0),
            foe_odds_ratio=np.zeros(0),
            foe_p_value=np.zeros(0),
            average_precision=np.zeros(0),
            interpolated_precision=np.zeros(0),
            recall={int(k): np.zeros(0) for k in percents},
        )
    table_note = notes.get("foe_map_recall", "") or ("" if len(retrieval) else NOTE_FEW_ANNOTATED)
    for metric, e in metrics.summarize_retrieval(result, alpha=alpha).items():
        add(
            metric,
            e["value"],
            e["n"],
            e["variant"],
            e["description"],
            _retrieval_note(metric, result, table_note),
        )
    return pd.DataFrame(rows, columns=["set", "metric", "variant", "value", "n", "description", "note"])


def write_summary(eval_dirs: Sequence[str | Path], out: str | Path, *, alpha: float = 0.05) -> pd.DataFrame:
    summary = pd.concat([summarize_set(d, alpha=alpha) for d in eval_dirs], ignore_index=True)
    write_parquet(summary, out)
    return summary


# ----------------------------------------------------------------------------- CLI


def _evaluation_options(args: argparse.Namespace) -> dict:
    return dict(
        null_size=args.null_size,
        threshold=args.threshold,
        seed=args.seed,
        percentile=args.foe_percentile,
        recall_percents=args.recall_percents,
        same_plate_negcon=args.same_plate_negcon,
        consensus_operation=args.consensus,
        sep=args.moa_separator,
    )


def _print_summary(summary: pd.DataFrame) -> None:
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(summary[["set", "metric", "value", "n", "note"]].to_string(index=False))


def _run(args: argparse.Namespace) -> None:
    if args.summary:
        _print_summary(write_summary(args.summary, args.out, alpha=args.threshold))
        return
    if args.table:
        from . import external
        from .profiles import step_options

        options = _evaluation_options(args)
        options.pop("consensus_operation")
        paths = external.evaluate_table(
            args.table,
            args.out,
            mapping=external.mapping_from_args(args),
            level=args.level,
            name=args.name,
            already_normalized=args.normalized,
            steps=step_options(args),
            **options,
        )
        _print_summary(pd.read_parquet(paths["summary"]))
        return
    if args.level != "well" and args.same_wells_as:
        log.info("--same-wells-as is ignored for --level %s", args.level)
    paths = evaluate_profiles(
        args.profiles,
        args.out,
        level=args.level,
        same_wells_as=args.same_wells_as or (),
        **_evaluation_options(args),
    )
    for path in paths.values():
        print(path)


def register_cli(subparsers) -> None:
    from . import external
    from .profiles import add_step_arguments

    parser = subparsers.add_parser(
        "evaluate",
        help="copairs mAP, FoE, MAP and Recall@k of a feature set or a profile table; or --summary of all sets",
        description=__doc__.splitlines()[0],
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profiles", help="profiles/<set> folder (selected.parquet, consensus.parquet)")
    source.add_argument(
        "--table",
        nargs="+",
        metavar="PATH",
        help="an existing profile table (CSV, CSV.GZ, Parquet): profile steps into OUT/profiles, then "
        "every metric into OUT and OUT/summary.parquet",
    )
    source.add_argument(
        "--summary",
        nargs="+",
        metavar="EVAL_DIR",
        help="eval/<set> folders to summarise into --out (one row per set and metric)",
    )
    parser.add_argument(
        "--out", required=True, help="eval/<set> folder, or eval/summary.parquet with --summary"
    )
    parser.add_argument("--name", default=None, help="--table: set name in the summary (default: file stem)")
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
    parser.add_argument("--moa-separator", default="|", help="separator between MoA labels")
    # --table: the profile steps' options (--consensus is also used when --same-wells-as drops wells)
    add_step_arguments(parser)
    external.add_table_arguments(parser)
    parser.set_defaults(func=_run)
