# Feature sets of a run and what their rules take: the hand-crafted baseline, the model trained here,
# models trained by other runs (embed.models), the untrained and published baselines, and external profile
# tables (external:).  A new set is a config entry, not a new rule.

MODEL_NAME = config["train"]["name"]
# Site tiles, or single-cell crops paired with their site's regression target (train.level: cell, or
# auto with cells.activate).  Resolved here so the CLI gets the same answer as the rule's inputs.
TRAIN_LEVEL = config["train"]["level"]
if TRAIN_LEVEL == "auto":
    TRAIN_LEVEL = "cell" if config["cells"]["activate"] else "site"
TRAIN_IMAGES = "cells" if TRAIN_LEVEL == "cell" else "tiles"
TRAIN_INDEX = "cells" if TRAIN_LEVEL == "cell" else "sites"
# train.distributed.processes > 1: one process per GPU on one node via torchrun (torch DDP).
TRAIN_PROCESSES = config["train"]["distributed"]["processes"]


def embed_sets():
    """Feature sets made by the one ``embed`` rule, as name -> kind (trained|untrained|published) and weights."""
    sets = {MODEL_NAME: {"kind": "trained", "weights": f"{RESULTS}/model/{MODEL_NAME}/stage2.pt"}}
    for name, checkpoint in config["embed"]["models"].items():
        # a checkpoint written by another run (it carries its model config and what it was trained on)
        sets[name] = {"kind": "trained", "weights": checkpoint}
    if config["embed"]["untrained"]:
        sets["untrained"] = {"kind": "untrained", "weights": None}
    if config["embed"]["published_weights"]:
        sets["published"] = {"kind": "published", "weights": config["embed"]["published_weights"]}
    return sets


EMBED_SETS = embed_sets()
# the embed rule's {set} wildcard matches exactly these names (never 'classic', made by its own rule)
EMBED_SET_PATTERN = "|".join(re.escape(name) for name in EMBED_SETS)


def feature_sets():
    """Feature sets to profile, evaluate and compare in the report, from the config: the pipeline's
    own, then the profile tables brought in under `external:` (bring your own profiles)."""
    sets = ["classic", *EMBED_SETS]
    clash = [name for name in config["external"] if name in sets]
    if clash:
        exit_on_user_error(
            ConfigError(
                f"config: external profile table name(s) {clash} are already feature sets of the pipeline "
                f"({sets}); rename them"
            )
        )
    return sets + list(config["external"])


FEATURE_SETS = feature_sets()
EVAL_TABLES = ["map_activity", "map_consistency", "foe_map_recall"]


# ----------------------------------------------------------------------------- profiles and evaluate


def profiles_input(wildcards):
    """The set's per-plate site features, or the external profile table(s) it names."""
    entry = config["external"].get(wildcards.set)
    if entry:
        return {"table": list(entry["paths"])}
    return {"features": per_plate(f"features/{wildcards.set}/{{plate}}.parquet")}


def profiles_source_args(wildcards, input):
    """`--features FILES`, or `--table FILES` + its column mapping, as a list for ``:q``."""
    entry = config["external"].get(wildcards.set)
    if entry:
        from phenoprofiler_core.external import table_arguments

        return ["--table", *input.get("table", [])] + table_arguments(entry)
    # Before the manifest checkpoint has run (a profiles file asked for directly), the job's inputs are
    # still the checkpoint's; Snakemake re-plans the job, and these params, once the plates are known.
    return ["--features", *input.get("features", [])]


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
        "manifest_summary": f"{RESULTS}/manifest.summary.json",
        "summary": f"{RESULTS}/eval/summary.parquet",
        "activity": expand(f"{RESULTS}/eval/{{set}}/map_activity.parquet", set=FEATURE_SETS),
        "normalization": expand(f"{RESULTS}/profiles/{{set}}/normalization.json", set=FEATURE_SETS),
        "tiles": per_plate("tiles/{plate}.npy"),
        "embed_stats": [p for s in EMBED_SETS for p in per_plate(f"features/{s}/{{plate}}.embed.json")],
    }
    if config["illumination"]["activate"]:
        inputs["illum"] = per_plate("illum/{plate}")
    if "classic" in FEATURE_SETS:
        inputs["counts"] = per_plate("features/classic/{plate}.parquet")
    return inputs


# ----------------------------------------------------------------------------- train and embed


def _sections(*names):
    sections = {name: config[name] for name in names}
    if "train" in sections:
        sections["train"] = {**sections["train"], "level": TRAIN_LEVEL}
    return json.dumps(sections, sort_keys=True)


def train_inputs(wildcards):
    """Images, their index tables and the regression targets of every plate of every training dataset."""
    images, index, targets = [], [], []
    for dataset in TRAIN_DATASETS:
        images += per_plate(f"{TRAIN_IMAGES}/{{plate}}.npy", dataset)
        index += per_plate(f"{TRAIN_IMAGES}/{{plate}}.{TRAIN_INDEX}.parquet", dataset)
        targets += train_targets(dataset)
    return {"images": images, "index": index, "targets": targets}


def train_targets(dataset):
    """What train regresses onto for a dataset's plates: the one table of train.targets; the teacher's
    per-site embedding medians targets/<plate>.parquet (targets.activate, the paper's target); else the
    classic features."""
    cfg = DATASETS[dataset]
    if config["train"]["targets"]:
        return [config["train"]["targets"]]
    if cfg["targets"]["activate"]:
        return per_plate("targets/{plate}.parquet", dataset)
    return per_plate("features/classic/{plate}.parquet", dataset)


def train_source_args(wildcards, input):
    """--tiles-dir/--cells-dir and --targets-dir of every training dataset, and the plates, for ``:q``."""
    # (while a checkpoint is pending the inputs are not known yet: nothing to pass)
    images, targets = getattr(input, "images", []), getattr(input, "targets", [])
    args = []
    for folder in sorted({os.path.dirname(p) for p in images}):
        args += [f"--{TRAIN_IMAGES}-dir", folder]
    if config["train"]["targets"]:
        args += ["--targets", config["train"]["targets"]]
    else:
        for folder in sorted({os.path.dirname(p) for p in targets}):
            args += ["--targets-dir", folder]
    args += ["--plates", *[os.path.basename(p)[: -len(".npy")] for p in images]]
    return args


def train_provenance(wildcards):
    """What the model is trained on, stored in its checkpoints (the report says it beside the set)."""
    return json.dumps({"datasets": {d: plates(d) for d in TRAIN_DATASETS}}, sort_keys=True)


def targets_fetch_args(wildcards):
    """--source (one per source) and fetch's connection options, as a list for ``:q``; empty = no fetch."""
    cfg = dconfig(wildcards)
    sources = cfg["targets"]["source"]
    sources = [sources] if isinstance(sources, str) else list(sources or [])
    if not sources:
        return []
    fetch = cfg["fetch"]
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
    paper's architecture, and a checkpoint carries its own model config, so only their embed section
    applies; the untrained model is built from this config's model section."""
    if EMBED_SETS[wildcards.set]["kind"] == "untrained":
        return _sections("model", "embed", "seed")
    return _sections("embed", "seed")


def cells_arg(wildcards, input):
    """--cells-dir when the rule's inputs include crops (cell-level embedding), as a list for ``:q``."""
    return ["--cells-dir", os.path.dirname(input.cells)] if "cells" in input.keys() else []


def folder_of(name):
    """params function: the folder of input file ``name`` (the CLI takes folders + plate names)."""
    return lambda wildcards, input: os.path.dirname(
        input[name][0] if isinstance(input[name], list) else input[name]
    )


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
