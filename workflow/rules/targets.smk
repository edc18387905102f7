# The paper's regression target ("teacher"): per-site medians of the Cell Painting CNN-1 single-cell
# embeddings that cpg0019 publishes (one embedding.npz per site), one table per plate, when
# targets.activate.  With targets.source set, each job first mirrors its plate's files into targets.root
# through the fetch machinery (resumable), with the fetch section's connection settings.
TARGETS = config["targets"]
if TARGETS["activate"] and not TARGETS["root"]:
    raise WorkflowError(
        "config key 'targets.root' is required when targets.activate is true (folder of the embedding tree)"
    )
if TARGETS["activate"] and config["train"]["targets"]:
    raise WorkflowError(
        "config keys 'train.targets' and 'targets.activate' both choose the regression target: set one"
    )


rule targets:
    input:
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        f"{RESULTS}/targets/{{plate}}.parquet",
    log:
        f"{RESULTS}/logs/targets/{{plate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/targets/{{plate}}.tsv"
    conda:
        "../../envs/images.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        root=TARGETS["root"] or "",
        # a function, so the {plate}/{well}/{site} of the pattern are not taken for wildcards
        pattern=lambda wildcards: TARGETS["pattern"],
        key=TARGETS["key"],
        missing=TARGETS["missing"],
        dim=["--dim", str(TARGETS["dim"])] if TARGETS["dim"] else [],
        fetch=targets_fetch_args,
    shell:
        "phenoprofiler targets --manifest {input.manifest:q} --plate {wildcards.plate:q} "
        "--root {params.root:q} --pattern {params.pattern:q} --key {params.key:q} "
        "--missing {params.missing:q} {params.dim:q} {params.fetch:q} --out {output:q} > {log:q} 2>&1"
