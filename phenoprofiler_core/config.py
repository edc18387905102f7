"""Dataset config: load, validate against the JSON schema, fill defaults.

The schema (``workflow/schemas/config.schema.yaml``) forbids unknown keys everywhere, so a typo such as
``tiles: {sise: 448}`` fails before any job runs with a message naming ``tiles.sise``.  The workflow
(common.smk) and the CLI both call :func:`validate_config`, so they agree on defaults.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def _fill_defaults(instance: Any, schema: dict) -> None:
    """Insert ``default`` values of object properties (recursively), before validation.

    jsonschema does not fill defaults itself; doing it first means nested sections that are absent
    (``default: {}``) get their own defaults filled as well.
    """
    if not isinstance(instance, dict) or schema.get("type") not in ("object", None):
        return
    for key, subschema in schema.get("properties", {}).items():
        if key not in instance and "default" in subschema:
            instance[key] = copy.deepcopy(subschema["default"])
        if key in instance:
            _fill_defaults(instance[key], subschema)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "<top level>"


def validate_config(config: dict, schema: dict | None = None, *, source: str = "config") -> dict:
    """Return a validated copy of ``config`` with defaults filled; raise ConfigError naming the key."""
    schema = load_schema() if schema is None else schema
    config = copy.deepcopy(config) if config is not None else {}
    _fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            where = _key_path(error)
            if error.validator == "additionalProperties":
                allowed = sorted(error.schema.get("properties", {}))
                unexpected = sorted(set(error.instance) - set(allowed))
                prefix = f"{where}." if error.absolute_path else ""
                for key in unexpected:
                    lines.append(f"unknown config key '{prefix}{key}' (allowed here: {', '.join(allowed)})")
            else:
                lines.append(f"config key '{where}': {error.message}")
        raise ConfigError(f"{source}: " + "; ".join(lines))
    _check_consistency(config, source)
    return config


def _check_consistency(config: dict, source: str) -> None:
    """Cross-key checks the schema cannot express."""
    images = config["images"]
    known = set(images["channel_map"].values())
    unknown = [c for c in config["channels"] if c not in known]
    if unknown:
        raise ConfigError(
            f"{source}: config key 'channels' names {unknown} but images.channel_map only maps to "
            f"{sorted(known)}"
        )
    if images["layout"] == "pattern" and not images.get("pattern"):
        raise ConfigError(
            f"{source}: config key 'images.pattern' is required when images.layout is 'pattern'"
        )
    train = config.get("train") or {}
    processes = (train.get("distributed") or {}).get("processes", 1)
    if "batch_size" in train and train["batch_size"] % processes:
        raise ConfigError(
            f"{source}: config key 'train.batch_size' ({train['batch_size']}) must be divisible by "
            f"train.distributed.processes ({processes}): it is the global batch, split evenly over the processes"
        )
    if images["layout"] == "loaddata" and not images.get("loaddata"):
        raise ConfigError(
            f"{source}: config key 'images.loaddata' is required when images.layout is 'loaddata'"
        )


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return validate_config(raw, source=str(path))
