# Config validation and target building.  The config is checked against the JSON schema (with
# defaults) before any job is planned, so a typo fails at once naming the key.
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(workflow.basedir).parent))  # the core package, also without `pip install`

from phenoprofiler_core.config import validate_config
from phenoprofiler_core.errors import PhenoProfilerError
from phenoprofiler_core.manifest import list_plates

def _merged(base, override):
    """``override`` on top of ``base``, recursively (how --config overrides a config file)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
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
    raise WorkflowError(str(_error)) from None
config.clear()
config.update(_validated)

RESULTS = f"{config['results']}/{config['dataset']}"
CHANNELS = list(config["channels"])
try:
    PLATES = list_plates(config)
except PhenoProfilerError as _error:
    raise WorkflowError(str(_error)) from None


wildcard_constraints:
    plate="[^/]+",
    set="[^/]+",


def feature_sets():
    """Feature sets to profile, evaluate and compare in the report, from the config."""
    sets = ["classic"]
    return sets


FEATURE_SETS = feature_sets()
EVAL_TABLES = ["map_activity", "map_consistency", "foe_map_recall"]


def illum_input(wildcards):
    """The plate's illumination folder, or nothing when correction is switched off."""
    if config["illumination"]["activate"]:
        return f"{RESULTS}/illum/{wildcards.plate}"
    return []


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


def profiles_correction_alpha(wildcards):
    """alpha of the phenotype correction for this set: 0 when off or for hand-crafted sets."""
    settings = config["profiles"]
    if settings["correction"] and wildcards.set not in settings["correction_exclude"]:
        return settings["correction_alpha"]
    return 0.0


def evaluate_same_wells_input(wildcards):
    """Every set's selected profiles when sets must be compared on the wells they all have."""
    if config["evaluate"]["same_wells"]:
        return expand(f"{RESULTS}/profiles/{{s}}/selected.parquet", s=FEATURE_SETS)
    return []


def evaluate_same_wells_arg(wildcards):
    if config["evaluate"]["same_wells"]:
        return "--same-wells-as " + " ".join(f"{RESULTS}/profiles/{s}" for s in FEATURE_SETS)
    return ""


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
