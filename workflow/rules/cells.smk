# Single-cell path: nuclei (segmented from the DNA channel, or given centres) -> single-cell crops.
# Only built when config cells.activate is true.
from phenoprofiler_core.cells import nuclei_cli_args


rule cells:
    input:
        manifest=f"{RESULTS}/manifest.parquet",
        illum=illum_input,
    output:
        crops=f"{RESULTS}/cells/{{plate}}.npy",
        table=f"{RESULTS}/cells/{{plate}}.cells.parquet",
    log:
        f"{RESULTS}/logs/cells/{{plate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cells/{{plate}}.tsv"
    conda:
        "../../envs/cells.yaml"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    params:
        illum=lambda wildcards, input: f"--illum {input.illum}" if input.illum else "",
        channels=" ".join(CHANNELS),
        # a function, so the {plate}/{well}/{site} of locations_pattern are not taken for wildcards
        nuclei=lambda wildcards: nuclei_cli_args(config["cells"]),
        box_size=config["cells"]["box_size"],
        crop_size=config["cells"]["crop_size"],
        # crops get the same robust per-plate-and-channel rescale as the site tiles
        percentiles=" ".join(str(p) for p in config["tiles"]["percentiles"]),
        seed=config["seed"],
    shell:
        "phenoprofiler cells {input.manifest} --plate {wildcards.plate} "
        "--out {output.crops} --table {output.table} {params.illum} --channels {params.channels} "
        "{params.nuclei} --box-size {params.box_size} --crop-size {params.crop_size} "
        "--percentiles {params.percentiles} --seed {params.seed} --workers {threads} > {log} 2>&1"
