# PhenoProfiler model: stepwise training, then per-plate embeddings from the trained model, from
# seeded random weights ("untrained" baseline) and, when configured, from the published weights.
# The model/train/embed sections travel as JSON params, so changing them reruns exactly these rules.


rule train:
    input:
        images=expand(f"{RESULTS}/{TRAIN_IMAGES}/{{plate}}.npy", plate=PLATES),
        index=expand(f"{RESULTS}/{TRAIN_IMAGES}/{{plate}}.{TRAIN_INDEX}.parquet", plate=PLATES),
        targets=train_targets,
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
    threads: 8
    resources:
        mem_mb=32000,
        runtime=24 * 60,
        gpu=TRAIN_PROCESSES,
    params:
        config=_sections("model", "train", "seed"),
        images_arg=lambda wildcards, input: f"--{TRAIN_IMAGES}-dir {os.path.dirname(input.images[0])}",
        targets_dir=lambda wildcards, input: os.path.dirname(input.targets[0]),
        plates=" ".join(PLATES),
        out=lambda wildcards, output: os.path.dirname(output.stage1),
        launcher=train_launcher(),
    shell:
        # model/<name>/state/ (per-epoch state) is not an output: a killed job resumes from it.
        # train.distributed.processes > 1: launcher = torchrun, one process per GPU (DDP).
        "{params.launcher} train {params.images_arg} --plates {params.plates} "
        "--targets-dir {params.targets_dir} --config-json {params.config:q} "
        "--threads {threads} --out {params.out} > {log} 2>&1"


rule embed:
    input:
        unpack(embed_images("trained")),
        checkpoint=f"{RESULTS}/model/{MODEL_NAME}/stage2.pt",
    output:
        f"{RESULTS}/features/{MODEL_NAME}/{{plate}}.parquet",
    log:
        f"{RESULTS}/logs/embed/{MODEL_NAME}/{{plate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{MODEL_NAME}/{{plate}}.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        config=_sections("model", "embed", "seed"),
        tiles_dir=folder_of("tiles"),
        cells_arg=cells_arg,
    shell:
        "phenoprofiler embed --plate {wildcards.plate} --tiles-dir {params.tiles_dir} {params.cells_arg} "
        "--checkpoint {input.checkpoint} --config-json {params.config:q} --threads {threads} "
        "--out {output} > {log} 2>&1"


rule embed_untrained:
    input:
        unpack(embed_images("untrained")),
    output:
        f"{RESULTS}/features/untrained/{{plate}}.parquet",
    log:
        f"{RESULTS}/logs/embed/untrained/{{plate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/untrained/{{plate}}.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        config=_sections("model", "embed", "seed"),
        tiles_dir=folder_of("tiles"),
        cells_arg=cells_arg,
    shell:
        "phenoprofiler embed --plate {wildcards.plate} --tiles-dir {params.tiles_dir} {params.cells_arg} --untrained "
        "--config-json {params.config:q} --threads {threads} --out {output} > {log} 2>&1"


rule embed_published:
    input:
        unpack(embed_images("published")),
        weights=config["embed"]["published_weights"] or [],
    output:
        f"{RESULTS}/features/published/{{plate}}.parquet",
    log:
        f"{RESULTS}/logs/embed/published/{{plate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/published/{{plate}}.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        # the published model is always the paper's architecture: only the embed section applies
        config=_sections("embed", "seed"),
        tiles_dir=folder_of("tiles"),
        cells_arg=cells_arg,
    shell:
        "phenoprofiler embed --plate {wildcards.plate} --tiles-dir {params.tiles_dir} {params.cells_arg} "
        "--published {input.weights} --config-json {params.config:q} --threads {threads} "
        "--out {output} > {log} 2>&1"
