# Config validation, the datasets of a run, their plates, what each job asks of the machine or cluster,
# and the targets of `rule all`.  The config is checked against the JSON schema (with defaults) before
# any job is planned, so a typo fails at once naming the key.
import functools
import json
import os
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(workflow.basedir).parent))  # the core package, also without `pip install`

from phenoprofiler_core.config import exit_on_user_error, load_config, validate_config
from phenoprofiler_core.errors import ConfigError, PhenoProfilerError
from phenoprofiler_core.names import check_name
from phenoprofiler_core.workflow_checks import (
    check_plate_folders,
    check_pretrained_weights,
    check_training_datasets,
)


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

DATASET = config["dataset"]
RESULTS_ROOT = config["results"]
RESULTS = f"{RESULTS_ROOT}/{DATASET}"  # the evaluated dataset: features, profiles, eval, report
CHANNELS = list(config["channels"])


# ----------------------------------------------------------------------------- datasets of the run
# The evaluated dataset, plus the datasets a model is trained on when train.datasets names their configs
# (leave-dataset-out: train on BBBC022 + CDRP, evaluate TA-ORF).  Each dataset's image stages (fetch,
# metadata, manifest, illumination, tiles, cells, classic, targets) run over a {dataset} wildcard with that
# dataset's own config, under <results>/<dataset>/, so a model trained elsewhere reads the other datasets'
# own tiles: no links or copies, and a run of config/bbbc022.yaml alone reuses them.


def _training_datasets():
    """Validated configs of train.datasets, their results under this run's results root."""
    found = {}
    for path in config["train"]["datasets"]:
        other = load_config(path)
        other["results"] = RESULTS_ROOT
        found[other["dataset"]] = other
    check_training_datasets(config, found)
    return found


try:
    DATASETS = {DATASET: config, **_training_datasets()}
    TRAIN_DATASETS = [d for d in DATASETS if d != DATASET] or [DATASET]
    if config["train"]["name"] in config["embed"]["models"]:
        raise ConfigError(
            f"config key 'embed.models' repeats the trained set's name '{config['train']['name']}'"
        )
except PhenoProfilerError as _error:
    exit_on_user_error(_error)

DRESULTS = f"{RESULTS_ROOT}/{{dataset}}"  # the image stages of any dataset of the run


wildcard_constraints:
    dataset="|".join(re.escape(name) for name in DATASETS),
    plate="[^/]+",
    set="[^/]+",


def dconfig(wildcards):
    """The config of the job's dataset."""
    return DATASETS[wildcards.dataset]


def dparam(*keys):
    """params function: ``config[keys...]`` of the job's dataset."""

    def value(wildcards):
        found = DATASETS[wildcards.dataset]
        for key in keys:
            found = found[key]
        return found

    return value


# ----------------------------------------------------------------------------- plates
# Plates are listed in images.plates, or found by the manifest step (a checkpoint): the image folder is
# scanned once per run, by that one job, never at every Snakemake start or in every cluster job.


@functools.lru_cache(maxsize=None)
def _plates_in(manifest, mtime):
    import pandas as pd

    return sorted(pd.read_parquet(manifest, columns=["Metadata_Plate"])["Metadata_Plate"].unique())


def plates(dataset=DATASET):
    """Plates of a dataset: images.plates, else those the manifest found (waits for the checkpoint)."""
    listed = DATASETS[dataset]["images"]["plates"]
    if listed:
        return list(listed)
    manifest = checkpoints.manifest.get(dataset=dataset).output.manifest
    return _plates_in(manifest, os.stat(manifest).st_mtime_ns)


def per_plate(pattern, dataset=DATASET):
    """``pattern`` (with {plate}) for every plate of a dataset; under <results>/<dataset>/."""
    return expand(f"{RESULTS_ROOT}/{dataset}/{pattern}", plate=plates(dataset))


def write_config_snapshot(dataset=DATASET):
    """Write a dataset's validated config to <results>/<dataset>/config.yaml (only when it changed).

    CLI steps that need whole config sections (fetch, manifest) read this file; rules pass the
    relevant sections as params too, so Snakemake reruns a step when *its* sections change.
    """
    path = Path(RESULTS_ROOT) / dataset / "config.yaml"
    text = yaml.safe_dump(DATASETS[dataset], sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- resources and cluster
# What every job asks for comes from the dataset config (`resources.<rule>`: threads, mem_mb, runtime),
# because it depends on the data (a 60-site demo or a 3,456-site plate), not on the site; the cluster
# section says how the site wants GPUs and partitions asked for.  Locally, threads are capped by --cores.
CLUSTER = config["cluster"]


def threads_of(rule):
    return config["resources"][rule]["threads"]


@functools.lru_cache(maxsize=None)
def _cluster_gpus_per_node():
    from phenoprofiler_core.cluster import cluster_gpus, query_nodes

    nodes = query_nodes()
    return None if nodes is None else cluster_gpus(nodes)


def gpus_per_job():
    """GPUs a train process or an embed job asks for: cluster.gpus, or for 'auto' 1 where there is a GPU to
    ask for (a SLURM cluster whose sinfo lists GPU nodes; locally always 1, which only matters with
    `--resources gpu=N`) and 0 on a CPU-only cluster, where train and embed then run on CPU."""
    wanted = CLUSTER["gpus"]
    if wanted != "auto":
        return int(wanted)
    executor = workflow.executor_plugin
    name = executor.name if executor is not None else None
    if name == "slurm-jobstep" or (workflow.remote_exec and name != "slurm"):
        # inside a SLURM job: the job step (srun) must ask for what the job was given, or srun refuses
        # it ("Invalid generic resource") on a node without GPUs
        return (
            1
            if os.environ.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0") or os.environ.get("SLURM_JOB_GPUS")
            else 0
        )
    if name not in ("slurm", "dryrun"):
        return 1
    gpus = _cluster_gpus_per_node()
    if gpus is None:  # no sinfo here (a dry run on a laptop)
        return 1
    return 1 if gpus > 0 else 0


def rule_resources(rule, gpus_times=0):
    """``resources:`` of a rule: the config's mem_mb and runtime, the site's partition and account, and
    for train/embed (gpus_times > 0) the GPU request in the form the cluster wants."""

    def gpu(wildcards):
        return gpus_per_job() * gpus_times if CLUSTER["gpu_request"] == "gpus" else 0

    def partition(wildcards):
        uses_gpu = gpus_times and gpus_per_job() > 0
        return (CLUSTER["gpu_partition"] if uses_gpu else None) or CLUSTER["partition"] or ""

    found = {
        "mem_mb": config["resources"][rule]["mem_mb"],
        "runtime": config["resources"][rule]["runtime"],
    }
    if gpus_times:
        found["gpu"] = gpu
        if CLUSTER["gpu_model"]:
            found["gpu_model"] = lambda wildcards: CLUSTER["gpu_model"] if gpu(wildcards) else ""
        if CLUSTER["gpu_request"] == "gres":
            model = f"{CLUSTER['gpu_model']}:" if CLUSTER["gpu_model"] else ""
            found["gres"] = lambda wildcards: (
                f"gpu:{model}{gpus_per_job() * gpus_times}" if gpus_per_job() else ""
            )
    if CLUSTER["partition"] or (gpus_times and CLUSTER["gpu_partition"]):
        found["slurm_partition"] = partition
    if CLUSTER["account"]:
        found["slurm_account"] = CLUSTER["account"]
    return found


def cluster_rules():
    """Rules this config runs as cluster jobs (for the fit check of jobs a checkpoint has not planned yet)."""
    configs = list(DATASETS.values())
    rules = [
        "manifest",
        "tiles",
        "classic",
        "train",
        "embed",
        "profiles",
        "evaluate",
        "evaluate_summary",
        "report",
    ]
    for rule, on in (
        ("fetch", any(c["fetch"]["activate"] for c in configs)),
        ("metadata", any(c["metadata"]["index"] for c in configs)),
        ("illumination", any(c["illumination"]["activate"] for c in configs)),
        ("cells", config["cells"]["activate"]),
        ("targets", any(c["targets"]["activate"] for c in configs)),
    ):
        if on:
            rules.append(rule)
    return [rule for rule in rules if not is_local(rule)]


def is_local(rule):
    """True for tiny steps that run on the submit host instead of as a cluster job (cluster.local_rules)."""
    return rule in CLUSTER["local_rules"]


def plate_group():
    """Group name of the per-plate image chain (one cluster job per plate with cluster.group_plates)."""
    return "plate_chain" if CLUSTER["group_plates"] else None


def preflight():
    """Checks before the first job of a real run (not a dry run): listed plates have folders, pretrained
    weights are available, and on SLURM every request fits a node.  One line per problem, exit 2."""
    try:
        for _cfg in DATASETS.values():
            if not _cfg["fetch"]["activate"]:
                check_plate_folders(_cfg)
        check_pretrained_weights(config["model"])
    except PhenoProfilerError as error:
        exit_on_user_error(error)
    executor = workflow.executor_plugin
    if executor is None or executor.name != "slurm" or not CLUSTER["check_fit"]:
        return
    from phenoprofiler_core.cluster import misfits, query_nodes, requests_of_jobs

    nodes = query_nodes()
    if nodes is None:
        print("phenoprofiler: warning: sinfo is not available; requests not checked against the nodes")
        return
    jobs = [job for job in workflow.dag.needrun_jobs() if not job.is_local]
    planned = {name: config["resources"][name] for name in cluster_rules()}
    problems = misfits(requests_of_jobs(jobs, planned), nodes)
    if problems:
        hint = (
            "set resources.<rule> (threads, mem_mb) in the config to what your nodes have, or "
            "cluster.partition / cluster.gpu_partition (config/README.md, 'resources')"
        )
        for line in [*problems, hint]:
            print(f"phenoprofiler: error: {line}", file=sys.stderr)
        raise SystemExit(2)


onstart:
    # A job that fits no node pends forever on SLURM (reason PartitionConfig) while Snakemake waits.
    preflight()


# ----------------------------------------------------------------------------- targets of `rule all`


def illum_input(wildcards):
    """The plate's illumination folder, or nothing when correction is switched off for its dataset."""
    if dconfig(wildcards)["illumination"]["activate"]:
        return f"{RESULTS_ROOT}/{wildcards.dataset}/illum/{wildcards.plate}"
    return []


def illum_arg(wildcards, input):
    """--illum FOLDER when correction is on, as a list for ``:q`` (empty: no argument at all)."""
    return ["--illum", input.illum] if input.illum else []


def fetch_listing(wildcards):
    """What a dataset's manifest waits for: its fetch listing (written last) when it fetches."""
    if dconfig(wildcards)["fetch"]["activate"]:
        return f"{RESULTS_ROOT}/{wildcards.dataset}/fetch/files.tsv"
    return []


def metadata_tables(wildcards):
    """The wells/treatments tables the metadata stage builds for a dataset (metadata.index set)."""
    if dconfig(wildcards)["metadata"]["index"]:
        return {
            "wells": f"{RESULTS_ROOT}/{wildcards.dataset}/metadata/wells.csv",
            "treatments": f"{RESULTS_ROOT}/{wildcards.dataset}/metadata/treatments.csv",
        }
    return {}


def all_targets(wildcards):
    """What `rule all` builds, from the config (plates come from the manifest when not listed)."""
    targets = [f"{RESULTS}/manifest.parquet"]
    targets += per_plate("tiles/{plate}.npy")
    if config["illumination"]["activate"]:
        targets += per_plate("illum/{plate}")
    if config["cells"]["activate"]:
        targets += per_plate("cells/{plate}.npy")
    targets += per_plate("features/classic/{plate}.parquet")
    targets.append(f"{RESULTS}/eval/summary.parquet")
    targets.append(f"{RESULTS}/report.html")
    return targets
