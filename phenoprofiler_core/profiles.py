"""Per-site features -> well, normalized, feature-selected and consensus profiles (pycytominer).

Input: ``features/<set>/<plate>.parquet`` (one row per site: ``Metadata_*`` columns + float feature
columns).  Output, under ``profiles/<set>/``, one Parquet file per step so each can be inspected:

1. phenotype correction (learned sets only): per plate, subtract α × the mean negative-control site
   profile (DESIGN.md §5, α = 0.7 in the PhenoProfiler paper);
2. ``well.parquet``: sites aggregated to wells (``pycytominer.aggregate``);
3. ``normalized.parquet``: per plate against that plate's negative controls
   (``pycytominer.normalize``, one call per plate), or sphering fit on the negative-control wells of
   all plates in one call;
4. ``selected.parquet``: ``pycytominer.feature_select`` with an explicit operation list that starts
   with ``drop_na_columns``;
5. ``consensus.parquet``: one profile per treatment (``pycytominer.consensus``).

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

from .errors import ConfigError, DataError
from .io import write_parquet

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
SPHERIZE_METHODS = ("ZCA", "ZCA-cor", "PCA", "PCA-cor")
FEATURE_SELECT_OPERATIONS = (
    "drop_na_columns",
    "variance_threshold",
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


def read_site_features(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """Concatenate per-plate site feature tables, checking that they fit together."""
    if not paths:
        raise DataError("no feature files given (expected features/<set>/<plate>.parquet)")
    frames = []
    features: list[str] | None = None
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"feature file not found: {path}")
        df = pd.read_parquet(path)
        missing = [c for c in REQUIRED_METADATA if c not in df.columns]
        if missing:
            raise DataError(
                f"{path}: missing metadata column(s) {missing}; expected {list(REQUIRED_METADATA)}"
            )
        these = feature_columns(df)
        if not these:
            raise DataError(f"{path}: no feature columns (every column starts with Metadata_)")
        bad = [c for c in these if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise DataError(f"{path}: feature column(s) {bad[:5]} are not numeric")
        if features is None:
            features = these
        elif set(these) != set(features):
            diff = sorted(set(these) ^ set(features))[:5]
            raise DataError(f"{path}: feature columns differ from {paths[0]} (e.g. {diff})")
        if df.empty:
            raise DataError(f"{path}: no rows")
        frames.append(df)
    sites = pd.concat(frames, ignore_index=True)
    sites["Metadata_moa"] = sites["Metadata_moa"].fillna("").astype(str)
    for column in (
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Treatment",
        "Metadata_TreatmentId",
        "Metadata_pert_type",
    ):
        if sites[column].isna().any():
            row = int(np.flatnonzero(sites[column].isna().to_numpy())[0])
            raise DataError(f"column {column} is empty in row {row} of the concatenated feature tables")
    duplicated = sites.duplicated(["Metadata_Plate", "Metadata_Well", "Metadata_Site"])
    if duplicated.any():
        first = sites.loc[duplicated, ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].iloc[0].to_dict()
        raise DataError(f"site {first} appears more than once in the feature tables")
    # One float64 block (also defragments the frame the many feature columns came in).
    sites = pd.concat([sites[metadata_columns(sites)], sites[features].astype(np.float64)], axis=1)
    return sites, list(features)


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


def normalize_profiles(
    wells: pd.DataFrame,
    features: list[str],
    method: str = "mad_robustize",
    *,
    mad_epsilon: float = 1e-18,
    spherize_method: str = "ZCA-cor",
    spherize_epsilon: float = 1e-6,
) -> pd.DataFrame:
    """Normalize against negative controls: per plate (one pycytominer call each) or sphering.

    Per-plate methods fit location/scale on that plate's negcon wells only.  Sphering fits one
    whitening transform on the negcon wells of all plates (per-plate control counts are usually far
    below the feature count); its regularization comes from the config and is never tuned on a metric.
    """
    if method not in NORMALIZE_METHODS:
        raise ConfigError(f"profiles.normalize: {method!r} is not one of {NORMALIZE_METHODS}")
    if method == "none":
        return wells.copy()
    pycytominer = _pycytominer()
    meta = metadata_columns(wells)
    if method == "spherize":
        if spherize_method not in SPHERIZE_METHODS:
            raise ConfigError(
                f"profiles.spherize_method: {spherize_method!r} is not one of {SPHERIZE_METHODS}"
            )
        if not (wells["Metadata_pert_type"] == "negcon").any():
            raise DataError("spherize: no negative-control wells (Metadata_pert_type == 'negcon') to fit on")
        try:
            normalized = pycytominer.normalize(
                profiles=wells,
                features=features,
                meta_features=meta,
                samples=NEGCON_QUERY,
                method="spherize",
                spherize_method=spherize_method,
                spherize_epsilon=spherize_epsilon,
                output_file=None,
            )
        except ValueError as exc:
            raise DataError(f"spherize on negcon wells failed: {exc}") from exc
        return normalized.reset_index(drop=True)
    _require_negcon_per_plate(wells, f"normalize ({method})")
    parts = []
    for plate, plate_wells in wells.groupby("Metadata_Plate", sort=False):
        try:
            parts.append(
                pycytominer.normalize(
                    profiles=plate_wells,
                    features=features,
                    meta_features=meta,
                    samples=NEGCON_QUERY,
                    method=method,
                    mad_robustize_epsilon=mad_epsilon,
                    output_file=None,
                )
            )
        except ValueError as exc:
            raise DataError(f"normalize ({method}) failed on plate {plate}: {exc}") from exc
    normalized = pd.concat(parts).loc[wells.index]
    return normalized.reset_index(drop=True)


def select_features(
    normalized: pd.DataFrame,
    features: list[str],
    operations: Sequence[str],
    *,
    na_cutoff: float = 0.05,
    corr_threshold: float = 0.9,
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
        selected = pycytominer.feature_select(
            profiles=normalized,
            features=features,
            operation=operations,
            na_cutoff=na_cutoff,
            corr_threshold=corr_threshold,
            freq_cut=freq_cut,
            unique_cut=unique_cut,
            outlier_cutoff=outlier_cutoff,
            output_file=None,
        )
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


def build_profiles(
    feature_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    aggregate: str = "median",
    normalize: str = "mad_robustize",
    feature_select: Sequence[str] = (
        "drop_na_columns",
        "variance_threshold",
        "correlation_threshold",
        "drop_outliers",
    ),
    consensus: str = "median",
    correction_alpha: float = 0.0,
    mad_epsilon: float = 1e-18,
    spherize_method: str = "ZCA-cor",
    spherize_epsilon: float = 1e-6,
    na_cutoff: float = 0.05,
    corr_threshold: float = 0.9,
    freq_cut: float = 0.05,
    unique_cut: float = 0.01,
    outlier_cutoff: float = 500.0,
) -> dict[str, Path]:
    """Run every step and write ``well``, ``normalized``, ``selected``, ``consensus`` .parquet."""
    if not 0 <= correction_alpha <= 1:
        raise ConfigError(f"profiles.correction_alpha must be in [0, 1], got {correction_alpha}")
    out_dir = Path(out_dir)
    sites, features = read_site_features(feature_paths)
    log.info("read %d sites x %d features from %d file(s)", len(sites), len(features), len(feature_paths))
    log.info("phenotype correction: %s", f"alpha={correction_alpha}" if correction_alpha else "off")
    sites = correct_phenotype(sites, features, correction_alpha)
    wells = aggregate_wells(sites, features, aggregate)
    normalized = normalize_profiles(
        wells,
        features,
        normalize,
        mad_epsilon=mad_epsilon,
        spherize_method=spherize_method,
        spherize_epsilon=spherize_epsilon,
    )
    norm_features = feature_columns(normalized)  # PCA sphering renames features PC1..PCn
    selected, kept = select_features(
        normalized,
        norm_features,
        feature_select,
        na_cutoff=na_cutoff,
        corr_threshold=corr_threshold,
        freq_cut=freq_cut,
        unique_cut=unique_cut,
        outlier_cutoff=outlier_cutoff,
    )
    log.info(
        "%d wells; %d of %d features kept by %s",
        len(selected),
        len(kept),
        len(norm_features),
        list(feature_select),
    )
    treatment_profiles = consensus_profiles(selected, kept, consensus)
    paths = {name: out_dir / f"{name}.parquet" for name in ("well", "normalized", "selected", "consensus")}
    write_parquet(_as_float32(wells, features), paths["well"])
    write_parquet(_as_float32(normalized, norm_features), paths["normalized"])
    write_parquet(_as_float32(selected, kept), paths["selected"])
    write_parquet(_as_float32(treatment_profiles, kept), paths["consensus"])
    return paths


# ----------------------------------------------------------------------------- CLI


def _run(args: argparse.Namespace) -> None:
    paths = build_profiles(
        args.features,
        args.out,
        aggregate=args.aggregate,
        normalize=args.normalize,
        feature_select=args.feature_select,
        consensus=args.consensus,
        correction_alpha=args.correction_alpha,
        mad_epsilon=args.mad_epsilon,
        spherize_method=args.spherize_method,
        spherize_epsilon=args.spherize_epsilon,
        na_cutoff=args.na_cutoff,
        corr_threshold=args.corr_threshold,
        freq_cut=args.freq_cut,
        unique_cut=args.unique_cut,
        outlier_cutoff=args.outlier_cutoff,
    )
    for path in paths.values():
        print(path)


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "profiles",
        help="site features -> well/normalized/selected/consensus profiles (pycytominer)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--features", nargs="+", required=True, help="features/<set>/<plate>.parquet files")
    parser.add_argument("--out", required=True, help="output folder profiles/<set>")
    parser.add_argument("--aggregate", default="median", choices=AGGREGATE_OPERATIONS, help="sites -> wells")
    parser.add_argument(
        "--normalize",
        default="mad_robustize",
        choices=NORMALIZE_METHODS,
        help="per-plate against negcon wells, or spherize (fit on negcon wells)",
    )
    parser.add_argument(
        "--feature-select",
        nargs="*",
        default=["drop_na_columns", "variance_threshold", "correlation_threshold", "drop_outliers"],
        metavar="OP",
        help=f"pycytominer operations in order, drop_na_columns first; from {FEATURE_SELECT_OPERATIONS}",
    )
    parser.add_argument(
        "--consensus", default="median", choices=CONSENSUS_OPERATIONS, help="wells -> treatment"
    )
    parser.add_argument(
        "--correction-alpha",
        type=float,
        default=0.0,
        help="subtract alpha x mean negcon site profile per plate (0 = off; paper 0.7)",
    )
    parser.add_argument("--mad-epsilon", type=float, default=1e-18, help="mad_robustize epsilon")
    parser.add_argument("--spherize-method", default="ZCA-cor", choices=SPHERIZE_METHODS)
    parser.add_argument("--spherize-epsilon", type=float, default=1e-6, help="sphering regularization")
    parser.add_argument("--na-cutoff", type=float, default=0.05, help="drop_na_columns: max NaN fraction")
    parser.add_argument("--corr-threshold", type=float, default=0.9, help="correlation_threshold")
    parser.add_argument("--freq-cut", type=float, default=0.05, help="variance_threshold freq_cut")
    parser.add_argument("--unique-cut", type=float, default=0.01, help="variance_threshold unique_cut")
    parser.add_argument("--outlier-cutoff", type=float, default=500.0, help="drop_outliers cutoff")
    parser.set_defaults(func=_run)
