"""Dataset config: load, validate against the JSON schema, fill defaults.

The schema (``workflow/schemas/config.schema.yaml``) forbids unknown keys everywhere, so a typo such as
``tiles: {sise: 448}`` fails before any job runs with a message naming ``tiles.sise``.  The workflow
(common.smk) and the CLI both call :func:`validate_config`, so they agree on defaults.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import yaml

from .errors import ConfigError
from .names import CHANNEL_FORMS, channel_token, check_name

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def _fill_defaults(instance: Any, schema: dict) -> None:
    """Insert ``default`` values of object properties (recursively), before validation.

    jsonschema does not fill defaults itself; doing it first means nested sections that are absent
    (``default: {}``) get their own defaults filled as well.
    """
    kind = schema.get("type")
    if not isinstance(instance, dict) or not (
        kind in ("object", None) or (isinstance(kind, list) and "object" in kind)
    ):
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
    """Cross-key checks the schema cannot express (may normalize ``images.channel_map`` in place)."""
    _check_config_names(config, source)
    images = config["images"]
    if images["layout"] == "pattern" and not images.get("pattern"):
        raise ConfigError(
            f"{source}: config key 'images.pattern' is required when images.layout is 'pattern'"
        )
    if images["layout"] == "loaddata" and not images.get("loaddata"):
        raise ConfigError(
            f"{source}: config key 'images.loaddata' is required when images.layout is 'loaddata'"
        )
    if images["layout"] == "pattern":
        _check_pattern(images, source)
    images["channel_map"] = normalize_channel_map(images["channel_map"], images["layout"], source)
    known = set(images["channel_map"].values())
    unknown = [c for c in config["channels"] if c not in known]
    if unknown:
        raise ConfigError(
            f"{source}: config key 'channels' names {unknown} but images.channel_map only maps to "
            f"{sorted(known)}"
        )
    train = config.get("train") or {}
    processes = (train.get("distributed") or {}).get("processes", 1)
    if "batch_size" in train and train["batch_size"] % processes:
        raise ConfigError(
            f"{source}: config key 'train.batch_size' ({train['batch_size']}) must be divisible by "
            f"train.distributed.processes ({processes}): it is the global batch, split evenly over the processes"
        )


def normalize_channel_map(channel_map: dict, layout: str, source: str = "config") -> dict[str, str]:
    """``images.channel_map`` with keys in the form the manifest compares with file names.

    YAML gives ``5: DNA`` an integer key and people write ``ch5``/``w5`` for the token of the file
    names; all mean channel ``"5"``.  A key no layout token can match fails here, naming the key and
    the accepted forms, instead of every image being dropped later.
    """
    normalized: dict[str, str] = {}
    written: dict[str, object] = {}
    for key, name in channel_map.items():
        token = channel_token(key, layout=layout)
        if token is None:
            raise ConfigError(
                f"{source}: config key 'images.channel_map': key {key!r} is not a channel token of layout "
                f"'{layout}'; write {CHANNEL_FORMS[layout]}"
            )
        if token in normalized:
            raise ConfigError(
                f"{source}: config key 'images.channel_map': keys {written[token]!r} and {key!r} both mean "
                f"channel {token}"
            )
        twice = [k for k, v in normalized.items() if v == name]
        if twice:
            raise ConfigError(
                f"{source}: config key 'images.channel_map': channels {written[twice[0]]!r} and {key!r} "
                f"both map to {name!r}; each stain has one channel"
            )
        normalized[token], written[token] = name, key
    return normalized


def _check_pattern(images: dict, source: str) -> None:
    """``images.pattern`` compiles and has the named groups the manifest reads."""
    try:
        groups = set(re.compile(images["pattern"]).groupindex)
    except re.error as exc:
        raise ConfigError(f"{source}: config key 'images.pattern' is not a valid regex: {exc}") from None
    missing = [g for g in ("site", "channel") if g not in groups]
    if "well" not in groups and not {"row", "col"} <= groups:
        missing.append("well (or row and col)")
    if missing:
        raise ConfigError(
            f"{source}: config key 'images.pattern' lacks the named group(s) {missing}, "
            "e.g. (?P<well>[A-P]\\d\\d)_s(?P<site>\\d+)_w(?P<channel>\\d)"
        )
    if "plate" in groups and images.get("plate"):
        raise ConfigError(
            f"{source}: config keys 'images.plate' and a plate group in 'images.pattern' both name the "
            "plate; keep one"
        )


def _check_config_names(config: dict, source: str) -> None:
    """Names from the config become file names and wildcards: they must be safe (names.py)."""
    where = f"{source}: config key"
    check_name(config["dataset"], kind="dataset name", source=f"{where} 'dataset'", config=True)
    images = config["images"]
    if images.get("plate") is not None:
        check_name(images["plate"], kind="plate name", source=f"{where} 'images.plate'", config=True)
    for plate in images.get("plates", []):
        check_name(plate, kind="plate name", source=f"{where} 'images.plates'", config=True)
    for name in config["channels"]:
        check_name(name, kind="channel name", source=f"{where} 'channels'", config=True)
    for name in images["channel_map"].values():
        check_name(name, kind="channel name", source=f"{where} 'images.channel_map'", config=True)
    train = config.get("train") or {}
    if "name" in train:
        check_name(train["name"], kind="feature-set name", source=f"{where} 'train.name'", config=True)
    for plate in train.get("val_plates", []):
        check_name(plate, kind="plate name", source=f"{where} 'train.val_plates'", config=True)


def exit_on_user_error(error: Exception) -> NoReturn:
    """For the workflow's plan-time checks: print the error as one line and exit 2, like the CLI.

    Raising WorkflowError instead makes Snakemake print a file/line header and a traceback line.
    """
    print(f"phenoprofiler: error: {error}", file=sys.stderr)
    sys.exit(2)


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
