# Image stage of every dataset of the run: (metadata tables) -> manifest -> illumination functions ->
# site tiles at model size.  The manifest is a checkpoint: when images.plates is empty, the plates it
# finds decide the per-plate jobs of the same run.


rule metadata:
    # metadata.index: the dataset's published per-site metadata (DeepProfiler's index.csv for cpg0019),
    # joined with a shipped MoA table, becomes the wells and treatments tables the manifest reads.
    input:
        fetched=fetch_listing,
    output:
        wells=f"{DRESULTS}/metadata/wells.csv",
        treatments=f"{DRESULTS}/metadata/treatments.csv",
    log:
        f"{DRESULTS}/logs/metadata.log",
    benchmark:
        f"{DRESULTS}/benchmarks/metadata/metadata.tsv"
    localrule: is_local("metadata")
    conda:
        "../../envs/images.yaml"
    threads: threads_of("metadata")
    resources:
        **rule_resources("metadata"),
    params:
        configfile=lambda wildcards: write_config_snapshot(wildcards.dataset),
        sections=dparam("metadata"),
    shell:
        "phenoprofiler metadata --configfile {params.configfile:q} --wells {output.wells:q} "
        "--treatments {output.treatments:q} > {log:q} 2>&1"


checkpoint manifest:
    input:
        unpack(metadata_tables),
        fetched=fetch_listing,
    output:
        manifest=f"{DRESULTS}/manifest.parquet",
        # counts, dropped wells/images and warnings, for the report
        summary=f"{DRESULTS}/manifest.summary.json",
    log:
        f"{DRESULTS}/logs/manifest.log",
    benchmark:
        f"{DRESULTS}/benchmarks/manifest/manifest.tsv"
    localrule: is_local("manifest")
    conda:
        "../../envs/images.yaml"
    threads: threads_of("manifest")
    resources:
        **rule_resources("manifest"),
    params:
        configfile=lambda wildcards: write_config_snapshot(wildcards.dataset),
        # the sections the manifest depends on: a change here reruns it (and only then)
        sections=lambda wildcards: {k: dconfig(wildcards)[k] for k in ("channels", "images", "metadata")},
        # the manifest checks controls against the normalization scope (plate scope: every plate)
        control_scope=dparam("profiles", "normalize_scope"),
        tables=lambda wildcards, input: (
            ["--wells", input.wells, "--treatments", input.treatments] if "wells" in input.keys() else []
        ),
    shell:
        "phenoprofiler manifest --configfile {params.configfile:q} {params.tables:q} "
        "--out {output.manifest:q} --summary {output.summary:q} > {log:q} 2>&1"


rule illumination:
    input:
        manifest=f"{DRESULTS}/manifest.parquet",
    output:
        directory(f"{DRESULTS}/illum/{{plate}}"),
    log:
        f"{DRESULTS}/logs/illumination/{{plate}}.log",
    benchmark:
        f"{DRESULTS}/benchmarks/illumination/{{plate}}.tsv"
    group:
        plate_group()
    conda:
        "../../envs/images.yaml"
    threads: threads_of("illumination")
    resources:
        **rule_resources("illumination"),
    params:
        downsample=dparam("illumination", "downsample"),
        median_size=dparam("illumination", "median_size"),
        robust_quantile=dparam("illumination", "robust_quantile"),
        min_sites=dparam("illumination", "min_sites"),
        max_ratio=dparam("illumination", "max_ratio"),
    shell:
        "phenoprofiler illumination {input.manifest:q} --plate {wildcards.plate:q} --out {output:q} "
        "--downsample {params.downsample:q} --median-size {params.median_size:q} "
        "--robust-quantile {params.robust_quantile:q} --min-sites {params.min_sites:q} "
        "--max-ratio {params.max_ratio:q} > {log:q} 2>&1"


rule tiles:
    input:
        manifest=f"{DRESULTS}/manifest.parquet",
        illum=illum_input,
    output:
        tiles=f"{DRESULTS}/tiles/{{plate}}.npy",
        sites=f"{DRESULTS}/tiles/{{plate}}.sites.parquet",
        rescale=f"{DRESULTS}/tiles/{{plate}}.rescale.json",
    log:
        f"{DRESULTS}/logs/tiles/{{plate}}.log",
    benchmark:
        f"{DRESULTS}/benchmarks/tiles/{{plate}}.tsv"
    group:
        plate_group()
    conda:
        "../../envs/images.yaml"
    # passed on as --threads: that many decode workers, each single-threaded inside (torch, BLAS);
    # measured peak (resident + written-file page cache) ~0.9 GB at 2 threads, flat in the plate size
    threads: threads_of("tiles")
    resources:
        **rule_resources("tiles"),
    params:
        illum=illum_arg,
        size=dparam("tiles", "size"),
        dtype=dparam("tiles", "dtype"),
        percentiles=dparam("tiles", "percentiles"),
        batch_size=dparam("tiles", "batch_size"),
    shell:
        "phenoprofiler tiles {input.manifest:q} --plate {wildcards.plate:q} --out {output.tiles:q} "
        "{params.illum:q} --size {params.size:q} --dtype {params.dtype:q} "
        "--percentiles {params.percentiles:q} --batch-size {params.batch_size:q} --threads {threads:q} "
        "> {log:q} 2>&1"
