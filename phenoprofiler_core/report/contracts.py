"""The small JSON records other steps write for the report (docs/CONTRACTS.md), read and checked.

- ``manifest.summary.json`` (manifest step): counts, controls per plate, plate-map wells without
  images, images without a plate-map row, warnings.
- ``illum/<plate>/qc.json`` (illumination step): sites used and max/min ratio per channel, warnings.
- ``profiles/<set>/normalization.json`` (profiles step): where the normalization was fit and why.

Each reader returns ``None`` when the file is absent (the report then says "not available") and
raises :class:`DataError` naming the file and key when it is present but not what was agreed, so
a wrong record is shown as an error note instead of being half-used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError

NORMALIZATION_SCOPES = ("plate", "pooled", "batch", "none")


def _load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def _require(path: Path, record: dict, key: str, types: type | tuple[type, ...], what: str):
    value = record.get(key)
    # bool is an int in Python; a count given as true/false is still wrong.
    if (
        key not in record
        or not isinstance(value, types)
        or (isinstance(value, bool) and bool not in _tuple(types))
    ):
        raise DataError(f"{path}: key '{key}' must be {what}, got {value!r}")
    return value


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _counts(path: Path, record: dict, key: str) -> dict[str, int]:
    counts = _require(path, record, key, dict, "an object {plate: count}")
    for plate, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise DataError(f"{path}: {key}[{plate!r}] must be a count ≥ 0, got {count!r}")
    return {str(plate): int(count) for plate, count in counts.items()}


def _strings(path: Path, record: dict, key: str) -> list[str]:
    values = _require(path, record, key, list, "a list of strings")
    if not all(isinstance(v, str) for v in values):
        raise DataError(f"{path}: every item of '{key}' must be a string, got {values!r}")
    return values


def _examples(path: Path, record: dict, key: str, fields: Sequence[str]) -> dict:
    block = _require(
        path, record, key, dict, f'an object {{"count": int, "examples": [{{{", ".join(fields)}}}]}}'
    )
    count = _require(path, block, "count", int, f"a count (in '{key}')")
    examples = _require(path, block, "examples", list, f"a list (in '{key}')")
    for example in examples:
        if not isinstance(example, dict) or not set(fields) <= set(example):
            raise DataError(f"{path}: every example in '{key}' needs keys {list(fields)}, got {example!r}")
    return {"count": count, "examples": examples}


def read_manifest_summary(results: Path) -> dict | None:
    path = results / "manifest.summary.json"
    record = _load(path)
    if record is None:
        return None
    for key in ("sites", "plates", "wells", "treatments"):
        _require(path, record, key, int, "a count")
    return {
        **{key: record[key] for key in ("sites", "plates", "wells", "treatments")},
        "controls_per_plate": _counts(path, record, "controls_per_plate"),
        "platemap_wells_without_images": _examples(
            path, record, "platemap_wells_without_images", ("plate", "well", "treatment")
        ),
        "images_without_platemap_row": _examples(
            path, record, "images_without_platemap_row", ("plate", "well", "site")
        ),
        "warnings": _strings(path, record, "warnings"),
    }


def read_illumination_qc(path: Path) -> dict:
    record = _load(path)
    if record is None:
        raise DataError(f"{path}: file not found")
    channels = _require(path, record, "channels", dict, "an object {channel: {max_over_min, warnings}}")
    checked = {}
    for channel, entry in channels.items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: channels[{channel!r}] must be an object, got {entry!r}")
        ratio = _require(path, entry, "max_over_min", (int, float), f"a number (channel {channel})")
        checked[str(channel)] = {
            "max_over_min": float(ratio),
            "warnings": _strings(path, entry, "warnings"),
        }
    return {
        "plate": str(_require(path, record, "plate", str, "the plate name")),
        "n_sites": _require(path, record, "n_sites", int, "a count"),
        "min_sites": _require(path, record, "min_sites", int, "a count"),
        "max_ratio_limit": float(_require(path, record, "max_ratio_limit", (int, float), "a number")),
        "channels": checked,
        "warnings": _strings(path, record, "warnings"),
    }


def illumination_warnings_of(record: dict) -> list[str]:
    """Every warning of one qc.json record: the plate's, then each channel's (prefixed), once each."""
    found = list(record["warnings"])
    for channel, entry in record["channels"].items():
        found += [f"{channel}: {w}" for w in entry["warnings"] if w not in record["warnings"]]
    return list(dict.fromkeys(found))


def illumination_qc_files(results: Path) -> list[Path]:
    folder = results / "illum"
    return sorted(folder.glob("*/qc.json")) if folder.is_dir() else []


def read_normalization(results: Path, feature_set: str) -> dict | None:
    path = results / "profiles" / feature_set / "normalization.json"
    record = _load(path)
    if record is None:
        return None
    scope = _require(path, record, "scope", str, f"one of {list(NORMALIZATION_SCOPES)}")
    if scope not in NORMALIZATION_SCOPES:
        raise DataError(f"{path}: key 'scope' must be one of {list(NORMALIZATION_SCOPES)}, got {scope!r}")
    batch_column = record.get("batch_column")
    if batch_column is not None and not isinstance(batch_column, str):
        raise DataError(f"{path}: key 'batch_column' must be a string or null, got {batch_column!r}")
    return {
        "method": _require(path, record, "method", str, "the normalization method"),
        "scope": scope,
        "batch_column": batch_column,
        "reason": _require(path, record, "reason", str, "a sentence"),
        "controls_per_plate": _counts(path, record, "controls_per_plate"),
        "min_controls_per_plate": _require(path, record, "min_controls_per_plate", int, "a count"),
        "warnings": _strings(path, record, "warnings"),
    }
