"""Per-site features -> well, normalized, feature-selected and consensus profiles (pycytominer).

Input: ``features/<set>/<plate>.parquet`` (one row per site: ``Metadata_*`` columns + float feature
columns).  Output, under ``profiles/<set>/``, one Parquet file per step so each can be inspected:

1. phenotype correction (learned sets only): per plate, subtract α × the mean negative-control site
   profile (DESIGN.md §5, α = 0.7 in the PhenoProfiler paper);
2. ``well.parquet``: sites aggregated to wells (``pycytominer.aggregate``);
3. ``normalized.parquet``: against negative-control wells (``pycytominer.normalize``), at a
   scope that fits the controls the plates have (``normalization.json`` says which and why): per
   plate (one call per plate) only when every plate has at least ``min_controls_per_plate``
   control wells, otherwise pooled over all plates (one call) or per batch (one call per batch);
   sphering is fit on control wells of all plates in one call;
4. ``selected.parquet``: ``pycytominer.feature_select`` with an explicit operation list that starts
   with ``drop_na_columns``;
5. ``consensus.parquet``: one profile per treatment (``pycytominer.consensus``).

Steps 1-2 run one plate file at a time (only one plate's sites in memory).  A published profile
table (``--table``, :mod:`phenoprofiler_core.external`) enters at step 3 when it has one row per
well, or at step 4 when it has one row per treatment (:func:`profile_steps`).

pycytominer infers features from CellProfiler compartment prefixes (Cells_, Nuclei_, ...), which
embedding columns do not have, so every call gets an explicit ``features=[...]`` list.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .errors import ConfigError, DataError
from .io import write_json, write_parquet

log = logging.getLogger(__name__)

REQUIRED_METADATA = (
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_Treatment",
    "Metadata_TreatmentId",
    "Metadata_pert_type",
    "Metadata_moa",
)
# Columns that describe a treatment and must therefore be constant over its wells.
TREATMENT_COLUMNS = ("Metadata_TreatmentId", "Metadata_Treatment", "Metadata_pert_type", "Metadata_moa")
NEGCON_QUERY = "Metadata_pert_type == 'negcon'"

AGGREGATE_OPERATIONS = ("median", "mean")
NORMALIZE_METHODS = ("mad_robustize", "standardize", "robustize", "spherize", "none")
PER_PLATE_METHODS = ("mad_robustize", "standardize", "robustize")
NORMALIZE_SCOPES = ("auto", "plate", "pooled", "batch")
# A per-plate robust z-score needs this many control wells per plate (else auto pools them).  With
# n Gaussian controls, the MAD-based scale of a feature is off by more than a factor 2 with
# probability 42% (n=2), 22% (6), 10% (10), 4% (16), 1% (24) (simulation, 200,000 draws each;
# config/README.md): at 16, few of a profile's hundreds of features are badly scaled.
DEFAULT_MIN_CONTROLS_PER_PLATE = 16
SPHERIZE_METHODS = ("ZCA", "ZCA-cor", "PCA", "PCA-cor")
FEATURE_SELECT_OPERATIONS = (
    "drop_na_columns",
    "variance_threshold",
    "frequency_threshold",
    "correlation_threshold",
    "drop_outliers",
    "blocklist",
)
CONSENSUS_OPERATIONS = ("median", "mean", "modz")


def _pycytominer():
    # Importing pycytominer under pandas 3 emits a deprecation warning that is not ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pycytominer
    return pycytominer


@contextlib.contextmanager
def _no_fragmentation_warning():
    # pycytominer.aggregate inserts its group keys column by column into a wide frame, which pandas
    # flags as a PerformanceWarning: harmless, and not ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        yield


def feature_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if not str(c).startswith("Metadata_")]


def metadata_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if str(c).startswith("Metadata_")]


# ----------------------------------------------------------------------------- reading


def _read_feature_file(path: str | Path, expected: list[str] | None, first: str | Path | None):
    """One plate's site table, checked against the contract; features as float64."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file not found: {path}")
    df = pd.read_parquet(path)
    missing = [c for c in REQUIRED_METADATA if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing metadata column(s) {missing}; expected {list(REQUIRED_METADATA)}")
    these = feature_columns(df)
    if not these:
        raise DataError(f"{path}: no feature columns (every column starts with Metadata_)")
    bad = [c for c in these if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise DataError(f"{path}: feature column(s) {bad[:5]} are not numeric")
    if expected is not None and set(these) != set(expected):
        diff = sorted(set(these) ^ set(expected))[:5]
        raise DataError(f"{path}: feature columns differ from {first} (e.g. {diff})")
    if df.empty:
        raise DataError(f"{path}: no rows")
    df["Metadata_moa"] = df["Metadata_moa"].fillna("").astype(str)
    for column in (
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Treatment",
        "Metadata_TreatmentId",
        "Metadata_pert_type",
    ):
        if df[column].isna().any():
            row = int(np.flatnonzero(df[column].isna().to_numpy())[0])
            raise DataError(f"{path}: column {column} is empty in row {row}")
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    duplicated = df.duplicated(keys)
    if duplicated.any():
        first_dup = df.loc[duplicated, keys].iloc[0].to_dict()
        raise DataError(f"{path}: site {first_dup} appears more than once")
    features = list(expected) if expected is not None else these
    # One float64 block (also defragments the frame the many feature columns came in).
    df = pd.concat([df[metadata_columns(df)], df[features].astype(np.float64)], axis=1)
    return df, features


def read_site_features(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate per-plate site feature tables, checking that they fit together."""
    if not paths:
        raise DataError("no feature files given (expected features/<set>/<plate>.parquet)")
    frames, features = [], None
    for path in paths:
        df, features = _read_feature_file(path, features, paths[0])
        frames.append(df)
    sites = pd.concat(frames, ignore_index=True)
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    duplicated = sites.duplicated(keys)
    if duplicated.any():
        first = sites.loc[duplicated, keys].iloc[0].to_dict()
        raise DataError(f"site {first} appears more than once in the feature tables")
    return sites, list(features)


def well_profiles(
    feature_paths: Sequence[str | Path], *, correction_alpha: float = 0.0, aggregate: str = "median"
) -> tuple[pd.DataFrame, list[str]]:
    """Site tables -> corrected, aggregated well profiles, one plate file at a time.

    Phenotype correction and aggregation are both within a plate, so only one plate's sites are
    ever in memory: a JUMP-size dataset (millions of sites) needs the memory of its wells, not of
    its sites.
    """
    if not feature_paths:
        raise DataError("no feature files given (expected features/<set>/<plate>.parquet)")
    parts, features, n_sites = [], None, 0
    for path in tqdm(feature_paths, desc="plates -> wells", unit="plate", disable=len(feature_paths) < 20):
        sites, features = _read_feature_file(path, features, feature_paths[0])
        n_sites += len(sites)
        sites = correct_phenotype(sites, features, correction_alpha)
        parts.append(aggregate_wells(sites, features, aggregate))
        del sites
    wells = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    keys = ["Metadata_Plate", "Metadata_Well"]
    duplicated = wells.duplicated(keys)
    if duplicated.any():
        first = wells.loc[duplicated, keys].iloc[0].to_dict()
        raise DataError(f"well {first} appears in more than one feature file (one file per plate expected)")
    log.info("read %d sites x %d features from %d file(s)", n_sites, len(features), len(feature_paths))
    return wells.sort_values(keys, kind="stable").reset_index(drop=True), list(features)


def _require_negcon_per_plate(df: pd.DataFrame, step: str) -> None:
    plates = df["Metadata_Plate"].unique()
    with_controls = set(df.loc[df["Metadata_pert_type"] == "negcon", "Metadata_Plate"].unique())
    without = [p for p in plates if p not in with_controls]
    if without:
        raise DataError(
            f"{step}: plate(s) {without} have no negative-control rows (Metadata_pert_type == 'negcon'); "
            "every plate needs controls (set metadata.negcon in the config)"
        )


# ----------------------------------------------------------------------------- steps


def correct_phenotype(sites: pd.DataFrame, features: list[str], alpha: float) -> pd.DataFrame:
    """Per plate, subtract ``alpha`` × the mean negative-control site profile.

    Removes the plate's shared "control look" from learned embeddings, as the PhenoProfiler paper
    does (α = 0.7) before aggregation.  A plate without controls cannot be corrected: DataError.
    """
    if alpha == 0:
        return sites
    _require_negcon_per_plate(sites, "phenotype correction")
    corrected = sites.copy()
    values = np.array(corrected[features], dtype=np.float64)  # a writable copy (pandas 3 views are read-only)
    plates = corrected["Metadata_Plate"].to_numpy()
    negcon = (corrected["Metadata_pert_type"] == "negcon").to_numpy()
    for plate in pd.unique(plates):
        on_plate = plates == plate
        control_mean = np.nanmean(values[on_plate & negcon], axis=0)
        values[on_plate] -= alpha * np.nan_to_num(control_mean)
    corrected[features] = values
    return corrected


def _well_metadata(sites: pd.DataFrame) -> pd.DataFrame:
    """Metadata that is constant within each well (the site-specific columns are dropped)."""
    keys = ["Metadata_Plate", "Metadata_Well"]
    candidates = [c for c in metadata_columns(sites) if c not in keys and c != "Metadata_Site"]
    grouped = sites.groupby(keys, sort=True, dropna=False)
    n_unique = grouped[candidates].nunique(dropna=False)
    constant = [c for c in candidates if (n_unique[c] <= 1).all()]
    for column in TREATMENT_COLUMNS + ("Metadata_pert_type",):
        if column not in constant:
            bad = n_unique.index[(n_unique[column] > 1).to_numpy()][0]
            raise DataError(f"well {dict(zip(keys, bad))} has sites with different {column} values")
    meta = grouped[constant].first().reset_index()
    meta["Metadata_n_sites"] = grouped.size().to_numpy()
    return meta


def aggregate_wells(sites: pd.DataFrame, features: list[str], operation: str = "median") -> pd.DataFrame:
    """Sites -> wells with ``pycytominer.aggregate``; well-constant metadata is kept."""
    if operation not in AGGREGATE_OPERATIONS:
        raise ConfigError(f"profiles.aggregate: {operation!r} is not one of {AGGREGATE_OPERATIONS}")
    pycytominer = _pycytominer()
    keys = ["Metadata_Plate", "Metadata_Well"]
    with _no_fragmentation_warning():
        wells = pycytominer.aggregate(
            population_df=sites[keys + features].copy(), strata=keys, features=features, operation=operation
        )
    wells = _well_metadata(sites).merge(wells, on=keys, how="inner", validate="one_to_one")
    return wells.sort_values(keys, kind="stable").reset_index(drop=True)


def controls_per_plate(wells: pd.DataFrame) -> dict[str, int]:
    """Number of negative-control wells on every plate (0 for a plate without controls)."""
    negcon = wells["Metadata_pert_type"] == "negcon"
    counts = negcon.groupby(wells["Metadata_Plate"].astype(str), sort=True).sum()
    return {str(plate): int(n) for plate, n in counts.items()}


def _controls_per_group(wells: pd.DataFrame, column: str) -> dict[str, int]:
    negcon = wells["Metadata_pert_type"] == "negcon"
    counts = negcon.groupby(wells[column].astype(str), sort=True).sum()
    return {str(group): int(n) for group, n in counts.items()}


def _few(counts: dict[str, int], minimum: int) -> dict[str, int]:
    return {group: n for group, n in counts.items() if n < minimum}


def _listed(counts: dict[str, int], limit: int = 5) -> str:
    items = [f"{group} ({n})" for group, n in list(counts.items())[:limit]]
    more = len(counts) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def normalization_plan(
    wells: pd.DataFrame,
    *,
    method: str = "mad_robustize",
    scope: str = "auto",
    batch_column: str | None = None,
    min_controls_per_plate: int = DEFAULT_MIN_CONTROLS_PER_PLATE,
) -> dict:
    """Decide where the normalization is fit, and say why: the ``normalization.json`` record.

    ``auto`` normalizes per plate only when every plate has at least ``min_controls_per_plate``
    control wells: a robust z-score's median and MAD from 2 wells set every control to ±0.674 and
    divide treatments by the spread of two numbers (DESIGN.md §5).  Otherwise it pools the controls
    per batch (when ``batch_column`` is given and every batch has enough) or over all plates.
    Sphering estimates a whole covariance matrix, so ``auto`` always fits it on the pooled controls.
    """
    if method not in NORMALIZE_METHODS:
        raise ConfigError(f"profiles.normalize: {method!r} is not one of {NORMALIZE_METHODS}")
    if scope not in NORMALIZE_SCOPES:
        raise ConfigError(f"profiles.normalize_scope: {scope!r} is not one of {NORMALIZE_SCOPES}")
    if min_controls_per_plate < 1:
        raise ConfigError(f"profiles.min_controls_per_plate must be >= 1, got {min_controls_per_plate}")
    if batch_column is not None and batch_column not in wells.columns:
        raise DataError(
            f"profiles.batch_column: column {batch_column!r} is not in the well profiles "
            f"(metadata columns: {metadata_columns(wells)})"
        )
    if scope == "batch" and batch_column is None:
        raise ConfigError("profiles.normalize_scope is 'batch' but profiles.batch_column is not set")
    per_plate = controls_per_plate(wells) if "Metadata_Plate" in wells.columns else {}
    total = sum(per_plate.values())
    minimum = min_controls_per_plate
    warnings_: list[str] = []
    record = dict(
        method=method,
        scope="none",
        batch_column=None,
        reason="",
        controls_per_plate=per_plate,
        min_controls_per_plate=minimum,
        warnings=warnings_,
    )
    if method == "none":
        record["reason"] = "profiles.normalize is 'none': features are left as they are"
        return record

    without = _few(per_plate, 1)
    if without and scope == "auto":
        # Most often a misspelt metadata.negcon; pooling would silently hide that.
        raise DataError(
            f"normalize ({method}): plate(s) {_listed(without)} have no negative-control rows "
            "(Metadata_pert_type == 'negcon'); every plate needs controls (set metadata.negcon in the "
            "config), or set profiles.normalize_scope: pooled to normalize them against the other plates' controls"
        )
    if without and scope in ("pooled", "batch"):
        warnings_.append(
            f"plate(s) {_listed(without)} have no control wells: normalized against the controls of "
            "other plates, their plate effects stay"
        )
    few_plates = _few(per_plate, minimum)
    batches = _controls_per_group(wells, batch_column) if batch_column else {}
    few_batches = _few(batches, minimum)
    if scope == "auto":
        if method == "spherize":
            chosen = "pooled"
            reason = (
                f"sphering estimates a full covariance matrix, far more than one plate's controls can "
                f"support: fit once on the {total} control wells of all {len(per_plate)} plates"
            )
        elif not few_plates:
            chosen = "plate"
            reason = f"every plate has at least {minimum} control wells (fewest: {min(per_plate.values())})"
        elif batch_column and not few_batches:
            chosen = "batch"
            reason = (
                f"plate(s) {_listed(few_plates)} have fewer than {minimum} control wells; every batch "
                f"of {batch_column} has at least {minimum} (fewest: {min(batches.values())})"
            )
        else:
            chosen = "pooled"
            reason = (
                f"plate(s) {_listed(few_plates)} have fewer than {minimum} control wells, too few for "
                f"a per-plate location and scale: fit on the {total} control wells of all "
                f"{len(per_plate)} plates pooled"
            )
            if batch_column:
                reason += f" (batch(es) {_listed(few_batches)} of {batch_column} are short too)"
    else:
        chosen = scope
        reason = f"profiles.normalize_scope is {scope!r} (set in the config)"
        if scope == "plate" and few_plates:
            warnings_.append(
                f"plate(s) {_listed(few_plates)} have fewer than {minimum} control wells: their "
                "per-plate location and scale rest on very few wells"
            )
        if scope == "batch" and few_batches:
            warnings_.append(
                f"batch(es) {_listed(few_batches)} of {batch_column} have fewer than {minimum} control "
                "wells: their location and scale rest on very few wells"
            )
    if chosen == "pooled" and total < minimum:
        warnings_.append(
            f"only {total} control wells in all plates together (fewer than {minimum}): the "
            "normalization rests on very few wells"
        )
    record.update(scope=chosen, reason=reason, batch_column=batch_column if chosen == "batch" else None)
    return record


def _normalization_groups(wells: pd.DataFrame, scope: str, batch_column: str | None):
    """(label, row positions) of each part normalized by its own pycytominer call."""
    if scope == "pooled":
        return [("all plates", np.arange(len(wells)))]
    column = "Metadata_Plate" if scope == "plate" else batch_column
    groups = wells.groupby(wells[column].astype(str), sort=True).indices
    name = "plate" if scope == "plate" else f"{batch_column}"
    return [(f"{name} {key}", positions) for key, positions in groups.items()]


def normalize_profiles(
    wells: pd.DataFrame,
    features: list[str],
    method: str = "mad_robustize",
    *,
    scope: str = "plate",
    batch_column: str | None = None,
    min_controls_per_plate: int = DEFAULT_MIN_CONTROLS_PER_PLATE,
    mad_epsilon: float = 1e-18,
    spherize_method: str = "ZCA-cor",
    spherize_epsilon: float = 1e-6,
) -> pd.DataFrame:
    """Normalize against negative-control wells, one ``pycytominer.normalize`` call per scope part.

    ``scope``: ``plate`` (each plate against its own controls), ``pooled`` (one call over all plates,
    fit on all control wells), ``batch`` (one call per value of ``batch_column``) or ``auto``
    (:func:`normalization_plan` decides).  Location/scale (or the whitening) are always fit on the
    control wells only, never on treatments.
    """
    if scope == "auto":
        scope = normalization_plan(
            wells,
            method=method,
            scope=scope,
            batch_column=batch_column,
            min_controls_per_plate=min_controls_per_plate,
        )["scope"]
    if method not in NORMALIZE_METHODS:
        raise ConfigError(f"profiles.normalize: {method!r} is not one of {NORMALIZE_METHODS}")
    if scope not in ("plate", "pooled", "batch", "none"):
        raise ConfigError(f"profiles.normalize_scope: {scope!r} is not one of {NORMALIZE_SCOPES}")
    if method == "none" or scope == "none":
        return wells.copy()
    if scope == "batch" and (batch_column is None or batch_column not in wells.columns):
        raise DataError(f"normalize per batch: batch column {batch_column!r} is not in the well profiles")
    if method == "spherize" and spherize_method not in SPHERIZE_METHODS:
        raise ConfigError(f"profiles.spherize_method: {spherize_method!r} is not one of {SPHERIZE_METHODS}")
    groups = _normalization_groups(wells, scope, batch_column)
    negcon = (wells["Metadata_pert_type"] == "negcon").to_numpy()
    without = [label for label, positions in groups if not negcon[positions].any()]
    if without:
        raise DataError(
            f"normalize ({method}, scope {scope}): {', '.join(without[:5])} have no negative-control "
            "rows (Metadata_pert_type == 'negcon'); set metadata.negcon in the config, or normalize "
            "over pooled controls (profiles.normalize_scope: pooled)"
        )
    pycytominer = _pycytominer()
    meta = metadata_columns(wells)
    options = (
        dict(spherize_method=spherize_method, spherize_epsilon=spherize_epsilon)
        if method == "spherize"
        else dict(mad_robustize_epsilon=mad_epsilon)
    )
    # Each part's result goes straight into one array in the input's row order (pycytominer keeps
    # the index of the rows it was given): no list of parts and no concatenated copy of them.
    values, out_features = None, None
    for label, positions in tqdm(groups, desc=f"normalize per {scope}", unit=scope, disable=len(groups) < 50):
        part = wells.iloc[positions] if len(groups) > 1 else wells
        try:
            result = pycytominer.normalize(
                profiles=part,
                features=features,
                meta_features=meta,
                samples=NEGCON_QUERY,
                method=method,
                output_file=None,
                **options,
            )
        except ValueError as exc:
            raise DataError(f"normalize ({method}) failed on {label}: {exc}") from exc
        if len(groups) == 1:
            return result.loc[wells.index].reset_index(drop=True)
        if values is None:
            out_features = feature_columns(result)  # PCA sphering renames features PC1..PCn
            values = np.empty((len(wells), len(out_features)), dtype=np.float64)
        values[positions] = result.loc[part.index, out_features].to_numpy(dtype=np.float64)
    return pd.concat([wells[meta].reset_index(drop=True), pd.DataFrame(values, columns=out_features)], axis=1)


def select_features(
    normalized: pd.DataFrame,
    features: list[str],
    operations: Sequence[str],
    *,
    na_cutoff: float = 0.05,
    corr_threshold: float = 0.9,
    min_variance: float = 1e-6,
    freq_cut: float = 0.05,
    unique_cut: float = 0.01,
    outlier_cutoff: float = 500.0,
) -> tuple[pd.DataFrame, list[str]]:
    """``pycytominer.feature_select`` with an explicit operation list (drop_na_columns first).

    Features still holding NaN/inf afterwards (allowed up to ``na_cutoff``) are dropped too: cosine
    similarity and copairs are undefined on them.
    """
    operations = list(operations)
    unknown = [op for op in operations if op not in FEATURE_SELECT_OPERATIONS]
    if unknown:
        raise ConfigError(
            f"profiles.feature_select: unknown operation(s) {unknown}; allowed {FEATURE_SELECT_OPERATIONS}"
        )
    if operations and operations[0] != "drop_na_columns":
        raise ConfigError(
            f"profiles.feature_select must start with drop_na_columns (got {operations}): the other "
            "operations assume columns without missing values"
        )
    selected = normalized
    if operations:
        pycytominer = _pycytominer()
        try:
            selected = pycytominer.feature_select(
                profiles=normalized,
                features=features,
                operation=operations,
                na_cutoff=na_cutoff,
                corr_threshold=corr_threshold,
                min_variance=min_variance,
                freq_cut=freq_cut,
                unique_cut=unique_cut,
                outlier_cutoff=outlier_cutoff,
                output_file=None,
            )
        except ValueError as exc:  # e.g. scikit-learn: no feature meets the variance threshold
            raise DataError(f"feature selection {operations} left no usable features: {exc}") from exc
    kept = [f for f in features if f in selected.columns]
    values = selected[kept].to_numpy(dtype=np.float64)
    finite = np.isfinite(values).all(axis=0)
    if not finite.all():
        dropped = [f for f, ok in zip(kept, finite) if not ok]
        log.warning(
            "dropping %d feature(s) that still hold NaN/inf after selection, e.g. %s",
            len(dropped),
            dropped[:5],
        )
        kept = [f for f, ok in zip(kept, finite) if ok]
    if not kept:
        raise DataError(f"feature selection {operations} left no features out of {len(features)}")
    return selected[metadata_columns(selected) + kept].reset_index(drop=True), kept


def consensus_profiles(
    selected: pd.DataFrame, features: list[str], operation: str = "median"
) -> pd.DataFrame:
    """One profile per treatment (over wells and plates) with ``pycytominer.consensus``."""
    if operation not in CONSENSUS_OPERATIONS:
        raise ConfigError(f"profiles.consensus: {operation!r} is not one of {CONSENSUS_OPERATIONS}")
    per_treatment = selected.groupby("Metadata_TreatmentId")[list(TREATMENT_COLUMNS[1:])].nunique(
        dropna=False
    )
    inconsistent = per_treatment.index[(per_treatment > 1).any(axis=1).to_numpy()]
    if len(inconsistent):
        raise DataError(
            f"treatment id {inconsistent[0]!r} has wells with different Metadata_Treatment/pert_type/moa values"
        )
    pycytominer = _pycytominer()
    with _no_fragmentation_warning():
        consensus = pycytominer.consensus(
            profiles=selected[list(TREATMENT_COLUMNS) + features],
            replicate_columns=list(TREATMENT_COLUMNS),
            operation=operation,
            features=features,
            output_file=None,
        )
    counts = selected.groupby("Metadata_TreatmentId").size().rename("Metadata_n_wells").reset_index()
    consensus = consensus.merge(counts, on="Metadata_TreatmentId", how="left")
    return consensus[list(TREATMENT_COLUMNS) + ["Metadata_n_wells"] + features].reset_index(drop=True)


def _as_float32(df: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    out = df.copy()
    out[features] = out[features].astype(np.float32)
    return out


DEFAULT_FEATURE_SELECT = ("drop_na_columns", "variance_threshold", "correlation_threshold", "drop_outliers")
PROFILE_FILES = ("well", "normalized", "selected", "consensus")


def profile_steps(
    wells: pd.DataFrame,
    features: list[str],
    out_dir: str | Path,
    *,
    level: str = "well",
    normalize: str = "mad_robustize",
    normalize_scope: str = "auto",
    batch_column: str | None = None,
    min_controls_per_plate: int = DEFAULT_MIN_CONTROLS_PER_PLATE,
    already_normalized: bool = False,
    feature_select: Sequence[str] = DEFAULT_FEATURE_SELECT,
    consensus: str = "median",
    mad_epsilon: float = 1e-18,
    spherize_method: str = "ZCA-cor",
    spherize_epsilon: float = 1e-6,
    na_cutoff: float = 0.05,
    corr_threshold: float = 0.9,
    min_variance: float = 1e-6,
    freq_cut: float = 0.05,
    unique_cut: float = 0.01,
    outlier_cutoff: float = 500.0,
) -> dict[str, Path]:
    """Well profiles -> normalized, selected and consensus tables + ``normalization.json``.

    ``level="treatment"``: the rows are already one profile per treatment (a published consensus
    table): there are no control wells to normalize against, so the rows are used as given and
    only feature selection runs; ``consensus.parquet`` holds the same rows.
    """
    if level not in ("well", "treatment"):
        raise ConfigError(f"profile level must be 'well' or 'treatment', got {level!r}")
    out_dir = Path(out_dir)
    wells = wells.reset_index(drop=True)
    if level == "treatment" or already_normalized:
        plan = normalization_plan(wells, method="none", min_controls_per_plate=min_controls_per_plate)
        plan["reason"] = (
            "treatment-level table: one profile per treatment, no control wells to fit a normalization on; "
            "used as given"
            if level == "treatment"
            else "the table is already normalized (external normalized: true); used as given"
        )
        normalized = wells.copy()
    else:
        plan = normalization_plan(
            wells,
            method=normalize,
            scope=normalize_scope,
            batch_column=batch_column,
            min_controls_per_plate=min_controls_per_plate,
        )
        log.info("normalization: %s, scope %s (%s)", plan["method"], plan["scope"], plan["reason"])
        for warning in plan["warnings"]:
            log.warning("normalization: %s", warning)
        normalized = normalize_profiles(
            wells,
            features,
            normalize,
            scope=plan["scope"],
            batch_column=plan["batch_column"],
            mad_epsilon=mad_epsilon,
            spherize_method=spherize_method,
            spherize_epsilon=spherize_epsilon,
        )
    paths = {name: out_dir / f"{name}.parquet" for name in PROFILE_FILES}
    written: list[Path] = []

    def write(df: pd.DataFrame, columns: list[str], name: str) -> None:
        write_parquet(_as_float32(df, columns), paths[name])
        written.append(paths[name])

    try:
        return _select_and_consensus(
            wells,
            features,
            normalized,
            plan,
            paths,
            write,
            level=level,
            feature_select=feature_select,
            consensus=consensus,
            na_cutoff=na_cutoff,
            corr_threshold=corr_threshold,
            min_variance=min_variance,
            freq_cut=freq_cut,
            unique_cut=unique_cut,
            outlier_cutoff=outlier_cutoff,
        )
    except BaseException:
        for path in written:  # a failed run leaves none of its outputs (earlier runs' files stay)
            path.unlink(missing_ok=True)
        raise


def _select_and_consensus(
    wells, features, normalized, plan, paths, write, *, level, feature_select, consensus, **selection
) -> dict[str, Path]:
    # Each table is written as soon as it exists, and dropped once the next step has it (at JUMP
    # size a table of wells is gigabytes).
    write(wells, features, "well")
    norm_features = feature_columns(normalized)  # PCA sphering renames features PC1..PCn
    selected, kept = select_features(
        normalized,
        norm_features,
        feature_select,
        **selection,
    )
    write(normalized, norm_features, "normalized")
    del normalized
    log.info(
        "%d %s profiles; %d of %d features kept by %s",
        len(selected),
        level,
        len(kept),
        len(norm_features),
        list(feature_select),
    )
    if level == "treatment":
        treatment_profiles = selected.copy()
        if "Metadata_n_wells" not in treatment_profiles.columns:
            treatment_profiles.insert(len(TREATMENT_COLUMNS), "Metadata_n_wells", 1)
        meta = list(TREATMENT_COLUMNS) + ["Metadata_n_wells"]
        meta += [c for c in metadata_columns(treatment_profiles) if c not in meta]
        treatment_profiles = treatment_profiles[meta + kept]
    else:
        treatment_profiles = consensus_profiles(selected, kept, consensus)
    write(selected, kept, "selected")
    write(treatment_profiles, kept, "consensus")
    paths["normalization"] = paths["well"].parent / "normalization.json"
    write_json(plan, paths["normalization"])
    return paths


def build_profiles(
    feature_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    aggregate: str = "median",
    correction_alpha: float = 0.0,
    **steps,
) -> dict[str, Path]:
    """Site features of every plate -> ``well``, ``normalized``, ``selected``, ``consensus`` .parquet
    and ``normalization.json`` (keyword options of :func:`profile_steps` pass through)."""
    if not 0 <= correction_alpha <= 1:
        raise ConfigError(f"profiles.correction_alpha must be in [0, 1], got {correction_alpha}")
    log.info("phenotype correction: %s", f"alpha={correction_alpha}" if correction_alpha else "off")
    wells, features = well_profiles(feature_paths, correction_alpha=correction_alpha, aggregate=aggregate)
    return profile_steps(wells, features, out_dir, **steps)


# ----------------------------------------------------------------------------- CLI


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the normalize / select / consensus steps (shared with ``evaluate --table``)."""
    parser.add_argument(
        "--normalize",
        default="mad_robustize",
        choices=NORMALIZE_METHODS,
        help="against negcon wells (robust z-score, z-score, robust scaling) or spherize (fit on negcon wells)",
    )
    parser.add_argument(
        "--normalize-scope",
        default="auto",
        choices=NORMALIZE_SCOPES,
        help="fit per plate, on all plates' controls pooled, or per --batch-column; auto = per plate only "
        "when every plate has --min-controls-per-plate control wells, else pooled",
    )
    parser.add_argument("--batch-column", default=None, help="metadata column naming each well's batch")
    parser.add_argument(
        "--min-controls-per-plate",
        type=int,
        default=DEFAULT_MIN_CONTROLS_PER_PLATE,
        help="auto scope: control wells every plate needs for a per-plate normalization",
    )
    parser.add_argument(
        "--feature-select",
        nargs="*",
        default=list(DEFAULT_FEATURE_SELECT),
        metavar="OP",
        help=f"pycytominer operations in order, drop_na_columns first; from {FEATURE_SELECT_OPERATIONS}",
    )
    parser.add_argument(
        "--consensus", default="median", choices=CONSENSUS_OPERATIONS, help="wells -> treatment"
    )
    parser.add_argument("--mad-epsilon", type=float, default=1e-18, help="mad_robustize epsilon")
    parser.add_argument("--spherize-method", default="ZCA-cor", choices=SPHERIZE_METHODS)
    parser.add_argument("--spherize-epsilon", type=float, default=1e-6, help="sphering regularization")
    parser.add_argument("--na-cutoff", type=float, default=0.05, help="drop_na_columns: max NaN fraction")
    parser.add_argument("--corr-threshold", type=float, default=0.9, help="correlation_threshold")
    parser.add_argument(
        "--min-variance",
        type=float,
        default=1e-6,
        help="variance_threshold: drop features below this variance",
    )
    parser.add_argument("--freq-cut", type=float, default=0.05, help="frequency_threshold freq_cut")
    parser.add_argument("--unique-cut", type=float, default=0.01, help="frequency_threshold unique_cut")
    parser.add_argument("--outlier-cutoff", type=float, default=500.0, help="drop_outliers cutoff")


def step_options(args: argparse.Namespace) -> dict:
    """:func:`profile_steps` keyword options from :func:`add_step_arguments` arguments."""
    return dict(
        normalize=args.normalize,
        normalize_scope=args.normalize_scope,
        batch_column=args.batch_column,
        min_controls_per_plate=args.min_controls_per_plate,
        feature_select=args.feature_select,
        consensus=args.consensus,
        mad_epsilon=args.mad_epsilon,
        spherize_method=args.spherize_method,
        spherize_epsilon=args.spherize_epsilon,
        na_cutoff=args.na_cutoff,
        corr_threshold=args.corr_threshold,
        min_variance=args.min_variance,
        freq_cut=args.freq_cut,
        unique_cut=args.unique_cut,
        outlier_cutoff=args.outlier_cutoff,
    )


def _run(args: argparse.Namespace) -> None:
    if args.table:
        from . import external

        table = external.read_table(args.table, external.mapping_from_args(args), level=args.level)
        paths = profile_steps(
            table.profiles,
            table.features,
            args.out,
            level=args.level,
            already_normalized=args.normalized,
            **step_options(args),
        )
    else:
        paths = build_profiles(
            args.features,
            args.out,
            aggregate=args.aggregate,
            correction_alpha=args.correction_alpha,
            **step_options(args),
        )
    for path in paths.values():
        print(path)


def register_cli(subparsers) -> None:
    from . import external

    parser = subparsers.add_parser(
        "profiles",
        help="site features (or a profile table) -> well/normalized/selected/consensus profiles (pycytominer)",
        description=__doc__.splitlines()[0],
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", nargs="+", help="features/<set>/<plate>.parquet files")
    source.add_argument(
        "--table",
        nargs="+",
        metavar="PATH",
        help="an existing profile table (CSV, CSV.GZ or Parquet; several files are concatenated)",
    )
    parser.add_argument("--out", required=True, help="output folder profiles/<set>")
    parser.add_argument("--aggregate", default="median", choices=AGGREGATE_OPERATIONS, help="sites -> wells")
    parser.add_argument(
        "--correction-alpha",
        type=float,
        default=0.0,
        help="subtract alpha x mean negcon site profile per plate (0 = off; paper 0.7)",
    )
    add_step_arguments(parser)
    external.add_table_arguments(parser)
    parser.set_defaults(func=_run)
