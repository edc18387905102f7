"""Bring your own profiles: published profile tables as feature sets.

Scientists benchmark a new method against the profiles published with a dataset (CellProfiler
well profiles, DeepProfiler / CNN-1 profiles).  This module reads such a table (CSV, CSV.GZ or
Parquet; several files are concatenated) and maps its columns onto the pipeline's contract
(``Metadata_Plate``, ``Metadata_Well``, ``Metadata_TreatmentId``, ``Metadata_Treatment``,
``Metadata_pert_type``, ``Metadata_moa``), so it flows through the same profile steps
(:func:`phenoprofiler_core.profiles.profile_steps`) and evaluation as the pipeline's own sets.

Levels:

* ``well`` — one row per well: normalize against the control wells (unless the table is already
  normalized) → feature selection → consensus → every metric;
* ``treatment`` — one row per treatment (e.g. a level-5 consensus table): feature selection only;
  the MoA metrics run on these rows (FoE, both MAPs, Recall@k, copairs MoA consistency), while
  copairs *activity* is n/a, because it ranks a treatment's replicate *wells* against control
  wells and the table has neither.

Which columns are what (defaults = this pipeline's names; pycytominer-written tables use
``Metadata_`` columns such as ``Metadata_broad_sample``, ``Metadata_moa``):

* ``treatment_id`` — one column or several (joined with ``@``: BBBC021's compound and
  concentration give ``taxol@0.3``);
* ``treatment`` (display name; default = the id), ``moa`` (``|``-separated labels; null = none);
* ``pert_type`` — a column whose values in ``negcon`` mark the negative controls (and ``poscon`` the
  positive controls); null = match ``negcon``/``poscon`` against the treatment id and name;
* ``plate`` / ``well`` — the well keys (``plate: null`` = a single-plate table).

Feature columns are the numeric columns that are neither mapped nor ``Metadata_*`` nor listed in
``exclude_columns``; other ``Metadata_*`` columns travel along.  A non-numeric column that is none
of these is an error naming it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

LEVELS = ("well", "treatment")
SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq", ".tsv", ".tsv.gz")
ID_SEPARATOR = "@"


@dataclass(frozen=True)
class TableMapping:
    """Which source column holds each of the pipeline's metadata fields."""

    plate: str | None = "Metadata_Plate"
    well: str | None = "Metadata_Well"
    treatment_id: tuple[str, ...] = ("Metadata_TreatmentId",)
    treatment: str | None = None  # None: the id is the display name
    moa: str | None = "Metadata_moa"
    pert_type: str | None = "Metadata_pert_type"
    negcon: tuple[str, ...] = ("negcon",)
    poscon: tuple[str, ...] = ("poscon",)
    moa_separator: str = "|"
    exclude_columns: tuple[str, ...] = field(default_factory=tuple)

    def source_columns(self) -> list[str]:
        named = [self.plate, self.well, *self.treatment_id, self.treatment, self.moa, self.pert_type]
        return [c for c in named if c]


@dataclass
class ProfileTable:
    """A published table in the pipeline's contract: ``Metadata_*`` columns + float64 features."""

    profiles: pd.DataFrame
    features: list[str]
    level: str
    paths: list[Path]


def mapping_from_config(entry: Mapping) -> TableMapping:
    """A :class:`TableMapping` from one ``external.<name>`` config entry (defaults filled)."""
    columns = dict(entry.get("columns") or {})
    treatment_id = columns.get("treatment_id", "Metadata_TreatmentId")
    return TableMapping(
        plate=columns.get("plate", "Metadata_Plate"),
        well=columns.get("well", "Metadata_Well"),
        treatment_id=tuple([treatment_id] if isinstance(treatment_id, str) else treatment_id),
        treatment=columns.get("treatment"),
        moa=columns.get("moa", "Metadata_moa"),
        pert_type=columns.get("pert_type", "Metadata_pert_type"),
        negcon=tuple(str(v) for v in entry.get("negcon", ["negcon"])),
        poscon=tuple(str(v) for v in entry.get("poscon", ["poscon"])),
        moa_separator=entry.get("moa_separator", "|"),
        exclude_columns=tuple(entry.get("exclude_columns", [])),
    )


# ----------------------------------------------------------------------------- reading


def _read_one(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"profile table not found: {path}")
    name = path.name.lower()
    if not name.endswith(SUFFIXES):
        raise DataError(f"{path}: unknown table format; expected one of {', '.join(SUFFIXES)}")
    try:
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if ".tsv" in name else ",", low_memory=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the table: {exc}") from exc


def _check_columns(df: pd.DataFrame, mapping: TableMapping, path: Path, level: str) -> None:
    keys = {
        "treatment_id": mapping.treatment_id,
        "treatment": [mapping.treatment] if mapping.treatment else [],
        "moa": [mapping.moa] if mapping.moa else [],
        "pert_type": [mapping.pert_type] if mapping.pert_type else [],
    }
    if level == "well":
        keys["plate"] = [mapping.plate] if mapping.plate else []
        keys["well"] = [mapping.well] if mapping.well else []
        if not mapping.well:
            raise ConfigError("a well-level table needs a well column (columns.well / --well-column)")
    if not mapping.treatment_id:
        raise ConfigError("a profile table needs a treatment id column (columns.treatment_id)")
    for key, columns in keys.items():
        missing = [c for c in columns if c not in df.columns]
        if missing:
            shown = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])][:12]
            raise DataError(
                f"{path}: column(s) {missing} (mapped as {key}) not found; non-numeric columns of the "
                f"table: {shown}; map {key} to the right column"
                + (" or set it to null" if key in ("moa", "pert_type", "treatment", "plate") else "")
            )


def _text(column: pd.Series) -> pd.Series:
    """String values; NaN stays NaN (checked by the caller where a value is required)."""
    return pd.Series([v if pd.isna(v) else str(v) for v in column], index=column.index, dtype=object)


def map_columns(df: pd.DataFrame, mapping: TableMapping, *, level: str, path: Path) -> pd.DataFrame:
    """Pipeline metadata columns from the mapped source columns (in front of the table)."""
    _check_columns(df, mapping, path, level)
    ids = [_text(df[c]) for c in mapping.treatment_id]
    for column, values in zip(mapping.treatment_id, ids):
        if values.isna().any():
            row = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise DataError(f"{path}: treatment id column {column!r} is empty in row {row}")
    treatment_id = ids[0] if len(ids) == 1 else ids[0].str.cat(ids[1:], sep=ID_SEPARATOR)
    treatment = _text(df[mapping.treatment]).fillna(treatment_id) if mapping.treatment else treatment_id
    if mapping.moa:
        moa = _text(df[mapping.moa]).fillna("")
        if mapping.moa_separator != "|":
            moa = moa.str.replace(mapping.moa_separator, "|", regex=False)
    else:
        moa = pd.Series("", index=df.index)
    negcon, poscon = set(mapping.negcon), set(mapping.poscon)
    if mapping.pert_type:
        kind = _text(df[mapping.pert_type]).fillna("")
        is_negcon, is_poscon = kind.isin(negcon), kind.isin(poscon)
    else:
        is_negcon = treatment_id.isin(negcon) | treatment.isin(negcon)
        is_poscon = treatment_id.isin(poscon) | treatment.isin(poscon)
    pert_type = np.where(is_negcon, "negcon", np.where(is_poscon, "poscon", "trt"))
    meta = {}
    if level == "well":
        meta["Metadata_Plate"] = _text(df[mapping.plate]) if mapping.plate else "plate"
        meta["Metadata_Well"] = _text(df[mapping.well])
        for key in ("Metadata_Plate", "Metadata_Well"):
            values = pd.Series(meta[key], index=df.index)
            if values.isna().any():
                row = int(np.flatnonzero(values.isna().to_numpy())[0])
                raise DataError(f"{path}: {key} (from the mapped column) is empty in row {row}")
    meta.update(
        Metadata_TreatmentId=treatment_id,
        Metadata_Treatment=treatment,
        Metadata_pert_type=pert_type,
        Metadata_moa=moa,
    )
    return pd.DataFrame(meta, index=df.index)


def read_table(
    paths: str | Path | Sequence[str | Path], mapping: TableMapping | None = None, *, level: str = "well"
) -> ProfileTable:
    """Read and map a published profile table (several files are concatenated)."""
    if level not in LEVELS:
        raise ConfigError(f"profile table level must be one of {LEVELS}, got {level!r}")
    mapping = mapping or TableMapping()
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise DataError("no profile table given")
    frames, features = [], None
    for path in paths:
        df = _read_one(path)
        if df.empty:
            raise DataError(f"{path}: no rows")
        meta = map_columns(df, mapping, level=level, path=path)
        used = set(mapping.source_columns()) | set(mapping.exclude_columns)
        missing_excluded = [c for c in mapping.exclude_columns if c not in df.columns]
        if missing_excluded:
            log.warning("%s: exclude_columns %s are not in the table", path, missing_excluded)
        carried = [c for c in df.columns if str(c).startswith("Metadata_") and c not in meta.columns]
        candidates = [c for c in df.columns if c not in used and not str(c).startswith("Metadata_")]
        text = [c for c in candidates if not pd.api.types.is_numeric_dtype(df[c])]
        if text:
            raise DataError(
                f"{path}: column(s) {text[:5]} are neither numeric features nor mapped metadata; "
                "map them, list them in exclude_columns, or rename them to Metadata_*"
            )
        if not candidates:
            raise DataError(f"{path}: no numeric feature columns besides the mapped metadata")
        if features is None:
            features = candidates
        elif set(candidates) != set(features):
            diff = sorted(set(candidates) ^ set(features))[:5]
            raise DataError(f"{path}: feature columns differ from {paths[0]} (e.g. {diff})")
        frames.append(pd.concat([meta, df[carried], df[features].astype(np.float64)], axis=1))
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    table = table.copy()  # one block per dtype (the concatenated columns came in many)
    keys = ["Metadata_Plate", "Metadata_Well"] if level == "well" else ["Metadata_TreatmentId"]
    duplicated = table.duplicated(keys)
    if duplicated.any():
        first = table.loc[duplicated, keys].iloc[0].to_dict()
        what = "well" if level == "well" else "treatment (a treatment-level table has one row per treatment)"
        raise DataError(f"{', '.join(map(str, paths))}: {what} {first} appears more than once")
    counts = table["Metadata_pert_type"].value_counts().to_dict()
    log.info(
        "profile table %s: %d %s rows x %d features; %s",
        ", ".join(map(str, paths)),
        len(table),
        level,
        len(features),
        ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())),
    )
    if level == "well" and not counts.get("negcon"):
        log.warning(
            "no negative-control rows (values %s of %s): normalization and activity need them",
            list(mapping.negcon),
            mapping.pert_type or "the treatment id/name",
        )
    return ProfileTable(profiles=table, features=list(features), level=level, paths=paths)


# ----------------------------------------------------------------------------- CLI


def _none_if_empty(value: str | None) -> str | None:
    return value if value else None


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """Column-mapping options of ``--table`` (profiles and evaluate).  '' means 'no such column'."""
    group = parser.add_argument_group("profile table (--table) columns; '' = the table has none")
    group.add_argument("--level", default="well", choices=LEVELS, help="one row per well or per treatment")
    group.add_argument(
        "--normalized", action="store_true", help="the table is already normalized: skip normalization"
    )
    group.add_argument("--plate-column", default="Metadata_Plate", help="plate column ('' = one plate)")
    group.add_argument("--well-column", default="Metadata_Well", help="well column (well level)")
    group.add_argument(
        "--treatment-id-column",
        nargs="+",
        default=["Metadata_TreatmentId"],
        help="treatment id column(s); several are joined with '@' (e.g. compound concentration)",
    )
    group.add_argument("--treatment-column", default="", help="display name column ('' = the id)")
    group.add_argument("--moa-column", default="Metadata_moa", help="MoA labels column ('' = none)")
    group.add_argument(
        "--pert-type-column",
        default="Metadata_pert_type",
        help="column whose --negcon values mark controls ('' = match the treatment id/name)",
    )
    group.add_argument("--negcon", nargs="+", default=["negcon"], help="values marking negative controls")
    group.add_argument("--poscon", nargs="*", default=["poscon"], help="values marking positive controls")
    group.add_argument("--table-moa-separator", default="|", help="separator between MoA labels in the table")
    group.add_argument("--exclude-columns", nargs="*", default=[], help="columns that are not features")


def mapping_from_args(args: argparse.Namespace) -> TableMapping:
    return TableMapping(
        plate=_none_if_empty(args.plate_column),
        well=_none_if_empty(args.well_column),
        treatment_id=tuple(args.treatment_id_column),
        treatment=_none_if_empty(args.treatment_column),
        moa=_none_if_empty(args.moa_column),
        pert_type=_none_if_empty(args.pert_type_column),
        negcon=tuple(args.negcon),
        poscon=tuple(args.poscon or ()),
        moa_separator=args.table_moa_separator,
        exclude_columns=tuple(args.exclude_columns or ()),
    )


def table_arguments(entry: Mapping) -> list[str]:
    """CLI arguments (after ``--table PATH...``) for one ``external.<name>`` config entry (rules)."""
    mapping = mapping_from_config(entry)
    argv = ["--level", entry.get("level", "well")]
    if entry.get("normalized", False):
        argv.append("--normalized")
    # One token per single-valued option (--key=value): an empty value ('' = no such column) stays
    # an argument, where a separate '' element would vanish from a Snakemake-quoted list.
    argv += [f"--plate-column={mapping.plate or ''}", f"--well-column={mapping.well or ''}"]
    argv += ["--treatment-id-column", *mapping.treatment_id]
    argv += [f"--treatment-column={mapping.treatment or ''}", f"--moa-column={mapping.moa or ''}"]
    argv += [f"--pert-type-column={mapping.pert_type or ''}", "--negcon", *mapping.negcon]
    argv += ["--poscon", *mapping.poscon, f"--table-moa-separator={mapping.moa_separator}"]
    if mapping.exclude_columns:
        argv += ["--exclude-columns", *mapping.exclude_columns]
    return argv


# ----------------------------------------------------------------------------- Python API


def evaluate_table(
    paths: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    mapping: TableMapping | None = None,
    level: str = "well",
    name: str | None = None,
    already_normalized: bool = False,
    steps: Mapping | None = None,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    percentile: float = 99.0,
    recall_percents: Sequence[int] = (1, 3, 5, 10),
    same_plate_negcon: bool = False,
    sep: str = "|",
) -> dict[str, Path]:
    """Evaluate one published profile table end to end, the way the workflow evaluates a set.

    Profile steps (:func:`profiles.profile_steps` with ``steps`` options) into ``out_dir/profiles``,
    the evaluation tables into ``out_dir``, and ``out_dir/summary.parquet`` for the set ``name``
    (default: the first file's name without its suffixes).
    """
    from . import evaluate, profiles

    table = read_table(paths, mapping, level=level)
    out_dir = Path(out_dir)
    steps = dict(steps or {})
    profile_paths = profiles.profile_steps(
        table.profiles,
        table.features,
        out_dir / "profiles",
        level=level,
        already_normalized=already_normalized,
        **steps,
    )
    paths_out = evaluate.evaluate_profiles(
        out_dir / "profiles",
        out_dir,
        level=level,
        null_size=null_size,
        threshold=threshold,
        seed=seed,
        percentile=percentile,
        recall_percents=recall_percents,
        same_plate_negcon=same_plate_negcon,
        consensus_operation=steps.get("consensus", "median"),
        sep=sep,
    )
    name = name or table.paths[0].name.split(".")[0]
    summary = evaluate.summarize_set(out_dir, alpha=threshold, name=name)
    paths_out["summary"] = out_dir / "summary.parquet"
    from .io import write_parquet

    write_parquet(summary, paths_out["summary"])
    return {**{f"profiles_{k}": v for k, v in profile_paths.items()}, **paths_out}
