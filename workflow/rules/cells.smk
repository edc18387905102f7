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
        # cells.save_masks: the nucleus label image of every site (<well>_s<site>.tiff)
        masks=(directory(f"{RESULTS}/cells/{{plate}}.masks") if config["cells"]["save_masks"] else []),
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
        illum=illum_arg,
        channels=CHANNELS,
        # a function, so the {plate}/{well}/{site} of locations_pattern are not taken for wildcards
        nuclei=lambda wildcards: nuclei_cli_args(config["cells"]),
        box_size=config["cells"]["box_size"],
        crop_size=config["cells"]["crop_size"],
        # crops get the same robust per-plate-and-channel rescale as the site tiles
        percentiles=config["tiles"]["percentiles"],
        seed=config["seed"],
        masks=lambda wildcards, output: (["--masks", output.masks] if config["cells"]["save_masks"] else []),
    shell:
        "phenoprofiler cells {input.manifest:q} --plate {wildcards.plate:q} "
        "--out {output.crops:q} --table {output.table:q} {params.illum:q} --channels {params.channels:q} "
        "{params.nuclei:q} --box-size {params.box_size:q} --crop-size {params.crop_size:q} "
        "--percentiles {params.percentiles:q} --seed {params.seed:q} --workers {threads:q} {params.masks:q} "
        "> {log:q} 2>&1"
