"""Metadata stage: the wells and treatments tables of a dataset, built from its published metadata.

The cpg0019 datasets (BBBC022, CDRP, TA-ORF) are described by DeepProfiler's per-site ``index.csv``
(``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``, the channel files and a treatment label:
``Treatment`` = ``<compound>@<dose>`` for BBBC022/CDRP, ``pert_name`` for TA-ORF; Moshkov et al. 2024).
Their MoA ground truth is a separate table keyed by the Broad compound id (its first 13 characters,
``BRD-K98763141``) or the ORF construct id (``resources/moa/``).  This stage joins the two, so a config
names the published files and no table is made by hand (config ``metadata.index``):

* ``wells.csv``: ``plate, well_position, treatment`` — one row per imaged well;
* ``treatments.csv``: ``treatment, name, moa`` — ``moa`` labels joined by ``|``, "" when unknown.

A MoA table that matches no treatment is an error naming both key columns with example values (the
usual cause is a wrong key column or a missing ``moa_key_length``); a partial match is logged with counts.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from .config import load_config
from .errors import ConfigError, DataError
from .io import write_text

log = logging.getLogger(__name__)

WELLS_COLUMNS = ["plate", "well_position", "treatment"]
TREATMENTS_COLUMNS = ["treatment", "name", "moa"]


def _read(path: str | Path, key: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key '{key}': file not found: {path}")
    sep = "\t" if path.suffix.lower() in {".tsv", ".txt"} else ","
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


def _require(table: pd.DataFrame, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{where}: no column(s) {missing}; columns there: {list(table.columns)[:20]}")


def _moa_labels(value: str, separator: str) -> str:
    """Canonical multi-label form: labels stripped, sorted, joined by '|'."""
    return "|".join(sorted({x.strip() for x in str(value).split(separator) if x.strip()}))


def build_tables(
    index: pd.DataFrame, spec: dict, *, moa_table: pd.DataFrame | None = None, where: str = "index"
):
    """(wells, treatments, counts) from a per-site index and an optional MoA table (``spec`` = the config's
    ``metadata.index`` section, whose column names the index must have)."""
    plate, well, label = spec["plate_column"], spec["well_column"], spec["treatment_column"]
    name_col, key_col = spec.get("name_column"), spec.get("moa_key_column")
    _require(index, [plate, well, label] + [c for c in (name_col, key_col) if c], where)
    wells = index[[plate, well, label]].drop_duplicates()
    wells.columns = WELLS_COLUMNS
    conflicting = wells[wells.duplicated(["plate", "well_position"], keep=False)]
    if len(conflicting):
        first = conflicting.iloc[0]
        raise DataError(
            f"{where}: well {first.plate}/{first.well_position} has more than one {label!r}: "
            f"{sorted(conflicting[(conflicting.plate == first.plate) & (conflicting.well_position == first.well_position)].treatment)}"
        )
    per_treatment = index.drop_duplicates(label).set_index(label)
    treatments = pd.DataFrame({"treatment": sorted(wells.treatment.unique())})
    if name_col:
        treatments["name"] = treatments.treatment.map(per_treatment[name_col])
    else:  # '<compound>@<dose>' -> the compound
        treatments["name"] = treatments.treatment.str.split("@").str[0]
    treatments["moa"] = ""
    counts = {"treatments": len(treatments), "with_moa": 0}
    if moa_table is not None:
        keys = treatments.treatment.map(per_treatment[key_col]) if key_col else treatments["name"]
        if spec.get("moa_key_length"):
            keys = keys.str[: spec["moa_key_length"]]
        table_key, table_label = spec["moa_table_key"], spec["moa_table_column"]
        _require(moa_table, [table_key, table_label], str(spec.get("moa_table")))
        labels = moa_table.drop_duplicates(table_key).set_index(table_key)[table_label]
        mapped = keys.map(labels)
        if mapped.notna().sum() == 0:
            raise DataError(
                f"metadata.index: no treatment's MoA key ({key_col or 'name'}"
                f"{', first ' + str(spec['moa_key_length']) + ' characters' if spec.get('moa_key_length') else ''}"
                f", e.g. {keys.head(3).tolist()}) is in column {table_key!r} of {spec.get('moa_table')} "
                f"(e.g. {labels.index[:3].tolist()}); check metadata.index.moa_key_column / moa_key_length"
            )
        separator = spec["moa_table_separator"]
        treatments["moa"] = mapped.fillna("").map(lambda v: _moa_labels(v, separator))
        counts["with_moa"] = int((treatments.moa != "").sum())
    return wells.reset_index(drop=True), treatments, counts


def build_metadata(config: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The tables for a validated config with ``metadata.index`` set."""
    spec = config["metadata"]["index"]
    if not spec:
        raise ConfigError("config key 'metadata.index' is not set: nothing to build the tables from")
    index = _read(spec["path"], "metadata.index.path")
    moa = _read(spec["moa_table"], "metadata.index.moa_table") if spec.get("moa_table") else None
    return build_tables(index, spec, moa_table=moa, where=spec["path"])


def built_tables_section(metadata: dict, wells: str | None, treatments: str | None) -> dict:
    """The config's ``metadata`` section pointed at the tables this stage wrote (their column names)."""
    section = dict(metadata)
    if wells:
        section.update(
            wells=wells,
            barcode_platemap=None,
            platemap_dir=None,
            plate_column="plate",
            well_column="well_position",
            treatment_column="treatment",
        )
    if treatments:
        section.update(
            treatments=treatments,
            treatment_id_column="treatment",
            treatment_name_column="name",
            moa_column="moa",
            moa_separator="|",
        )
    return section


def _run(args: argparse.Namespace) -> None:
    config = load_config(args.configfile)
    wells, treatments, counts = build_metadata(config)
    write_text(wells.to_csv(index=False), args.wells)
    write_text(treatments.to_csv(index=False), args.treatments)
    log.info(
        "metadata: %d wells on %d plates, %d treatments, %d with a MoA label -> %s, %s",
        len(wells),
        wells.plate.nunique(),
        counts["treatments"],
        counts["with_moa"],
        args.wells,
        args.treatments,
    )


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "metadata",
        help="wells and treatments tables from a dataset's published per-site metadata and a MoA table",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--configfile", required=True, help="dataset config YAML (its metadata.index section)"
    )
    parser.add_argument("--wells", required=True, help="output wells.csv (plate, well_position, treatment)")
    parser.add_argument("--treatments", required=True, help="output treatments.csv (treatment, name, moa)")
    parser.set_defaults(func=_run)
