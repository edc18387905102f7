"""Manifest: one row per imaged site, a path per channel, and its treatment metadata.

Sources of file names (``images.layout``):

* ``phenix``  — Opera Phenix: ``<plate>/r01c01f01p01-ch1sk1fk1fl1.png`` (row, column, field, channel)
* ``imagexpress`` — ImageXpress: ``[<plate>/]<prefix>_A01_s2_w1<UUID>.tif``
* ``pattern`` — any regex on the path relative to ``images.root`` with named groups ``well`` (or
  ``row`` + ``col``), ``site``, ``channel`` and optionally ``plate``
* ``loaddata`` — a CellProfiler LoadData CSV (``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``,
  ``FileName_<X>``, ``PathName_<X>``)

The plate is the ``plate`` group, else the first folder of the relative path, else ``images.plate``.
Channel tokens (``1``, ``w1`` → ``1``, ``OrigDNA``) are mapped to canonical names through
``images.channel_map`` — never hard-coded, because public datasets disagree on channel order.
Treatments come from plate maps (``barcode_platemap`` + ``platemap_dir``) or a ``wells`` table, and
names/MoA from a ``treatments`` table.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pandas as pd

from .config import load_config
from .errors import ConfigError, DataError
from .io import write_parquet

log = logging.getLogger(__name__)

LAYOUT_PATTERNS = {
    "phenix": r"(?:(?P<plate>[^/]+)/)?r(?P<row>\d{2})c(?P<col>\d{2})f(?P<site>\d+)p\d+-ch(?P<channel>\d+)sk\d+fk\d+fl\d+\.(?:png|tiff?)$",
    "imagexpress": r"(?:(?P<plate>[^/]+)/)?(?:[^/]*_)?(?P<well>[A-Pa-p]\d{2})_s(?P<site>\d+)_w(?P<channel>\d)(?:[0-9A-Fa-f-]{36})?\.(?:png|tiff?)$",
}
IMAGE_SUFFIXES = {".png", ".tif", ".tiff"}
METADATA = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
SITE_COLUMNS = METADATA + [
    "Metadata_Treatment",
    "Metadata_TreatmentId",
    "Metadata_pert_type",
    "Metadata_moa",
]


def normalize_well(well: str) -> str:
    """``a1``/``A1``/``A01`` → ``A01``."""
    match = re.fullmatch(r"([A-Za-z]{1,2})0*(\d{1,3})", str(well).strip())
    if not match:
        raise DataError(
            f"cannot read well name {well!r}: expected a row letter and a column number like 'A01'"
        )
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def _well_from_row_col(row: str, col: str) -> str:
    return f"{chr(ord('A') + int(row) - 1)}{int(col):02d}"


def scan_images(root: str | Path, pattern: str, *, default_plate: str | None = None) -> pd.DataFrame:
    """List image files under ``root`` matching ``pattern``: columns plate, well, site, channel, path."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"config key 'images.root': folder not found: {root}")
    regex = re.compile(pattern)
    rows = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        match = regex.search(rel)
        if not match:
            continue
        groups = match.groupdict()
        plate = groups.get("plate") or (rel.split("/")[0] if "/" in rel else None) or default_plate
        if plate is None:
            raise ConfigError(
                f"cannot tell the plate of {path}: the layout gives none; set config key 'images.plate'"
            )
        if groups.get("well"):
            well = normalize_well(groups["well"])
        elif groups.get("row") and groups.get("col"):
            well = _well_from_row_col(groups["row"], groups["col"])
        else:
            raise ConfigError("config key 'images.pattern' needs a named group 'well' or 'row' and 'col'")
        rows.append(
            {
                "plate": str(plate),
                "well": well,
                "site": int(groups["site"]),
                "channel": groups["channel"],
                "path": str(path.resolve()),
            }
        )
    if not rows:
        raise DataError(f"no image under {root} matches the file-name layout (regex {pattern!r})")
    return pd.DataFrame(rows)


def read_loaddata(csv: str | Path, channel_map: dict[str, str]) -> pd.DataFrame:
    """Long table (plate, well, site, channel, path) from a CellProfiler LoadData CSV."""
    csv = Path(csv)
    if not csv.is_file():
        raise ConfigError(f"config key 'images.loaddata': file not found: {csv}")
    table = pd.read_csv(csv)
    missing = [c for c in METADATA if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: LoadData CSV lacks columns {missing}")
    rows = []
    for token in channel_map:
        fcol, pcol = f"FileName_{token}", f"PathName_{token}"
        if fcol not in table.columns or pcol not in table.columns:
            raise DataError(f"{csv}: no columns {fcol}/{pcol} for channel '{token}' of images.channel_map")
        for _, rec in table.iterrows():
            folder = Path(str(rec[pcol]))
            if not folder.is_absolute():
                folder = csv.parent / folder
            rows.append(
                {
                    "plate": str(rec["Metadata_Plate"]),
                    "well": normalize_well(rec["Metadata_Well"]),
                    "site": int(rec["Metadata_Site"]),
                    "channel": token,
                    "path": str((folder / str(rec[fcol])).resolve()),
                }
            )
    return pd.DataFrame(rows)


def sites_table(images: pd.DataFrame, channel_map: dict[str, str], channels: list[str]) -> pd.DataFrame:
    """Pivot the long image list to one row per site with ``Path_<Channel>`` columns.

    Raises DataError naming the site when a canonical channel has no file, or a channel file twice.
    """
    images = images.copy()
    images["channel"] = images["channel"].astype(str)
    unknown = sorted(set(images["channel"]) - set(channel_map))
    if unknown:
        log.warning("ignoring images of channel tokens %s: not in images.channel_map", unknown)
        images = images[images["channel"].isin(list(channel_map))]
    images["channel"] = images["channel"].map(channel_map)
    images = images[images["channel"].isin(channels)]
    dupes = images[images.duplicated(["plate", "well", "site", "channel"], keep=False)]
    if len(dupes):
        first = dupes.iloc[0]
        files = dupes[
            (dupes.plate == first.plate)
            & (dupes.well == first.well)
            & (dupes.site == first.site)
            & (dupes.channel == first.channel)
        ]["path"].tolist()
        raise DataError(
            f"site {first.plate}/{first.well}/site {first.site} has more than one {first.channel} image: {files}"
        )
    wide = images.pivot(index=["plate", "well", "site"], columns="channel", values="path")
    for channel in channels:
        if channel not in wide.columns:
            wide[channel] = None
    missing = wide[channels].isna()
    if missing.any().any():
        (plate, well, site), row = next((idx, r) for idx, r in missing.iterrows() if r.any())
        raise DataError(
            f"site {plate}/{well}/site {site} has no image for channel(s) {[c for c in channels if row[c]]} "
            f"(expected one file per channel {channels})"
        )
    wide = wide[channels].reset_index()
    wide.columns = METADATA + [f"Path_{c}" for c in channels]
    return wide


def _read_table(path: str | Path, key: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key '{key}': file not found: {path}")
    sep = "\t" if path.suffix.lower() in {".txt", ".tsv"} else ","
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


def well_treatments(plates: list[str], meta: dict) -> pd.DataFrame:
    """Plate, Well → treatment id from plate maps or a wells table."""
    well_col, trt_col = meta["well_column"], meta["treatment_column"]
    if meta.get("wells"):
        table = _read_table(meta["wells"], "metadata.wells")
        for col in (well_col, trt_col):
            if col not in table.columns:
                raise DataError(
                    f"{meta['wells']}: no column '{col}' (metadata.well_column / treatment_column)"
                )
        if "plate" in table.columns:
            table = table.rename(columns={"plate": "Metadata_Plate"})
        else:
            table = pd.concat([table.assign(Metadata_Plate=p) for p in plates])
    elif meta.get("barcode_platemap") and meta.get("platemap_dir"):
        barcodes = _read_table(meta["barcode_platemap"], "metadata.barcode_platemap")
        for col in ("Assay_Plate_Barcode", "Plate_Map_Name"):
            if col not in barcodes.columns:
                raise DataError(f"{meta['barcode_platemap']}: no column '{col}'")
        parts = []
        for plate in plates:
            hit = barcodes[barcodes["Assay_Plate_Barcode"] == plate]
            if hit.empty:
                raise DataError(f"plate {plate} is not listed in {meta['barcode_platemap']}")
            name = hit["Plate_Map_Name"].iloc[0]
            platemap = _read_table(Path(meta["platemap_dir"]) / f"{name}.txt", "metadata.platemap_dir")
            for col in (well_col, trt_col):
                if col not in platemap.columns:
                    raise DataError(f"plate map {name}.txt: no column '{col}'")
            parts.append(platemap.assign(Metadata_Plate=plate))
        table = pd.concat(parts)
    else:
        raise ConfigError(
            "config key 'metadata': give either 'wells' or both 'barcode_platemap' and 'platemap_dir' "
            "so wells can be joined to treatments"
        )
    table = table.rename(columns={well_col: "Metadata_Well", trt_col: "Metadata_TreatmentId"})
    table["Metadata_Well"] = table["Metadata_Well"].map(normalize_well)
    table["Metadata_TreatmentId"] = table["Metadata_TreatmentId"].fillna("").astype(str).str.strip()
    if meta.get("empty_treatment"):
        table.loc[table["Metadata_TreatmentId"] == "", "Metadata_TreatmentId"] = meta["empty_treatment"]
    return table[["Metadata_Plate", "Metadata_Well", "Metadata_TreatmentId"]].drop_duplicates()


def annotate(sites: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Join sites with treatments, names, MoA and control type."""
    wells = well_treatments(sorted(sites["Metadata_Plate"].unique()), meta)
    out = sites.merge(wells, on=["Metadata_Plate", "Metadata_Well"], how="left")
    lost = out[out["Metadata_TreatmentId"].isna() | (out["Metadata_TreatmentId"] == "")]
    if len(lost):
        first = lost.iloc[0]
        raise DataError(
            f"{len(lost)} imaged site(s) have no treatment in the plate map, e.g. plate "
            f"{first.Metadata_Plate} well {first.Metadata_Well}"
        )
    out["Metadata_Treatment"] = out["Metadata_TreatmentId"]
    out["Metadata_moa"] = ""
    if meta.get("treatments"):
        table = _read_table(meta["treatments"], "metadata.treatments")
        id_col, name_col, moa_col = (
            meta["treatment_id_column"],
            meta.get("treatment_name_column"),
            meta["moa_column"],
        )
        for col in [id_col, moa_col] + ([name_col] if name_col else []):
            if col not in table.columns:
                raise DataError(f"{meta['treatments']}: no column '{col}'")
        table = table.drop_duplicates(id_col).set_index(id_col)
        if name_col:
            names = out["Metadata_TreatmentId"].map(table[name_col])
            out["Metadata_Treatment"] = names.where(
                names.notna() & (names != ""), out["Metadata_TreatmentId"]
            )
        moa = out["Metadata_TreatmentId"].map(table[moa_col]).fillna("")
        sep = meta["moa_separator"]
        # Canonical form: labels sorted and joined by '|', whatever the source separator.
        out["Metadata_moa"] = moa.map(
            lambda s: "|".join(sorted({x.strip() for x in s.split(sep) if x.strip()}))
        )
    negcon, poscon = set(meta["negcon"]), set(meta["poscon"])

    def pert_type(row) -> str:
        ids = {row.Metadata_Treatment, row.Metadata_TreatmentId}
        return "negcon" if ids & negcon else "poscon" if ids & poscon else "trt"

    out["Metadata_pert_type"] = [pert_type(r) for r in out.itertuples()]
    no_moa = sorted(
        out.loc[(out.Metadata_pert_type == "trt") & (out.Metadata_moa == ""), "Metadata_Treatment"].unique()
    )
    if no_moa:
        log.warning(
            "%d treatment(s) have no MoA annotation (kept, excluded from MoA metrics): %s",
            len(no_moa),
            no_moa[:10],
        )
    for plate, group in out.groupby("Metadata_Plate"):
        if not (group.Metadata_pert_type == "negcon").any():
            log.warning("plate %s has no negative-control wells (metadata.negcon=%s)", plate, sorted(negcon))
    return out


def build_manifest(config: dict) -> pd.DataFrame:
    """The manifest DataFrame for a validated config (see module docstring)."""
    images_cfg, channels = config["images"], config["channels"]
    if images_cfg["layout"] == "loaddata":
        images = read_loaddata(images_cfg["loaddata"], images_cfg["channel_map"])
    else:
        pattern = (
            images_cfg["pattern"]
            if images_cfg["layout"] == "pattern"
            else LAYOUT_PATTERNS[images_cfg["layout"]]
        )
        images = scan_images(images_cfg["root"], pattern, default_plate=images_cfg.get("plate"))
    if images_cfg["plates"]:
        images = images[images["plate"].isin(images_cfg["plates"])]
        absent = sorted(set(images_cfg["plates"]) - set(images["plate"]))
        if absent:
            raise DataError(f"config key 'images.plates' lists plates with no images: {absent}")
    sites = sites_table(images, images_cfg["channel_map"], channels)
    manifest = annotate(sites, config["metadata"])
    columns = SITE_COLUMNS + [f"Path_{c}" for c in channels]
    manifest = manifest[columns].sort_values(METADATA).reset_index(drop=True)
    manifest["Metadata_Site"] = manifest["Metadata_Site"].astype("int64")
    return manifest


def list_plates(config: dict) -> list[str]:
    """Plates of a dataset, cheaply (for building workflow targets before the manifest exists)."""
    if config["images"]["plates"]:
        return list(config["images"]["plates"])
    return sorted(build_manifest(config)["Metadata_Plate"].unique())


def read_manifest(path: str | Path, plate: str | None = None) -> pd.DataFrame:
    """The manifest (optionally one plate's rows); DataError naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (run the manifest step first)")
    try:
        manifest = pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from exc
    missing = [c for c in METADATA if c not in manifest.columns]
    if missing or not any(c.startswith("Path_") for c in manifest.columns):
        raise DataError(f"{path} is not a manifest: it lacks {missing or 'Path_<channel> columns'}")
    if plate is not None:
        manifest = manifest[manifest["Metadata_Plate"] == plate].reset_index(drop=True)
        if manifest.empty:
            raise DataError(f"{path}: no sites for plate {plate}")
    return manifest


def channels_of(manifest: pd.DataFrame) -> list[str]:
    """Canonical channel order of a manifest (its Path_ columns, in order)."""
    return [c[len("Path_") :] for c in manifest.columns if c.startswith("Path_")]


def _run(args: argparse.Namespace) -> None:
    config = load_config(args.configfile)
    manifest = build_manifest(config)
    write_parquet(manifest, args.out)
    counts = manifest.groupby("Metadata_pert_type").size().to_dict()
    log.info(
        "manifest: %d sites, %d plates, %d wells, %d treatments %s -> %s",
        len(manifest),
        manifest.Metadata_Plate.nunique(),
        len(manifest.drop_duplicates(["Metadata_Plate", "Metadata_Well"])),
        manifest.Metadata_Treatment.nunique(),
        counts,
        args.out,
    )


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("manifest", help="one row per site: channel paths + treatment metadata")
    parser.add_argument("--configfile", required=True, help="dataset config YAML")
    parser.add_argument("--out", required=True, help="output manifest.parquet")
    parser.set_defaults(func=_run)
