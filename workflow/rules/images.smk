# Image stage: manifest -> illumination functions -> site tiles at model size.


rule manifest:
    input:
        fetched=FETCH_LISTING,
    output:
        manifest=f"{RESULTS}/manifest.parquet",
        # counts, dropped wells/images and warnings, for the report
        summary=f"{RESULTS}/manifest.summary.json",
    log:
        f"{RESULTS}/logs/manifest.log",
    benchmark:
        f"{RESULTS}/benchmarks/manifest/manifest.tsv"
    conda:
        "../../envs/images.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        configfile=lambda wildcards: write_config_snapshot(),
        # the sections the manifest depends on: a change here reruns it (and only then)
        sections=lambda wildcards: {k: config[k] for k in ("channels", "images", "metadata")},
        # the manifest checks controls against the normalization scope (plate scope: every plate)
        control_scope=config["profiles"].get("normalize_scope", "auto"),
    shell:
        "phenoprofiler manifest --configfile {params.configfile:q} --out {output.manifest:q} "
        "--summary {output.summary:q} > {log:q} 2>&1"


rule illumination:
    input:
        manifest=f"{RESULTS}/manifest.parquet",
    output:
        directory(f"{RESULTS}/illum/{{plate}}"),
    log:
        f"{RESULTS}/logs/illumination/{{plate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/illumination/{{plate}}.tsv"
    conda:
        "../../envs/images.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        downsample=config["illumination"]["downsample"],
        median_size=config["illumination"]["median_size"],
        robust_quantile=config["illumination"]["robust_quantile"],
        min_sites=config["illumination"]["min_sites"],
        max_ratio=config["illumination"]["max_ratio"],
    shell:
        "phenoprofiler illumination {input.manifest:q} --plate {wildcards.plate:q} --out {output:q} "
        "--downsample {params.downsample:q} --median-size {params.median_size:q} "
        "--robust-quantile {params.robust_quantile:q} --min-sites {params.min_sites:q} "
        "--max-ratio {params.max_ratio:q} > {log:q} 2>&1"


rule tiles:
    input:
        manifest=f"{RESULTS}/manifest.parquet",
        illum=illum_input,
    output:
        tiles=f"{RESULTS}/tiles/{{plate}}.npy",
        sites=f"{RESULTS}/tiles/{{plate}}.sites.parquet",
        rescale=f"{RESULTS}/tiles/{{plate}}.rescale.json",
    log:
        f"{RESULTS}/logs/tiles/{{plate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tiles/{{plate}}.tsv"
    conda:
        "../../envs/images.yaml"
    # passed on as --threads: that many decode workers, each single-threaded inside (torch, BLAS)
    threads: 2
    resources:
        # measured peak (resident + written-file page cache) ~0.9 GB at 2 threads, flat in the plate size
        mem_mb=2000,
        runtime=120,
    params:
        illum=illum_arg,
        size=config["tiles"]["size"],
        dtype=config["tiles"]["dtype"],
        percentiles=config["tiles"]["percentiles"],
        batch_size=config["tiles"]["batch_size"],
    shell:
        "phenoprofiler tiles {input.manifest:q} --plate {wildcards.plate:q} --out {output.tiles:q} "
        "{params.illum:q} --size {params.size:q} --dtype {params.dtype:q} "
        "--percentiles {params.percentiles:q} --batch-size {params.batch_size:q} --threads {threads:q} "
        "> {log:q} 2>&1"
