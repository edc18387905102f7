"""Fetch: bring a dataset's images and metadata from the Cell Painting Gallery (or any S3 bucket).

The Gallery (``s3://cellpainting-gallery``, AWS Registry of Open Data) is read anonymously with boto3
(unsigned requests).  Objects under a source prefix are mirrored below a local folder, keeping their
path relative to the prefix, so the folder looks exactly like the bucket below that prefix and the
dataset config's ``images.layout`` reads it as is.

* **Resumable**: a file already on disk with the object's size is skipped; downloads go to a temporary
  name beside the target and are renamed into place, so an interrupted run never leaves a half file
  that a later run would take for complete.
* **Selective**: ``include``/``exclude`` globs on the relative key; ``{plate}`` in a glob expands to each
  plate of ``images.plates`` (or ``*`` when no plates are listed), so only the plates asked for travel.
* **Local copy**: ``local_root`` is a folder that mirrors the bucket (``<local_root>/<key>``), e.g. an
  institutional copy made with ``aws s3 sync``; files are then linked/copied from it, no network used.
* ``endpoint_url`` points at another S3-compatible server (a mirror, or the tests' local moto server).
* **Contained**: keys come from a listing a user does not control (any bucket can be a source), so every
  relative path is checked before anything is written: an absolute path, a ``..`` segment, or a path that
  resolves outside the destination folder is refused with an error naming the key; in local mode a file
  whose real location is outside the local source folder (a symlink pointing out of it) is refused too.

The fetch result is a listing (TSV: ``key, path, size, action``) written atomically last: its presence
means every file of the selection is complete on disk.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import ConfigError, DataError, PhenoProfilerError
from .io import atomic_path, write_text

log = logging.getLogger(__name__)

GALLERY_BUCKET = "cellpainting-gallery"


@dataclass(frozen=True)
class Source:
    """Where a file set comes from: an S3 bucket + key prefix (or a local folder when bucket is None)."""

    bucket: str | None
    prefix: str  # key prefix ending in "/" (or "" for the whole bucket); a folder path when bucket is None

    @classmethod
    def parse(cls, url: str) -> Source:
        if url.startswith("s3://"):
            bucket, _, prefix = url[len("s3://") :].partition("/")
            if not bucket:
                raise ConfigError(f"fetch source {url!r}: no bucket name after s3://")
            if prefix and not prefix.endswith("/"):
                prefix += "/"
            return cls(bucket, prefix)
        return cls(None, str(Path(url)))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.bucket else self.prefix


def expand_globs(globs: list[str], plates: list[str]) -> list[str]:
    """``{plate}`` in a glob → one glob per plate (or ``*`` when no plates are listed)."""
    out: list[str] = []
    for glob in globs:
        if "{plate}" in glob:
            out += [glob.replace("{plate}", plate) for plate in (plates or ["*"])]
        else:
            out.append(glob)
    return out


def selected(rel: str, include: list[str], exclude: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, g) for g in include) and not any(
        fnmatch.fnmatchcase(rel, g) for g in exclude
    )


def s3_client(
    *,
    endpoint_url: str | None = None,
    anonymous: bool = True,
    region: str = "us-east-1",
    retries: int = 5,
    workers: int = 8,
):
    """A boto3 S3 client; anonymous = unsigned requests (public buckets need no credentials)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(
        signature_version=UNSIGNED if anonymous else None,
        retries={"max_attempts": retries, "mode": "standard"},
        max_pool_connections=max(10, workers * 2 + 2),
        connect_timeout=20,
        read_timeout=120,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def list_remote(client, source: Source) -> list[tuple[str, int]]:
    """(key, size) of every object under the source prefix."""
    from botocore.exceptions import BotoCoreError, ClientError

    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=source.bucket, Prefix=source.prefix
        ):
            objects += [
                (o["Key"], int(o["Size"])) for o in page.get("Contents", []) if not o["Key"].endswith("/")
            ]
    except (ClientError, BotoCoreError) as exc:
        raise PhenoProfilerError(f"cannot list {source}: {type(exc).__name__}: {exc}") from exc
    return objects


def browse(
    source: str,
    *,
    endpoint_url: str | None = None,
    anonymous: bool = True,
    region: str = "us-east-1",
    client=None,
) -> list[str]:
    """One level below an S3 prefix: sub-folders (ending in '/') then objects with sizes (like ``aws s3 ls``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    src = Source.parse(source)
    if src.bucket is None:
        folder = Path(src.prefix)
        return sorted(p.name + ("/" if p.is_dir() else f"  {p.stat().st_size}") for p in folder.iterdir())
    client = client or s3_client(endpoint_url=endpoint_url, anonymous=anonymous, region=region)
    lines: list[str] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=src.bucket, Prefix=src.prefix, Delimiter="/"
        )
        for page in pages:
            lines += [p["Prefix"][len(src.prefix) :] for p in page.get("CommonPrefixes", [])]
            lines += [f"{o['Key'][len(src.prefix) :]}  {o['Size']}" for o in page.get("Contents", [])]
    except (ClientError, BotoCoreError) as exc:
        raise PhenoProfilerError(f"cannot list {src}: {type(exc).__name__}: {exc}") from exc
    return lines


def list_local(folder: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file below a local folder."""
    if not folder.is_dir():
        raise ConfigError(f"fetch: local source folder not found: {folder}")
    return [
        (p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()
    ]


def _inside(path: Path, folder: Path) -> bool:
    """True when ``path`` (symlinks resolved) is ``folder`` or below it (symlinks resolved)."""
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(folder)))


def contained_target(rel: str, dest: Path, *, origin: str) -> Path:
    """``dest / rel`` after checking that ``rel`` cannot leave ``dest``; DataError naming the object.

    ``rel`` comes from a bucket listing or a folder walk.  Refused: absolute paths (``/x``, ``C:\\x``), any
    ``..`` segment, backslashes (a Windows separator that would hide ``..``), NUL bytes, and anything whose
    resolved path (through symlinked folders already in ``dest``) is not below ``dest``.
    """
    why = None
    parts = rel.split("/")
    if not rel or rel.startswith("/") or re.match(r"[A-Za-z]:[\\/]", rel):
        why = "is absolute or empty"
    elif "\\" in rel or "\x00" in rel:
        why = "contains a backslash or NUL byte"
    elif ".." in parts:
        why = "contains a '..' segment"
    elif not _inside((dest / rel).parent, dest):
        # the folder it lands in is checked, not the file: a file may be our own link into local_root
        why = f"resolves outside {dest}"
    if why:
        raise DataError(f"fetch: refusing {origin} {rel!r}: its path {why}; nothing was written for it")
    return dest / rel


def _complete(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _place_local(src: Path, dest: Path, link: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    if link == "symlink":
        dest.symlink_to(src.resolve())
    elif link == "hardlink":
        os.link(src, dest)
    else:
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


def fetch(
    source: str,
    dest: str | os.PathLike,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    plates: list[str] | None = None,
    endpoint_url: str | None = None,
    anonymous: bool = True,
    region: str = "us-east-1",
    local_root: str | None = None,
    link: str = "symlink",
    workers: int = 8,
    retries: int = 5,
    client=None,
) -> pd.DataFrame:
    """Mirror the selected objects under ``source`` into ``dest``; return the listing (key, path, size, action).

    action is ``downloaded``, ``skipped`` (already complete on disk) or ``linked``/``copied`` (from a local
    copy).  Raises DataError when the selection is empty, PhenoProfilerError when a download fails.
    """
    include = expand_globs(include or ["*"], plates or [])
    exclude = expand_globs(exclude or [], plates or [])
    dest = Path(dest)
    src = Source.parse(source)
    local_folder: Path | None = None
    if src.bucket is None:
        local_folder = Path(src.prefix)
    elif local_root:
        local_folder = Path(local_root) / src.prefix
    if local_folder is not None:
        objects = list_local(local_folder)
    else:
        client = client or s3_client(
            endpoint_url=endpoint_url, anonymous=anonymous, region=region, retries=retries, workers=workers
        )
        objects = [(key[len(src.prefix) :], size) for key, size in list_remote(client, src)]
    chosen = [(rel, size) for rel, size in objects if selected(rel, include, exclude)]
    # every path is checked before the first byte is written: a hostile key stops the whole fetch
    origin_kind = "file" if local_folder is not None else "object key"
    for rel, _size in chosen:
        contained_target(rel, dest, origin=f"{origin_kind} under {local_folder or src}")
        if local_folder is not None and not _inside(local_folder / rel, local_folder):
            raise DataError(
                f"fetch: refusing {local_folder / rel}: it is a link to {os.path.realpath(local_folder / rel)}, "
                f"outside the local source folder {local_folder}"
            )
    if not chosen:
        raise DataError(
            f"fetch: nothing under {local_folder or src} matches include={include} exclude={exclude} "
            f"({len(objects)} objects there)"
        )
    log.info(
        "fetch: %d of %d objects under %s selected -> %s",
        len(chosen),
        len(objects),
        local_folder or src,
        dest,
    )

    def one(rel: str, size: int) -> tuple[str, str, int, str]:
        target = contained_target(rel, dest, origin=origin_kind)  # checked again: folders may have changed
        if local_folder is not None:
            origin = local_folder / rel
            if link != "copy" and target.is_symlink() and target.resolve() == origin.resolve():
                return rel, str(target), size, "skipped"
            if link == "copy" and _complete(target, size) and not target.is_symlink():
                return rel, str(target), size, "skipped"
            _place_local(origin, target, link)
            return rel, str(target), size, "linked" if link != "copy" else "copied"
        if _complete(target, size):
            return rel, str(target), size, "skipped"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(target) as tmp:
                client.download_file(src.bucket, src.prefix + rel, str(tmp), Config=transfer)
                got = tmp.stat().st_size
                if got != size:
                    raise PhenoProfilerError(
                        f"s3://{src.bucket}/{src.prefix}{rel}: got {got} bytes, listed {size}"
                    )
        except PhenoProfilerError:
            raise
        except Exception as exc:  # botocore/network errors: name the object
            raise PhenoProfilerError(
                f"download of s3://{src.bucket}/{src.prefix}{rel} failed: {type(exc).__name__}: {exc}"
            ) from exc
        return rel, str(target), size, "downloaded"

    from boto3.s3.transfer import TransferConfig
    from tqdm import tqdm

    # parallelism comes from `workers` files at once; two parts per file keeps the connection pool sized
    transfer = TransferConfig(max_concurrency=2)
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, rel, size) for rel, size in chosen]
        for future in tqdm(
            as_completed(futures), total=len(futures), desc="fetch", unit="file", disable=None
        ):
            rows.append(future.result())
    listing = (
        pd.DataFrame(rows, columns=["key", "path", "size", "action"])
        .sort_values("key")
        .reset_index(drop=True)
    )
    counts = listing.action.value_counts().to_dict()
    log.info("fetch: %s (%.1f MB) under %s", counts, listing["size"].sum() / 1e6, dest)
    return listing


def listing_path(config: dict) -> Path:
    """Where the workflow's fetch rule writes its listing: <results>/<dataset>/fetch/files.tsv."""
    return Path(config["results"]) / config["dataset"] / "fetch" / "files.tsv"


def fetch_pending(config: dict) -> bool:
    """True when the plates cannot be known before fetching: fetch is on, ``images.plates`` is empty and
    the fetch has not completed yet (no listing).  The workflow then plans the fetch alone; the next run
    finds the plates in the fetched images."""
    return bool(
        config["fetch"]["activate"] and not config["images"]["plates"] and not listing_path(config).is_file()
    )


def fetch_dataset(config: dict) -> pd.DataFrame:
    """Fetch what a validated dataset config's ``fetch`` section asks for: images, then metadata files."""
    section = config["fetch"]
    if not section.get("source"):
        raise ConfigError(
            "config key 'fetch.source' is required to fetch (s3://bucket/prefix of the images root)"
        )
    common = dict(
        endpoint_url=section["endpoint_url"],
        anonymous=section["anonymous"],
        region=section["region"],
        local_root=section["local_root"],
        link=section["link"],
        workers=section["workers"],
        retries=section["retries"],
    )
    client = None
    if section["local_root"] is None and any(
        s.startswith("s3://") for s in [section["source"]] + [m["source"] for m in section["metadata"]]
    ):
        client = s3_client(
            endpoint_url=section["endpoint_url"],
            anonymous=section["anonymous"],
            region=section["region"],
            retries=section["retries"],
            workers=section["workers"],
        )
    plates = list(config["images"]["plates"])
    parts = [
        fetch(
            section["source"],
            config["images"]["root"],
            include=section["include"],
            exclude=section["exclude"],
            plates=plates,
            client=client,
            **common,
        ).assign(set="images")
    ]
    for item in section["metadata"]:
        parts.append(
            fetch(
                item["source"],
                item["dest"],
                include=item.get("include", ["*"]),
                exclude=[],
                plates=plates,
                client=client,
                **common,
            ).assign(set="metadata")
        )
    return pd.concat(parts, ignore_index=True)


def _run(args: argparse.Namespace) -> None:
    if args.list:
        for line in browse(args.list, endpoint_url=args.endpoint_url, anonymous=not args.signed):
            print(line)
        return
    if args.configfile:
        from .config import load_config

        listing = fetch_dataset(load_config(args.configfile))
    else:
        if not (args.source and args.dest):
            raise ConfigError("phenoprofiler fetch: give --configfile, or --source and --dest")
        listing = fetch(
            args.source,
            args.dest,
            include=args.include or ["*"],
            exclude=args.exclude or [],
            plates=args.plate or [],
            endpoint_url=args.endpoint_url,
            anonymous=not args.signed,
            local_root=args.local_root,
            link=args.link,
            workers=args.workers,
            retries=args.retries,
        )
    if args.out:
        write_text(listing.to_csv(sep="\t", index=False), args.out)


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "fetch",
        help="download a dataset's images/metadata from the Cell Painting Gallery (anonymous S3, resumable)",
        description="Mirror s3://bucket/prefix (or a local folder) into a local folder; files already complete "
        "(same size) are skipped. Either --configfile (the config's fetch section) or --source/--dest.",
    )
    parser.add_argument(
        "--list",
        metavar="S3_URL",
        help="only show what is one level below s3://bucket/prefix/ (browse the Gallery)",
    )
    parser.add_argument("--configfile", help="dataset config YAML (uses its fetch and images sections)")
    parser.add_argument("--source", help="s3://bucket/prefix/ or a local folder")
    parser.add_argument("--dest", help="local folder the files are mirrored into")
    parser.add_argument(
        "--include", action="append", help="glob on the path below the source (repeatable; {plate} expands)"
    )
    parser.add_argument("--exclude", action="append", help="glob to leave out (repeatable)")
    parser.add_argument("--plate", action="append", help="plate for {plate} in globs (repeatable)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (mirror, test server)")
    parser.add_argument(
        "--signed", action="store_true", help="use AWS credentials instead of anonymous requests"
    )
    parser.add_argument(
        "--local-root", help="folder mirroring the bucket: read <local-root>/<key>, no network"
    )
    parser.add_argument(
        "--link",
        choices=["symlink", "hardlink", "copy"],
        default="symlink",
        help="how files from --local-root are placed",
    )
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--retries", type=int, default=5, help="attempts per request")
    parser.add_argument("--out", help="write the listing (TSV: key, path, size, action) here, last")
    parser.set_defaults(func=_run)
