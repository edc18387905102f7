# PhenoProfiler model: stepwise training, then per-plate embeddings from the trained model, from
# seeded random weights ("untrained" baseline) and, when configured, from the published weights.
# The model/train/embed sections travel as JSON params, so changing them reruns exactly these rules.


rule train:
    input:
        unpack(train_inputs),
    output:
        stage1=f"{RESULTS}/model/{MODEL_NAME}/stage1.pt",
        stage2=f"{RESULTS}/model/{MODEL_NAME}/stage2.pt",
        history=f"{RESULTS}/model/{MODEL_NAME}/history.csv",
    log:
        f"{RESULTS}/logs/train/{MODEL_NAME}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{MODEL_NAME}.tsv"
    conda:
        "../../envs/model.yaml"
    # Each training process needs a core for compute (all of its share on CPU) plus one per DataLoader
    # worker; --threads hands the job's cores to the processes (config/README.md, train).
    threads: threads_of("train")
    resources:
        **rule_resources("train", gpus_times=TRAIN_PROCESSES),
    params:
        config=_sections("model", "train", "seed"),
        sources=train_source_args,
        provenance=train_provenance,
        out=lambda wildcards, output: os.path.dirname(output.stage1),
        launcher=train_launcher(),
    shell:
        # model/<name>/state/ (per-epoch state) is not an output: a killed job resumes from it.
        # train.distributed.processes > 1: launcher = torchrun, one process per GPU (DDP).
        "{params.launcher:q} train {params.sources:q} --config-json {params.config:q} "
        "--provenance {params.provenance:q} --threads {threads:q} --out {params.out:q} > {log:q} 2>&1"


rule embed:
    # One rule for every embedded feature set (EMBED_SETS in sets.smk): the trained model, the
    # untrained baseline, the published weights.  A new set is a config entry, not a new rule.
    input:
        unpack(embed_inputs),
    output:
        features=f"{RESULTS}/features/{{set}}/{{plate}}.parquet",
        # the job's timing: start-up, compile, sites/s (read by the report)
        stats=f"{RESULTS}/features/{{set}}/{{plate}}.embed.json",
    log:
        f"{RESULTS}/logs/embed/{{set}}/{{plate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{set}}/{{plate}}.tsv"
    wildcard_constraints:
        set=EMBED_SET_PATTERN,
    conda:
        "../../envs/model.yaml"
    threads: threads_of("embed")
    resources:
        **rule_resources("embed", gpus_times=1),
    params:
        model=embed_model_args,
        config=embed_config,
        tiles_dir=folder_of("tiles"),
        cells_arg=cells_arg,
        # one TorchInductor cache for every embed job of the run: only the first job compiles cold
        compile_cache=f"{RESULTS}/.cache/torchinductor",
    shell:
        "phenoprofiler embed --plate {wildcards.plate:q} --tiles-dir {params.tiles_dir:q} {params.cells_arg:q} "
        "{params.model:q} --config-json {params.config:q} --threads {threads:q} "
        "--compile-cache {params.compile_cache:q} --stats {output.stats:q} "
        "--out {output.features:q} > {log:q} 2>&1"
