# Config validation and target building.  The config is checked against the JSON schema (with
# defaults) before any job is planned, so a typo fails at once naming the key.
import json
import os
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(workflow.basedir).parent))  # the core package, also without `pip install`

from phenoprofiler_core.config import exit_on_user_error, validate_config
from phenoprofiler_core.errors import PhenoProfilerError
from phenoprofiler_core.fetch import fetch_pending
from phenoprofiler_core.manifest import list_plates


def _merged(base, override):
    """``override`` on top of ``base``, recursively (how --config overrides a config file)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


if not workflow.configfiles:
    # No --configfile: run the embedded demo (with any --config overrides on top).  A `configfile:`
    # directive would be merged *under* a user's --configfile and leak demo keys into it.
    with open(Path(workflow.basedir).parent / "config" / "demo.yaml") as _handle:
        _demo = _merged(yaml.safe_load(_handle), config)
    config.clear()
    config.update(_demo)

try:
    _validated = validate_config(config, source="config")
except PhenoProfilerError as _error:
    exit_on_user_error(_error)  # one line, exit 2
config.clear()
config.update(_validated)

RESULTS = f"{config['results']}/{config['dataset']}"
CHANNELS = list(config["channels"])
if fetch_pending(config):
    PLATES = []  # unknown until the images are fetched: `rule all` asks for the fetch alone
else:
    try:
        PLATES = list_plates(config)
    except PhenoProfilerError as _error:
        exit_on_user_error(_error)  # one line, exit 2


wildcard_constraints:
    plate="[^/]+",
    set="[^/]+",


def feature_sets():
    """Feature sets to profile, evaluate and compare in the report, from the config: the pipeline's
    own, then the profile tables brought in under `external:` (bring your own profiles)."""
    sets = ["classic", config["train"]["name"]]
    if config["embed"]["untrained"]:
        sets.append("untrained")
    if config["embed"]["published_weights"]:
        sets.append("published")
    clash = [name for name in config["external"] if name in sets]
    if clash:
        raise WorkflowError(
            f"config: external profile table name(s) {clash} are already feature sets of the pipeline "
            f"({sets}); rename them"
        )
    return sets + list(config["external"])


FEATURE_SETS = feature_sets()
EVAL_TABLES = ["map_activity", "map_consistency", "foe_map_recall"]


def illum_input(wildcards):
    """The plate's illumination folder, or nothing when correction is switched off."""
    if config["illumination"]["activate"]:
        return f"{RESULTS}/illum/{wildcards.plate}"
    return []


def illum_arg(wildcards, input):
    """--illum FOLDER when correction is on, as a list for ``:q`` (empty: no argument at all)."""
    return ["--illum", input.illum] if input.illum else []


def write_config_snapshot():
    """Write the validated config to RESULTS/config.yaml (only when it changed) and return its path.

    CLI steps that need whole config sections (manifest, train) read this file; rules pass the
    relevant sections as params too, so Snakemake reruns a step when *its* sections change.
    """
    path = Path(RESULTS) / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(path)


def all_targets():
    """What `rule all` builds, from the config (grows as stages are switched on)."""
    if fetch_pending(config):
        return [f"{RESULTS}/fetch/files.tsv"]
    targets = [f"{RESULTS}/manifest.parquet"]
    targets += expand(f"{RESULTS}/tiles/{{plate}}.npy", plate=PLATES)
    if config["illumination"]["activate"]:
        targets += expand(f"{RESULTS}/illum/{{plate}}", plate=PLATES)
    if config["cells"]["activate"]:
        targets += expand(f"{RESULTS}/cells/{{plate}}.npy", plate=PLATES)
    targets += expand(f"{RESULTS}/features/classic/{{plate}}.parquet", plate=PLATES)
    targets.append(f"{RESULTS}/eval/summary.parquet")
    targets.append(f"{RESULTS}/report.html")
    return targets


def profiles_input(wildcards):
    """The set's per-plate site features, or the external profile table(s) it names."""
    entry = config["external"].get(wildcards.set)
    if entry:
        return {"table": list(entry["paths"])}
    return {"features": expand(f"{RESULTS}/features/{wildcards.set}/{{plate}}.parquet", plate=PLATES)}


def profiles_source_args(wildcards, input):
    """`--features FILES`, or `--table FILES` + its column mapping, as a list for ``:q``."""
    entry = config["external"].get(wildcards.set)
    if entry:
        from phenoprofiler_core.external import table_arguments

        return ["--table", *input.table] + table_arguments(entry)
    return ["--features", *input.features]


def profiles_batch_arg(wildcards):
    """--batch-column COLUMN when profiles.batch_column is set, as a list for ``:q``."""
    column = config["profiles"]["batch_column"]
    return ["--batch-column", column] if column else []


def profiles_correction_alpha(wildcards):
    """alpha of the phenotype correction for this set: 0 when off, for hand-crafted sets and for
    external profile tables (they have no sites to correct)."""
    settings = config["profiles"]
    if wildcards.set in config["external"]:
        return 0.0
    if settings["correction"] and wildcards.set not in settings["correction_exclude"]:
        return settings["correction_alpha"]
    return 0.0


def same_wells_sets():
    """Sets compared on the wells they all have: the pipeline's own sets, and external well-level
    tables of the same plates (external.<name>.same_wells, default true)."""
    external = config["external"]
    return [
        s
        for s in FEATURE_SETS
        if s not in external
        or (external[s].get("level", "well") == "well" and external[s].get("same_wells", True))
    ]


def evaluate_same_wells_input(wildcards):
    """Every compared set's selected profiles when sets must be compared on the wells they all have."""
    if config["evaluate"]["same_wells"] and wildcards.set in same_wells_sets():
        return expand(f"{RESULTS}/profiles/{{s}}/selected.parquet", s=same_wells_sets())
    return []


def evaluate_same_wells_arg(wildcards):
    """CLI arguments as a list (each element is shell-quoted by the rule's ``:q``)."""
    if config["evaluate"]["same_wells"] and wildcards.set in same_wells_sets():
        return ["--same-wells-as"] + [f"{RESULTS}/profiles/{s}" for s in same_wells_sets()]
    return []


def report_inputs(wildcards):
    """What the report summarises; QC inputs are listed so a changed plate re-renders the page."""
    inputs = {
        "manifest": f"{RESULTS}/manifest.parquet",
        "summary": f"{RESULTS}/eval/summary.parquet",
        "activity": expand(f"{RESULTS}/eval/{{set}}/map_activity.parquet", set=FEATURE_SETS),
        "profiles": expand(f"{RESULTS}/profiles/{{set}}/normalized.parquet", set=FEATURE_SETS),
        "tiles": expand(f"{RESULTS}/tiles/{{plate}}.npy", plate=PLATES),
    }
    if config["illumination"]["activate"]:
        inputs["illum"] = expand(f"{RESULTS}/illum/{{plate}}", plate=PLATES)
    if "classic" in FEATURE_SETS:
        inputs["counts"] = expand(f"{RESULTS}/features/classic/{{plate}}.parquet", plate=PLATES)
    return inputs


# ----------------------------------------------------------------------------- model rules

MODEL_NAME = config["train"]["name"]
# Site tiles, or single-cell crops paired with their site's regression target (train.level: cell, or
# auto with cells.activate).  Resolved here so the CLI gets the same answer as the rule's inputs.
TRAIN_LEVEL = config["train"]["level"]
if TRAIN_LEVEL == "auto":
    TRAIN_LEVEL = "cell" if config["cells"]["activate"] else "site"
TRAIN_IMAGES = "cells" if TRAIN_LEVEL == "cell" else "tiles"
TRAIN_INDEX = "cells" if TRAIN_LEVEL == "cell" else "sites"


def _sections(*names):
    sections = {name: config[name] for name in names}
    if "train" in sections:
        sections["train"] = {**sections["train"], "level": TRAIN_LEVEL}
    return json.dumps(sections, sort_keys=True)


def train_targets(wildcards):
    """What train regresses onto: the one table of train.targets; the teacher's per-site embedding
    medians targets/<plate>.parquet (targets.activate, the paper's target); else the classic features."""
    if config["train"]["targets"]:
        return [config["train"]["targets"]]
    if config["targets"]["activate"]:
        return expand(f"{RESULTS}/targets/{{plate}}.parquet", plate=PLATES)
    return expand(f"{RESULTS}/features/classic/{{plate}}.parquet", plate=PLATES)


def targets_fetch_args(wildcards):
    """--source (one per source) and fetch's connection options, as a list for ``:q``; empty = no fetch."""
    sources = config["targets"]["source"]
    sources = [sources] if isinstance(sources, str) else list(sources or [])
    if not sources:
        return []
    fetch = config["fetch"]
    args = [token for source in sources for token in ("--source", source)]
    args += ["--region", fetch["region"], "--link", fetch["link"]]
    args += ["--workers", str(fetch["workers"]), "--retries", str(fetch["retries"])]
    if fetch["endpoint_url"]:
        args += ["--endpoint-url", fetch["endpoint_url"]]
    if fetch["local_root"]:
        args += ["--local-root", fetch["local_root"]]
    if not fetch["anonymous"]:
        args.append("--signed")
    return args


def embed_level(kind):
    """Level a feature set is embedded at: embed.level, or for 'auto' the trained model's level."""
    level = config["embed"]["level"]
    if level == "auto":
        return TRAIN_LEVEL if kind == "trained" else "site"
    return level


def embed_sets():
    """Feature sets made by the one ``embed`` rule, as name -> kind (trained|untrained|published) and weights.

    A new embedded set is an entry here (from the config), not a new rule.
    """
    sets = {MODEL_NAME: {"kind": "trained", "weights": f"{RESULTS}/model/{MODEL_NAME}/stage2.pt"}}
    if config["embed"]["untrained"]:
        sets["untrained"] = {"kind": "untrained", "weights": None}
    if config["embed"]["published_weights"]:
        sets["published"] = {"kind": "published", "weights": config["embed"]["published_weights"]}
    return sets


EMBED_SETS = embed_sets()
# the embed rule's {set} wildcard matches exactly these names (never 'classic', made by its own rule)
EMBED_SET_PATTERN = "|".join(re.escape(name) for name in EMBED_SETS)


def embed_inputs(wildcards):
    """Tiles always (their sites table carries the site metadata); crops at cell level; the weights."""
    entry = EMBED_SETS[wildcards.set]
    found = {
        "tiles": f"{RESULTS}/tiles/{wildcards.plate}.npy",
        "sites": f"{RESULTS}/tiles/{wildcards.plate}.sites.parquet",
    }
    if embed_level(entry["kind"]) == "cell":
        found["cells"] = f"{RESULTS}/cells/{wildcards.plate}.npy"
        found["cells_table"] = f"{RESULTS}/cells/{wildcards.plate}.cells.parquet"
    if entry["weights"]:
        found["weights"] = entry["weights"]
    return found


def embed_model_args(wildcards, input):
    """How `phenoprofiler embed` gets the set's model, as a list for ``:q``."""
    kind = EMBED_SETS[wildcards.set]["kind"]
    if kind == "trained":
        return ["--checkpoint", input.weights]
    if kind == "published":
        return ["--published", input.weights]
    return ["--untrained"]


def embed_config(wildcards):
    """Config sections the set's embedding depends on (JSON): the published model is always the
    paper's architecture, so only its embed section applies."""
    if EMBED_SETS[wildcards.set]["kind"] == "published":
        return _sections("embed", "seed")
    return _sections("model", "embed", "seed")


def cells_arg(wildcards, input):
    """--cells-dir when the rule's inputs include crops (cell-level embedding), as a list for ``:q``."""
    return ["--cells-dir", os.path.dirname(input.cells)] if "cells" in input.keys() else []


def folder_of(name):
    """params function: the folder of input file ``name`` (the CLI takes folders + plate names)."""
    return lambda wildcards, input: os.path.dirname(
        input[name][0] if isinstance(input[name], list) else input[name]
    )


# train.distributed.processes > 1: one process per GPU on one node via torchrun (torch DDP).
TRAIN_PROCESSES = config["train"]["distributed"]["processes"]


def train_launcher():
    """The command that runs `phenoprofiler train`: directly, or under torchrun for N processes."""
    if TRAIN_PROCESSES == 1:
        return ["phenoprofiler"]
    return [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        str(TRAIN_PROCESSES),
        "-m",
        "phenoprofiler_core.cli",
    ]
