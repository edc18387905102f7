"""Targets: the paper's regression target, per-site medians of Cell Painting CNN-1 single-cell embeddings.

PhenoProfiler (arXiv 2502.19568; its public ``dataset.py``) regresses each site image onto the median of
the single-cell embeddings that the Cell Painting CNN-1 (Moshkov et al., Nat Commun 15:1594, 2024; weights
doi:10.5281/zenodo.7114558) gave that site's cells, after dropping the cells whose embedding holds a NaN.
The Cell Painting Gallery publishes those embeddings in ``cpg0019-moshkov-deepprofiler``::

    broad/workspace_dl/embeddings/105281_zenodo7114558/<collection>/<plate>/<well>/<site>/embedding.npz

one file per site, array ``features`` = (cells, 672).  Naming, as the public PhenoProfiler code reads it
(its path comment ``.../105281_zenodo7114558/BBBC022/20585/A01/1``): well = row letter + two-digit
column (``A01``, our manifest's form), site = the integer without padding (``1``).  Both are assumptions
about a tree this project could not list; ``pattern`` makes them configurable (Python format fields
``{plate}``, ``{well}``, ``{row}``, ``{col}``, ``{site}``, e.g. ``{row}{col}`` for ``A1``, ``{site:02d}``,
and ``!l``/``!u`` for case: ``{well!l}`` for ``a01``).

Per site: rows with any NaN (or ±inf: a median with an infinite value is no usable target) are dropped, the
median of the rest is the target.  A site with no usable row (zero cells, or all of them NaN) is skipped,
counted and logged: it has no target, so it must not be trained on (there is no honest value to put).
A manifest site without a file is an error naming the file (``missing="error"``, the default: in cpg0019
images and embeddings come from one DeepProfiler run, so a gap means a wrong pattern or an incomplete
fetch) or a counted skip (``missing="skip"``).

Output ``targets/<plate>.parquet``: ``Metadata_Plate, Metadata_Well, Metadata_Site`` (int),
``Metadata_Cells`` (cells in the median), ``Metadata_CellsWithNaN`` (cells dropped), then float32
columns ``embedding_000`` ... -- the form ``train.read_targets`` reads (``Metadata_*`` columns are not
targets).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import string
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError, DataError
from .io import write_parquet

log = logging.getLogger(__name__)

SITE_KEYS = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
DEFAULT_PATTERN = "{plate}/{well}/{site}/embedding.npz"
PATTERN_FIELDS = {"plate", "well", "row", "col", "site"}
# what each field matches when the tree is scanned without a manifest
_FIELD_REGEX = {
    "plate": r"[^/]+",
    "well": r"[A-Za-z]{1,2}\d{1,3}",
    "row": r"[A-Za-z]{1,2}",
    "col": r"\d{1,3}",
    "site": r"\d+",
}
SKIP_EMPTY = "no cells left after dropping rows with NaN"
SKIP_MISSING = "no embedding file"
_LOGGED_SKIPS = 50  # skipped sites listed one per line in the log; the rest are counted


# ----------------------------------------------------------------------------- file names


class _PatternFormatter(string.Formatter):
    """str.format plus the conversions ``!l`` (lower case) and ``!u`` (upper case): ``{well!l}`` = a01."""

    def convert_field(self, value, conversion):
        if conversion == "l":
            return str(value).lower()
        if conversion == "u":
            return str(value).upper()
        return super().convert_field(value, conversion)


def pattern_fields(pattern: str) -> list[tuple[str, str | None, str | None]]:
    """(literal text, field name or None, conversion) of a path pattern; ConfigError when malformed."""
    try:
        parts = list(_PatternFormatter().parse(pattern))
    except ValueError as exc:
        raise ConfigError(f"targets.pattern {pattern!r}: {exc}") from exc
    names = {field for _, field, _, _ in parts if field is not None}
    unknown = sorted(names - PATTERN_FIELDS)
    if unknown:
        raise ConfigError(
            f"targets.pattern {pattern!r}: unknown field(s) {unknown}; allowed: {sorted(PATTERN_FIELDS)}"
        )
    conversions = sorted({c for _, _, _, c in parts if c not in (None, "l", "u")})
    if conversions:
        raise ConfigError(f"targets.pattern {pattern!r}: unknown conversion(s) {conversions}; allowed: !l !u")
    if "site" not in names or not ("well" in names or {"row", "col"} <= names):
        raise ConfigError(
            f"targets.pattern {pattern!r}: needs {{site}} and {{well}} (or {{row}} and {{col}}) "
            "so every site has its own file"
        )
    return [(literal, field, conversion) for literal, field, _, conversion in parts]


def site_file(pattern: str, *, plate: str, well: str, site: int) -> str:
    """The path (relative to the tree's root) of one site's embedding file."""
    match = re.fullmatch(r"([A-Za-z]{1,2})(\d{1,3})", well)
    if not match:
        raise DataError(f"well {well!r} of plate {plate}: expected a row letter and a column number like A01")
    values = dict(plate=plate, well=well, row=match.group(1), col=int(match.group(2)), site=int(site))
    pattern_fields(pattern)  # named errors for unknown fields before formatting
    try:
        return _PatternFormatter().format(pattern, **values)
    except (ValueError, TypeError) as exc:  # a format spec that does not fit the value, e.g. {well:d}
        raise ConfigError(f"targets.pattern {pattern!r}: {exc}") from exc


def _plate_text(plate: str, conversion: str | None) -> str:
    return _PatternFormatter().convert_field(plate, conversion) if conversion else plate


def plate_glob(pattern: str, *, plate: str) -> str:
    """The pattern with ``{plate}`` filled in and every other field as ``*`` (a glob of the plate's files)."""
    return "".join(
        literal + (_plate_text(plate, conversion) if field == "plate" else "*" if field else "")
        for literal, field, conversion in pattern_fields(pattern)
    )


def plate_regex(pattern: str, *, plate: str) -> re.Pattern:
    """A regex on the relative path: the given plate, and named groups for the other fields."""
    parts, seen = [], set()
    for literal, field, conversion in pattern_fields(pattern):
        parts.append(re.escape(literal))
        if field == "plate":
            parts.append(re.escape(_plate_text(plate, conversion)))
        elif field in seen:  # the same field twice in a path must hold the same value
            parts.append(f"(?P={field})")
        elif field:
            seen.add(field)
            parts.append(f"(?P<{field}>{_FIELD_REGEX[field]})")
    return re.compile("".join(parts))


def _well_of(match: re.Match) -> str:
    groups = match.groupdict()
    if groups.get("well"):
        row, col = re.fullmatch(r"([A-Za-z]{1,2})(\d{1,3})", groups["well"]).groups()
    else:
        row, col = groups["row"], groups["col"]
    return f"{row.upper()}{int(col):02d}"  # the manifest's form (manifest.normalize_well)


def find_sites(root: str | os.PathLike, pattern: str, *, plate: str) -> pd.DataFrame:
    """Every embedding file of one plate under ``root`` (no manifest): site keys + ``path``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"embedding tree {root} not found (targets.root)")
    regex = plate_regex(pattern, plate=plate)
    rows = []
    for path in root.glob(plate_glob(pattern, plate=plate)):
        match = regex.fullmatch(path.relative_to(root).as_posix())
        if match and path.is_file():
            rows.append((plate, _well_of(match), int(match.group("site")), str(path)))
    if not rows:
        raise DataError(
            f"no embedding file of plate {plate} under {root} matches targets.pattern {pattern!r} "
            f"(looked for {plate_glob(pattern, plate=plate)})"
        )
    sites = pd.DataFrame(rows, columns=SITE_KEYS + ["path"])
    duplicated = sites.duplicated(SITE_KEYS, keep=False)
    if duplicated.any():  # e.g. {col} matching both A1 and A01
        raise DataError(
            f"{root}: several files for one site: {sorted(sites.loc[duplicated, 'path'])[:4]}; make "
            "targets.pattern specific enough that each site has one file"
        )
    return sites.sort_values(SITE_KEYS).reset_index(drop=True)


def manifest_sites(
    manifest: pd.DataFrame, root: str | os.PathLike, pattern: str, *, plate: str
) -> pd.DataFrame:
    """The plate's sites of the manifest with the embedding file each should have (site keys + ``path``)."""
    rows = manifest.loc[manifest["Metadata_Plate"].astype(str) == plate, SITE_KEYS].drop_duplicates()
    if rows.empty:
        raise DataError(f"the manifest has no site of plate {plate}")
    rows = rows.assign(
        Metadata_Plate=plate,
        Metadata_Well=rows["Metadata_Well"].astype(str),
        Metadata_Site=rows["Metadata_Site"].astype("int64"),
    )
    paths = [
        str(Path(root) / site_file(pattern, plate=plate, well=well, site=site))
        for well, site in zip(rows["Metadata_Well"], rows["Metadata_Site"], strict=True)
    ]
    return rows.assign(path=paths).sort_values(SITE_KEYS).reset_index(drop=True)


# ----------------------------------------------------------------------------- medians


def read_cell_embeddings(path: str | os.PathLike, *, key: str = "features") -> np.ndarray:
    """The (cells, D) array ``key`` of one site's ``.npz``; DataError naming the file when unusable."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise DataError(f"{path}: no array {key!r} (arrays: {archive.files}); set targets.key")
            cells = archive[key]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read embedding file {path}: {type(exc).__name__}: {exc}") from exc
    if cells.ndim == 1 and cells.size == 0:
        cells = cells.reshape(0, 0)  # a site without cells may be stored as an empty vector
    if cells.ndim != 2 or cells.dtype.kind not in "fiu":
        raise DataError(
            f"{path}: {key!r} has shape {cells.shape} and type {cells.dtype}; expected (cells, features) numbers"
        )
    return cells


def site_median(cells: np.ndarray) -> tuple[np.ndarray | None, int]:
    """Median over the cells with no NaN/inf value, in float64, and how many cells it used (None when 0)."""
    values = cells.astype(np.float64, copy=False)
    usable = np.isfinite(values).all(axis=1)
    if not usable.any():
        return None, 0
    return np.median(values[usable], axis=0), int(usable.sum())


def embedding_columns(width: int) -> list[str]:
    digits = max(3, len(str(width - 1)))
    return [f"embedding_{i:0{digits}d}" for i in range(width)]


def build_targets(
    sites: pd.DataFrame, *, key: str = "features", missing: str = "error", dim: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-site medians of the files in ``sites`` (site keys + ``path``): (targets, skipped sites).

    ``missing``: ``error`` stops at a site without a file (naming it and the count), ``skip`` leaves it
    out.  ``dim``: the expected embedding width (None: whatever the first file has; all must agree).
    Skipped has the site keys, ``path`` and ``reason``.
    """
    from tqdm import tqdm

    if missing not in ("error", "skip"):
        raise ConfigError(f"targets.missing must be 'error' or 'skip', got {missing!r}")
    exists = np.array([Path(p).is_file() for p in sites["path"]], dtype=bool)
    if not exists.all() and missing == "error":
        absent = sites.loc[~exists, "path"].tolist()
        raise DataError(
            f"{len(absent)} of {len(sites)} sites have no embedding file, e.g. {absent[0]} "
            "(check targets.pattern and targets.root, or set targets.missing: skip)"
        )
    skipped = [
        (*row, SKIP_MISSING) for row in sites.loc[~exists, SITE_KEYS + ["path"]].itertuples(index=False)
    ]
    keys, medians, counts = [], [], []
    width = dim
    present = sites.loc[exists, SITE_KEYS + ["path"]]
    for plate, well, site, path in tqdm(
        present.itertuples(index=False), total=len(present), desc="targets", unit="site", disable=None
    ):
        cells = read_cell_embeddings(path, key=key)
        if cells.shape[0] and width is None:
            width = cells.shape[1]
        if cells.shape[0] and cells.shape[1] != width:
            raise DataError(
                f"{path}: {cells.shape[1]} features per cell, expected {width}"
                + (" (targets.dim)" if dim is not None else " (as the plate's first file)")
            )
        median, used = site_median(cells)
        if median is None:
            skipped.append((plate, well, site, path, SKIP_EMPTY))
            continue
        keys.append((plate, well, int(site)))
        medians.append(median)
        counts.append((used, cells.shape[0] - used))
    skipped = pd.DataFrame(skipped, columns=SITE_KEYS + ["path", "reason"])
    if not medians:
        raise DataError(
            f"none of {len(sites)} sites has a usable embedding ({skipped.reason.value_counts().to_dict()})"
        )
    table = pd.DataFrame(keys, columns=SITE_KEYS).astype({"Metadata_Site": "int64"})
    table["Metadata_Cells"] = np.array([c[0] for c in counts], dtype=np.int64)
    table["Metadata_CellsWithNaN"] = np.array([c[1] for c in counts], dtype=np.int64)
    values = pd.DataFrame(np.asarray(medians, dtype=np.float32), columns=embedding_columns(width))
    return pd.concat([table, values], axis=1), skipped


def log_skipped(skipped: pd.DataFrame, *, plate: str, n_sites: int) -> None:
    """Count the skipped sites by reason and list the first ones, so a run's log shows what has no target."""
    if skipped.empty:
        log.info("targets: plate %s: all %d sites have a target", plate, n_sites)
        return
    log.warning(
        "targets: plate %s: %d of %d sites skipped (no target, so not trainable): %s",
        plate,
        len(skipped),
        n_sites,
        skipped.reason.value_counts().to_dict(),
    )
    for row in skipped.head(_LOGGED_SKIPS).itertuples(index=False):
        log.warning("  skipped %s %s site %s: %s (%s)", row[0], row[1], row[2], row.reason, row.path)
    if len(skipped) > _LOGGED_SKIPS:
        log.warning("  ... and %d more", len(skipped) - _LOGGED_SKIPS)


# ----------------------------------------------------------------------------- fetching the tree


def _below(source: str, relative: str) -> str:
    """``relative`` below an s3://bucket/prefix/ or a local folder."""
    if source.startswith("s3://"):
        return source.rstrip("/") + "/" + relative.strip("/") + "/"
    return str(Path(source) / relative)


def fetch_plate_embeddings(
    sources: list[str], root: str | os.PathLike, *, plate: str, pattern: str = DEFAULT_PATTERN, **connection
) -> pd.DataFrame:
    """Mirror one plate's embedding files into ``root`` from the first source that holds them.

    Uses :func:`phenoprofiler_core.fetch.fetch` (resumable: complete files are skipped; downloads are
    renamed into place).  When the pattern starts with ``{plate}/`` only that plate's prefix is listed,
    not the whole collection.  ``connection``: fetch's endpoint_url, anonymous, region, local_root, link,
    workers, retries.  DataError naming every source when none has the plate.
    """
    from .fetch import Source, fetch

    glob = plate_glob(pattern, plate=plate)
    head, tail = (f"{plate}/", glob[len(plate) + 1 :]) if glob.startswith(f"{plate}/") else ("", glob)
    tried = []
    for source in sources:
        narrowed = _below(source, head) if head else source
        dest = Path(root) / head
        parsed = Source.parse(narrowed)
        # a local folder (or the local mirror of a bucket) without the plate: fetch would call that a
        # config error; here it only means "not in this source"
        local = Path(parsed.prefix) if parsed.bucket is None else None
        if parsed.bucket is not None and connection.get("local_root"):
            local = Path(connection["local_root"]) / parsed.prefix
        if local is not None and not local.is_dir():
            tried.append(f"{narrowed} (no folder {local})")
            continue
        try:
            listing = fetch(narrowed, dest, include=[tail], plates=[plate], **connection)
        except DataError as exc:  # nothing of this plate in this source: try the next one
            tried.append(f"{narrowed} ({exc})")
            continue
        log.info("targets: plate %s: %s from %s", plate, listing.action.value_counts().to_dict(), narrowed)
        return listing
    raise DataError(f"no embedding files of plate {plate} in any targets.source: {'; '.join(tried)}")


# ----------------------------------------------------------------------------- CLI


def _run(args: argparse.Namespace) -> None:
    if args.source:
        fetch_plate_embeddings(
            args.source,
            args.root,
            plate=args.plate,
            pattern=args.pattern,
            endpoint_url=args.endpoint_url,
            anonymous=not args.signed,
            region=args.region,
            local_root=args.local_root,
            link=args.link,
            workers=args.workers,
            retries=args.retries,
        )
    if args.manifest:
        from .manifest import read_manifest

        sites = manifest_sites(
            read_manifest(args.manifest, plate=args.plate), args.root, args.pattern, plate=args.plate
        )
    else:
        sites = find_sites(args.root, args.pattern, plate=args.plate)
    try:
        table, skipped = build_targets(sites, key=args.key, missing=args.missing, dim=args.dim)
    except DataError as exc:
        raise DataError(f"plate {args.plate}: {exc}") from exc
    log_skipped(skipped, plate=args.plate, n_sites=len(sites))
    write_parquet(table, args.out)
    n_features = sum(not c.startswith("Metadata_") for c in table.columns)
    log.info(
        "targets: plate %s: %d sites x %d features (median %d cells per site) -> %s",
        args.plate,
        len(table),
        n_features,
        int(table["Metadata_Cells"].median()),
        args.out,
    )


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "targets",
        help="per-site regression targets: medians of single-cell embeddings (cpg0019 embedding.npz tree)",
        description="For one plate, the median of every site's single-cell embeddings (rows with NaN dropped), "
        "from a tree of <root>/<pattern> files (cpg0019 workspace_dl/embeddings layout), optionally mirrored "
        "first from --source (S3 or a local folder). Sites come from --manifest, or from the files found.",
    )
    parser.add_argument(
        "--root", required=True, help="folder holding the embedding tree (--source lands here)"
    )
    parser.add_argument("--plate", required=True, help="plate to build")
    parser.add_argument("--out", required=True, help="output table targets/<plate>.parquet")
    parser.add_argument(
        "--manifest", help="manifest.parquet: its sites of the plate are the ones needing a target"
    )
    parser.add_argument(
        "--pattern",
        default=DEFAULT_PATTERN,
        help="file of one site below --root; fields {plate} {well} {row} {col} {site} (default: %(default)s)",
    )
    parser.add_argument("--key", default="features", help="array in each .npz (default: %(default)s)")
    parser.add_argument(
        "--missing",
        choices=["error", "skip"],
        default="error",
        help="a manifest site without a file: stop naming it, or skip and count it (default: %(default)s)",
    )
    parser.add_argument(
        "--dim", type=int, help="expected features per cell (e.g. 672); default: any, consistent"
    )
    fetching = parser.add_argument_group("fetching the tree first (phenoprofiler fetch's options)")
    fetching.add_argument(
        "--source",
        action="append",
        help="s3://bucket/prefix/ or a local folder mirrored into --root (repeatable: the first holding the plate)",
    )
    fetching.add_argument("--endpoint-url", help="S3-compatible endpoint (mirror, test server)")
    fetching.add_argument(
        "--signed", action="store_true", help="use AWS credentials instead of anonymous requests"
    )
    fetching.add_argument("--region", default="us-east-1", help="AWS region of the bucket")
    fetching.add_argument(
        "--local-root", help="folder mirroring the bucket: read <local-root>/<key>, no network"
    )
    fetching.add_argument("--link", choices=["symlink", "hardlink", "copy"], default="symlink")
    fetching.add_argument("--workers", type=int, default=8, help="parallel downloads")
    fetching.add_argument("--retries", type=int, default=5, help="attempts per request")
    parser.set_defaults(func=_run)
