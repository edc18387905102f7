"""Manifest: one row per imaged site, a path per channel, and its treatment metadata.

Sources of file names (``images.layout``):

* ``phenix``  — Opera Phenix: ``[<plate>/]r01c01f01p01-ch1sk1fk1fl1.png`` (row, column, field, channel)
* ``imagexpress`` — ImageXpress: ``[<plate>/]<prefix>_A01_s2_w1<UUID>.tif``
* ``pattern`` — any regex on the path relative to ``images.root`` with named groups ``well`` (or
  ``row`` + ``col``), ``site``, ``channel`` and optionally ``plate``
* ``loaddata`` — a CellProfiler LoadData CSV (``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``,
  ``FileName_<X>``, ``PathName_<X>``)

The plate is ``images.plate`` when the config sets it (explicit config wins), else the layout's ``plate``
group, else the first folder of the relative path.  Every plate, well and site name is checked against
the safe-name rule of :mod:`.names` where it enters.  Channel tokens (``5``, ``ch5``, ``w5`` → ``5``;
``OrigDNA``) are mapped to canonical names through ``images.channel_map`` — never hard-coded, because
public datasets disagree on channel order.  Treatments come from plate maps (``barcode_platemap`` +
``platemap_dir``) or a ``wells`` table, and names/MoA from a ``treatments`` table.

The manifest step also stops a run before any per-plate job when the data cannot work: an image that
cannot be decoded (missing codec, corrupt) or whose size or bit depth differs from its plate's, a control
label (``metadata.negcon``) that matches no well, no plate with control wells.  What it drops or doubts
(plate-map wells without images, images without a plate-map row, plates without controls) it counts,
logs and writes to ``manifest.summary.json`` for the report.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .config import load_config
from .errors import ConfigError, DataError, ImageError
from .io import read_image, read_image_header, write_json, write_parquet
from .names import channel_token, check_name

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
MAX_EXAMPLES = 10  # examples per list in manifest.summary.json
PLATE_FIX = (
    "rename the folder/file (e.g. 'SQ00015198 copy' -> 'SQ00015198_copy'), list the plates to use in "
    "images.plates, set images.plate for a single-plate folder, or use layout: pattern with a plate group "
    "that captures a safe part"
)


class Notes:
    """Warnings of one manifest build: logged as they happen and kept for manifest.summary.json."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)


def normalize_well(well: str, *, source: str = "") -> str:
    """``a1``/``A1``/``A01`` → ``A01``; DataError naming ``source`` (file, row) otherwise."""
    match = re.fullmatch(r"([A-Za-z]{1,2})0*(\d{1,3})", str(well).strip())
    if not match:
        where = f" in {source}" if source else ""
        raise DataError(
            f"cannot read well name {well!r}{where}: expected a row letter and a column number like 'A01'"
        )
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def _site_number(value, *, source: str) -> int:
    """A site (field) number from a file name or table cell; DataError naming ``source`` otherwise."""
    text = str(value).strip()
    if not re.fullmatch(r"\d{1,6}", text):
        raise DataError(f"cannot read site {value!r} in {source}: expected a whole number like 1")
    return int(text)


def _well_from_row_col(row: str, col: str) -> str:
    return f"{chr(ord('A') + int(row) - 1)}{int(col):02d}"


def _image_files(root: Path) -> list[Path]:
    """Image files below ``root``, sorted, following symlinked folders (plate folders are often links
    into a shared store; ``Path.rglob`` would skip them) but never visiting a folder twice (link loops)."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        base = Path(folder)
        found += [base / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())


def scan_images(
    root: str | Path, pattern: str, *, plate: str | None = None, layout: str = "pattern"
) -> pd.DataFrame:
    """List image files under ``root`` matching ``pattern``: columns plate, well, site, channel, path, plate_source.

    ``plate`` (config ``images.plate``) names the plate of every image and wins over the layout's plate
    group and the folder name.  ``plate_source`` says where each plate name came from, for error messages.
    Names are not checked here (see :func:`check_plate_names`), so that ``images.plates`` can leave out
    folders that are not plates.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"config key 'images.root': folder not found: {root}")
    regex = re.compile(pattern)
    rows = []
    for path in _image_files(root):
        rel = path.relative_to(root).as_posix()
        match = regex.search(rel)
        if not match:
            continue
        groups = match.groupdict()
        if plate is not None:
            name, source = plate, "config key 'images.plate'"
        elif groups.get("plate"):
            name = groups["plate"]
            source = f"the plate group of file name {rel!r} under {root}"
            if rel.startswith(f"{name}/") or f"/{name}/" in rel:
                source = f"folder {str(root / rel[: rel.index(name + '/') + len(name)])!r}"
        elif "/" in rel:
            name = rel.split("/")[0]
            source = f"folder {str(root / name)!r}"
        else:
            raise ConfigError(
                f"cannot tell the plate of {path}: the layout gives none; set config key 'images.plate'"
            )
        if groups.get("well"):
            well = normalize_well(groups["well"], source=f"file name {rel!r}")
        elif groups.get("row") and groups.get("col"):
            well = _well_from_row_col(groups["row"], groups["col"])
        else:
            raise ConfigError("config key 'images.pattern' needs a named group 'well' or 'row' and 'col'")
        token = groups["channel"]
        rows.append(
            {
                "plate": str(name),
                "well": well,
                "site": _site_number(groups["site"], source=f"file name {rel!r}"),
                "channel": channel_token(token, layout=layout) or token,
                "path": str(path.resolve()),
                "plate_source": source,
            }
        )
    if not rows:
        raise DataError(f"no image under {root} matches the file-name layout (regex {pattern!r})")
    return pd.DataFrame(rows)


def read_loaddata(csv: str | Path, channel_map: dict[str, str]) -> pd.DataFrame:
    """Long table (plate, well, site, channel, path, plate_source) from a CellProfiler LoadData CSV."""
    csv = Path(csv)
    if not csv.is_file():
        raise ConfigError(f"config key 'images.loaddata': file not found: {csv}")
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = [c for c in METADATA if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: LoadData CSV lacks columns {missing}")
    rows = []
    for token in channel_map:
        fcol, pcol = f"FileName_{token}", f"PathName_{token}"
        if fcol not in table.columns or pcol not in table.columns:
            raise DataError(f"{csv}: no columns {fcol}/{pcol} for channel '{token}' of images.channel_map")
        for index, rec in enumerate(table.to_dict("records")):
            where = f"{csv} row {index + 2}"  # row 1 is the header, as a spreadsheet counts
            folder = Path(str(rec[pcol]))
            if not folder.is_absolute():
                folder = csv.parent / folder
            rows.append(
                {
                    "plate": str(rec["Metadata_Plate"]),
                    "well": normalize_well(rec["Metadata_Well"], source=f"{where}, column Metadata_Well"),
                    "site": _site_number(rec["Metadata_Site"], source=f"{where}, column Metadata_Site"),
                    "channel": token,
                    "path": str((folder / str(rec[fcol])).resolve()),
                    "plate_source": f"{where}, column Metadata_Plate",
                }
            )
    return pd.DataFrame(rows)


def check_plate_names(images: pd.DataFrame, *, explicit: bool = False) -> None:
    """Every plate name of a scanned image list is safe (names.py), else one line naming it and its source."""
    fix = "" if explicit else PLATE_FIX
    for name, source in images.drop_duplicates("plate")[["plate", "plate_source"]].itertuples(index=False):
        check_name(name, kind="plate name", source=source, fix=fix)


def sites_table(
    images: pd.DataFrame, channel_map: dict[str, str], channels: list[str], *, notes: Notes | None = None
) -> pd.DataFrame:
    """Pivot the long image list to one row per site with ``Path_<Channel>`` columns.

    Raises DataError naming the site when a canonical channel has no file, or a channel file twice, and
    naming the tokens found and the map given when no file matches any mapped channel.
    """
    notes = notes or Notes()
    images = images.copy()
    images["channel"] = images["channel"].astype(str)
    found = sorted(set(images["channel"]))
    wanted = {token for token, name in channel_map.items() if name in channels}
    if not set(found) & wanted:
        raise DataError(
            f"no image file has a channel token of images.channel_map: tokens found in the file names: "
            f"{found[:20]}; images.channel_map: {dict(channel_map)} (keys 5, ch5 and w5 all mean channel 5)"
        )
    unknown = sorted(set(found) - set(channel_map))
    if unknown:
        notes.warn(f"ignoring images of channel tokens {unknown}: not in images.channel_map")
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


def _closest(label: str, candidates, n: int = 5) -> list[str]:
    """The candidates most like ``label`` (difflib), else the first few: what the user may have meant."""
    candidates = sorted({str(c) for c in candidates if str(c)})
    return difflib.get_close_matches(label, candidates, n=n, cutoff=0.5) or candidates[:n]


def _wells_table(plates: list[str], meta: dict, notes: Notes) -> pd.DataFrame:
    """The config's wells table with a Metadata_Plate column (the table's plate column, or every plate)."""
    well_col, trt_col, plate_col = meta["well_column"], meta["treatment_column"], meta["plate_column"]
    table = _read_table(meta["wells"], "metadata.wells")
    for col, key in ((well_col, "well_column"), (trt_col, "treatment_column")):
        if col not in table.columns:
            raise DataError(
                f"{meta['wells']}: no column '{col}' (metadata.{key}); columns: {list(table.columns)}"
            )
    if plate_col in table.columns:
        return table.rename(columns={plate_col: "Metadata_Plate"})
    log.info(
        "%s has no plate column '%s' (metadata.plate_column): its wells apply to every plate",
        meta["wells"],
        plate_col,
    )
    return pd.concat([table.assign(Metadata_Plate=p) for p in plates])


def _platemaps_table(plates: list[str], meta: dict) -> pd.DataFrame:
    """Plate maps of ``plates`` via barcode_platemap.csv + platemap_dir/<Plate_Map_Name>.txt."""
    well_col, trt_col = meta["well_column"], meta["treatment_column"]
    barcodes = _read_table(meta["barcode_platemap"], "metadata.barcode_platemap")
    for col in ("Assay_Plate_Barcode", "Plate_Map_Name"):
        if col not in barcodes.columns:
            raise DataError(f"{meta['barcode_platemap']}: no column '{col}'")
    parts = []
    for plate in plates:
        hit = barcodes[barcodes["Assay_Plate_Barcode"] == plate]
        if hit.empty:
            close = _closest(plate, barcodes["Assay_Plate_Barcode"])
            raise DataError(
                f"plate {plate} is not listed in {meta['barcode_platemap']} (Assay_Plate_Barcode; closest: "
                f"{close}); if '{plate}' is a folder name and not the plate, set images.plate or images.plates"
            )
        row = int(hit.index[0]) + 2
        name = check_name(
            hit["Plate_Map_Name"].iloc[0],
            kind="plate map name",
            source=f"{meta['barcode_platemap']} row {row}, column Plate_Map_Name",
        )
        platemap = _read_table(Path(meta["platemap_dir"]) / f"{name}.txt", "metadata.platemap_dir")
        for col in (well_col, trt_col):
            if col not in platemap.columns:
                raise DataError(f"plate map {name}.txt: no column '{col}'")
        parts.append(platemap.assign(Metadata_Plate=plate, _source=f"plate map {name}.txt"))
    return pd.concat(parts)


def well_treatments(plates: list[str], meta: dict, *, notes: Notes | None = None) -> pd.DataFrame:
    """Plate, Well → treatment id from plate maps or a wells table (rows of ``plates`` only)."""
    notes = notes or Notes()
    if meta.get("wells"):
        table = _wells_table(plates, meta, notes)
        source = str(meta["wells"])
    elif meta.get("barcode_platemap") and meta.get("platemap_dir"):
        table = _platemaps_table(plates, meta)
        source = None
    else:
        raise ConfigError(
            "config key 'metadata': give either 'wells' or both 'barcode_platemap' and 'platemap_dir' "
            "so wells can be joined to treatments"
        )
    table = table[table["Metadata_Plate"].astype(str).isin(plates)].copy()
    table = table.rename(
        columns={meta["well_column"]: "Metadata_Well", meta["treatment_column"]: "Metadata_TreatmentId"}
    )
    sources = table["_source"] if "_source" in table.columns else pd.Series(source, index=table.index)
    table["Metadata_Well"] = [
        normalize_well(well, source=f"{src}, column {meta['well_column']}")
        for well, src in zip(table["Metadata_Well"], sources)
    ]
    table["Metadata_TreatmentId"] = table["Metadata_TreatmentId"].fillna("").astype(str).str.strip()
    if meta.get("empty_treatment"):
        table.loc[table["Metadata_TreatmentId"] == "", "Metadata_TreatmentId"] = meta["empty_treatment"]
    table = table[["Metadata_Plate", "Metadata_Well", "Metadata_TreatmentId"]].drop_duplicates()
    clash = table[table.duplicated(["Metadata_Plate", "Metadata_Well"], keep=False)]
    if len(clash):
        first = clash.iloc[0]
        ids = sorted(
            clash.loc[
                (clash.Metadata_Plate == first.Metadata_Plate) & (clash.Metadata_Well == first.Metadata_Well),
                "Metadata_TreatmentId",
            ]
        )
        raise DataError(
            f"plate {first.Metadata_Plate} well {first.Metadata_Well} has more than one treatment in the "
            f"plate map: {ids}"
        )
    return table.reset_index(drop=True)


def _treatment_names(ids: pd.Series, meta: dict) -> tuple[pd.Series, pd.Series]:
    """Display names and canonical MoA strings ('|'-joined, sorted labels) of treatment ids."""
    names, moa = ids.copy(), pd.Series("", index=ids.index)
    if not meta.get("treatments"):
        return names, moa
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
    _check_treatment_join(ids, table, meta)
    if name_col:
        mapped = ids.map(table[name_col])
        names = mapped.where(mapped.notna() & (mapped != ""), ids)
    sep = meta["moa_separator"]
    # Canonical form: labels sorted and joined by '|', whatever the source separator.
    moa = ids.map(table[moa_col]).fillna("")
    moa = moa.map(lambda s: "|".join(sorted({x.strip() for x in s.split(sep) if x.strip()})))
    return names, moa


def _check_treatment_join(ids: pd.Series, table: pd.DataFrame, meta: dict) -> None:
    """A treatments table that matches no treatment id is a wrong key column, not missing annotations
    (e.g. a MoA table keyed by 13-character compound ids given for '<compound>@<dose>' treatments): stop,
    naming both key columns with example values.  A partial match is logged with its counts."""
    controls = set(meta.get("negcon") or []) | set(meta.get("poscon") or []) | {meta.get("empty_treatment")}
    treatments = pd.Series(ids.unique())
    # controls often have no row in a MoA table (DMSO): the check is on the treatments proper
    treatments = treatments[(treatments != "") & ~treatments.isin(controls)]
    if treatments.empty:
        return
    matched = treatments.isin(table.index)
    if not matched.any():
        raise DataError(
            f"config key 'metadata.treatments': no treatment id of the plate maps ({meta['treatment_column']!r}, "
            f"e.g. {treatments.head(3).tolist()}) is in column {meta['treatment_id_column']!r} of "
            f"{meta['treatments']} (e.g. {table.index[:3].tolist()}); check metadata.treatment_id_column, or "
            "build the tables with metadata.index (config/README.md)"
        )
    if not matched.all():
        log.info(
            "treatments table %s: %d of %d treatment ids found (e.g. not found: %s)",
            meta["treatments"],
            int(matched.sum()),
            len(treatments),
            treatments[~matched].head(3).tolist(),
        )


def _examples(frame: pd.DataFrame, columns: dict[str, str]) -> list[dict]:
    """Up to MAX_EXAMPLES rows of ``frame`` as dicts, renamed column -> key."""
    rows = frame[list(columns)].head(MAX_EXAMPLES).rename(columns=columns)
    return [{k: (int(v) if k == "site" else str(v)) for k, v in r.items()} for r in rows.to_dict("records")]


def annotate(
    sites: pd.DataFrame,
    meta: dict,
    *,
    notes: Notes | None = None,
    control_scope: str = "auto",
) -> tuple[pd.DataFrame, dict]:
    """Join sites with treatments, names, MoA and control type; check the controls.

    Returns the annotated sites and the join's bookkeeping for ``manifest.summary.json``
    (``platemap_wells_without_images``, ``images_without_platemap_row``).  ``meta['missing_wells']``
    decides whether unmatched wells/images stop the run (``error``) or are counted and dropped (``warn``).
    ``control_scope`` is ``profiles.normalize_scope``: with ``plate`` every plate needs control wells.
    """
    notes = notes or Notes()
    strict = meta.get("missing_wells", "warn") == "error"
    wells = well_treatments(sorted(sites["Metadata_Plate"].unique()), meta, notes=notes)
    out = sites.merge(wells, on=["Metadata_Plate", "Metadata_Well"], how="left")

    empty = out[out["Metadata_TreatmentId"] == ""]
    if len(empty):
        first = empty.iloc[0]
        raise DataError(
            f"{empty.drop_duplicates(['Metadata_Plate', 'Metadata_Well']).shape[0]} imaged well(s) have an "
            f"empty '{meta['treatment_column']}' cell in the plate map, e.g. plate {first.Metadata_Plate} "
            f"well {first.Metadata_Well}; set metadata.empty_treatment to name them (LINCS: DMSO)"
        )
    unmapped = out[out["Metadata_TreatmentId"].isna()]
    if len(unmapped):
        first = unmapped.iloc[0]
        message = (
            f"{len(unmapped)} imaged site(s) in {unmapped.drop_duplicates(['Metadata_Plate', 'Metadata_Well']).shape[0]} "
            f"well(s) have no row in the plate map, e.g. plate {first.Metadata_Plate} well {first.Metadata_Well}"
        )
        if strict:
            raise DataError(f"{message} (metadata.missing_wells: error)")
        notes.warn(f"{message}: left out of the manifest")
        out = out[out["Metadata_TreatmentId"].notna()]
        if out.empty:
            raise DataError(f"no imaged site has a row in the plate map ({message})")
    imaged = set(zip(sites["Metadata_Plate"], sites["Metadata_Well"]))
    no_images = wells[[pair not in imaged for pair in zip(wells.Metadata_Plate, wells.Metadata_Well)]]
    no_images = no_images.sort_values(["Metadata_Plate", "Metadata_Well"])
    if len(no_images):
        first = no_images.iloc[0]
        message = (
            f"{len(no_images)} plate-map well(s) have no images, e.g. plate {first.Metadata_Plate} well "
            f"{first.Metadata_Well} ({first.Metadata_TreatmentId})"
        )
        if strict:
            raise DataError(f"{message} (metadata.missing_wells: error)")
        notes.warn(message)

    out = out.copy()
    out["Metadata_Treatment"], out["Metadata_moa"] = _treatment_names(out["Metadata_TreatmentId"], meta)
    negcon, poscon = set(meta["negcon"]), set(meta["poscon"])
    labels = set(out["Metadata_Treatment"]) | set(out["Metadata_TreatmentId"])
    for label in meta["negcon"]:
        if label not in labels:
            raise ConfigError(
                f"config key 'metadata.negcon': {label!r} matches no imaged well of any plate; closest "
                f"treatment labels found: {_closest(label, labels)}"
            )
    for label in meta["poscon"]:
        if label not in labels:
            notes.warn(
                f"metadata.poscon {label!r} matches no imaged well; closest: {_closest(label, labels)}"
            )

    def pert_type(row) -> str:
        ids = {row.Metadata_Treatment, row.Metadata_TreatmentId}
        return "negcon" if ids & negcon else "poscon" if ids & poscon else "trt"

    out["Metadata_pert_type"] = [pert_type(r) for r in out.itertuples()]
    no_moa = sorted(
        out.loc[(out.Metadata_pert_type == "trt") & (out.Metadata_moa == ""), "Metadata_Treatment"].unique()
    )
    if no_moa:
        notes.warn(
            f"{len(no_moa)} treatment(s) have no MoA annotation (kept, excluded from MoA metrics): {no_moa[:10]}"
        )
    _check_controls(out, meta, notes, control_scope)
    names, _ = _treatment_names(no_images["Metadata_TreatmentId"], meta)
    bookkeeping = {
        "platemap_wells_without_images": {
            "count": len(no_images),
            "examples": _examples(
                no_images.assign(Metadata_Treatment=names),
                {"Metadata_Plate": "plate", "Metadata_Well": "well", "Metadata_Treatment": "treatment"},
            ),
        },
        "images_without_platemap_row": {
            "count": len(unmapped),
            "examples": _examples(
                unmapped, {"Metadata_Plate": "plate", "Metadata_Well": "well", "Metadata_Site": "site"}
            ),
        },
    }
    return out, bookkeeping


def controls_per_plate(sites: pd.DataFrame) -> dict[str, int]:
    """Number of distinct negative-control wells of every plate (0 included)."""
    wells = sites.drop_duplicates(["Metadata_Plate", "Metadata_Well"])
    counts = wells[wells.Metadata_pert_type == "negcon"].groupby("Metadata_Plate").size()
    return {str(p): int(counts.get(p, 0)) for p in sorted(sites["Metadata_Plate"].unique())}


def _check_controls(sites: pd.DataFrame, meta: dict, notes: Notes, control_scope: str) -> None:
    """Profiles are normalized against control wells: stop now when they cannot be."""
    counts = controls_per_plate(sites)
    without = [plate for plate, n in counts.items() if n == 0]
    if not without:
        return
    if len(without) == len(counts):
        raise DataError(
            f"no plate has negative-control wells (metadata.negcon={meta['negcon']}); profiles are "
            "normalized against them"
        )
    message = (
        f"{len(without)} plate(s) have no negative-control wells (metadata.negcon={meta['negcon']}): "
        f"{without[:10]}"
    )
    if control_scope == "plate":
        raise DataError(
            f"{message}; profiles.normalize_scope is 'plate', which needs controls on every plate"
        )
    notes.warn(f"{message}; they are normalized against controls pooled from other plates")


def check_image_files(
    manifest: pd.DataFrame, *, header_check_max: int = 20000, progress: bool = True
) -> dict:
    """Open the images before any per-plate job does: fail naming the file and the reason.

    One image per plate and channel is decoded (proving the codec is installed); when the manifest has
    at most ``header_check_max`` images, every other header is read too and compared with its plate's:
    one size per plate (channels of a site are stacked, illumination is averaged per plate) and one bit
    depth per plate and channel (a mixed plate cannot share an illumination function).  Every compression
    met is decoded once.  Returns counts {"decoded", "headers"}.
    """
    paths = [c for c in manifest.columns if c.startswith("Path_")]
    check_all = len(manifest) * len(paths) <= header_check_max
    decoded, headers, codecs = 0, 0, set()
    reference_shape: dict[str, tuple] = {}
    reference_dtype: dict[tuple[str, str], tuple] = {}
    plates = manifest.groupby("Metadata_Plate", sort=True)
    for plate, rows in tqdm(plates, desc="checking images", disable=not progress, leave=False):
        for column in paths:
            channel = column[len("Path_") :]
            files = list(rows[column]) if check_all else [rows[column].iloc[0]]
            for k, path in enumerate(files):
                header = read_image_header(path)
                headers += 1
                if k == 0 or header.compression not in codecs:
                    image = read_image(path)  # decodes: a missing codec or corrupt data fails here
                    decoded += 1
                    codecs.add(header.compression)
                    if image.shape != header.shape or image.dtype.name != header.dtype:
                        raise ImageError(
                            f"image {path}: its header says {header.dtype} {header.shape} but it decodes to "
                            f"{image.dtype} {image.shape}"
                        )
                shape_ref = reference_shape.setdefault(plate, (header.shape, path))
                if header.shape != shape_ref[0]:
                    raise ImageError(
                        f"image {path} is {header.shape[1]}x{header.shape[0]} px; the other images of plate "
                        f"{plate} are {shape_ref[0][1]}x{shape_ref[0][0]} px (e.g. {shape_ref[1]})"
                    )
                dtype_ref = reference_dtype.setdefault((plate, channel), (header.dtype, path))
                if header.dtype != dtype_ref[0]:
                    raise ImageError(
                        f"image {path} is {header.dtype}; the other {channel} images of plate {plate} are "
                        f"{dtype_ref[0]} (mixed bit depth, e.g. {dtype_ref[1]})"
                    )
    log.info(
        "checked images: %d decoded, %d headers read%s",
        decoded,
        headers,
        ""
        if check_all
        else f" (one per plate and channel: more than images.header_check_max={header_check_max})",
    )
    return {"decoded": decoded, "headers": headers}


def assemble_manifest(config: dict) -> tuple[pd.DataFrame, dict]:
    """The manifest DataFrame for a validated config and its summary (manifest.summary.json).

    Pixels are not read here (see :func:`check_image_files`), so this is cheap enough to list plates
    while Snakemake plans.
    """
    notes = Notes()
    images_cfg, channels = config["images"], config["channels"]
    if images_cfg["layout"] == "loaddata":
        images = read_loaddata(images_cfg["loaddata"], images_cfg["channel_map"])
        if images_cfg.get("plate"):
            images["plate"], images["plate_source"] = images_cfg["plate"], "config key 'images.plate'"
    else:
        pattern = (
            images_cfg["pattern"]
            if images_cfg["layout"] == "pattern"
            else LAYOUT_PATTERNS[images_cfg["layout"]]
        )
        images = scan_images(
            images_cfg["root"], pattern, plate=images_cfg.get("plate"), layout=images_cfg["layout"]
        )
    if images_cfg["plates"]:
        images = images[images["plate"].isin(images_cfg["plates"])]
        absent = sorted(set(images_cfg["plates"]) - set(images["plate"]))
        if absent:
            raise DataError(f"config key 'images.plates' lists plates with no images: {absent}")
    check_plate_names(images)
    sites = sites_table(images, images_cfg["channel_map"], channels, notes=notes)
    scope = (config.get("profiles") or {}).get("normalize_scope", "auto")
    manifest, bookkeeping = annotate(sites, config["metadata"], notes=notes, control_scope=scope)
    columns = SITE_COLUMNS + [f"Path_{c}" for c in channels]
    manifest = manifest[columns].sort_values(METADATA).reset_index(drop=True)
    manifest["Metadata_Site"] = manifest["Metadata_Site"].astype("int64")
    summary = {
        "sites": len(manifest),
        "plates": int(manifest.Metadata_Plate.nunique()),
        "wells": len(manifest.drop_duplicates(["Metadata_Plate", "Metadata_Well"])),
        "treatments": int(manifest.Metadata_Treatment.nunique()),
        "controls_per_plate": controls_per_plate(manifest),
        **bookkeeping,
        "warnings": notes.warnings,
    }
    return manifest, summary


def build_manifest(config: dict) -> pd.DataFrame:
    """The manifest DataFrame for a validated config (see module docstring)."""
    return assemble_manifest(config)[0]


def list_plates(config: dict) -> list[str]:
    """Plates of a dataset, cheaply (for building workflow targets before the manifest exists)."""
    if config["images"]["plates"]:
        return list(config["images"]["plates"])
    # Errors stop the plan here; warnings belong to the manifest job's log and summary, not to every
    # `snakemake` invocation.
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return sorted(build_manifest(config)["Metadata_Plate"].unique())
    finally:
        log.setLevel(level)


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
    if args.wells or args.treatments:
        from .metadata import built_tables_section

        config["metadata"] = built_tables_section(config["metadata"], args.wells, args.treatments)
    manifest, summary = assemble_manifest(config)
    check_image_files(manifest, header_check_max=config["images"]["header_check_max"])
    if args.summary:
        write_json(summary, args.summary)
    write_parquet(manifest, args.out)
    counts = manifest.groupby("Metadata_pert_type").size().to_dict()
    log.info(
        "manifest: %d sites, %d plates, %d wells, %d treatments %s -> %s",
        summary["sites"],
        summary["plates"],
        summary["wells"],
        summary["treatments"],
        counts,
        args.out,
    )


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("manifest", help="one row per site: channel paths + treatment metadata")
    parser.add_argument("--configfile", required=True, help="dataset config YAML")
    parser.add_argument("--out", required=True, help="output manifest.parquet")
    parser.add_argument(
        "--summary", default=None, help="output manifest.summary.json (counts, dropped wells, warnings)"
    )
    parser.add_argument("--wells", default=None, help="wells table built by 'phenoprofiler metadata'")
    parser.add_argument(
        "--treatments", default=None, help="treatments table built by 'phenoprofiler metadata'"
    )
    parser.set_defaults(func=_run)
