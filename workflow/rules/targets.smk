# The paper's regression target ("teacher"): per-site medians of the Cell Painting CNN-1 single-cell
# embeddings that cpg0019 publishes (one embedding.npz per site), one table per plate, for every dataset
# of the run with targets.activate.  With targets.source set, each job first mirrors its plate's files into
# targets.root through the fetch machinery (resumable), with the fetch section's connection settings.
for _name, _cfg in DATASETS.items():
    if _cfg["targets"]["activate"] and not _cfg["targets"]["root"]:
        exit_on_user_error(
            ConfigError(
                f"dataset {_name}: config key 'targets.root' is required when targets.activate is true "
                "(folder of the embedding tree)"
            )
        )
if config["targets"]["activate"] and config["train"]["targets"]:
    exit_on_user_error(
        ConfigError(
            "config keys 'train.targets' and 'targets.activate' both choose the regression target: set one"
        )
    )


rule targets:
    input:
        manifest=f"{DRESULTS}/manifest.parquet",
    output:
        f"{DRESULTS}/targets/{{plate}}.parquet",
    log:
        f"{DRESULTS}/logs/targets/{{plate}}.log",
    benchmark:
        f"{DRESULTS}/benchmarks/targets/{{plate}}.tsv"
    group:
        plate_group()
    conda:
        "../../envs/images.yaml"
    threads: threads_of("targets")
    resources:
        **rule_resources("targets"),
    params:
        root=lambda wildcards: dconfig(wildcards)["targets"]["root"] or "",
        # a function, so the {plate}/{well}/{site} of the pattern are not taken for wildcards
        pattern=lambda wildcards: dconfig(wildcards)["targets"]["pattern"],
        key=dparam("targets", "key"),
        missing=dparam("targets", "missing"),
        dim=lambda wildcards: (
            ["--dim", str(dconfig(wildcards)["targets"]["dim"])]
            if dconfig(wildcards)["targets"]["dim"]
            else []
        ),
        fetch=targets_fetch_args,
    shell:
        "phenoprofiler targets --manifest {input.manifest:q} --plate {wildcards.plate:q} "
        "--root {params.root:q} --pattern {params.pattern:q} --key {params.key:q} "
        "--missing {params.missing:q} {params.dim:q} {params.fetch:q} --out {output:q} > {log:q} 2>&1"
