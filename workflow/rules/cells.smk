# Single-cell path: nuclei (segmented from the DNA channel, or given centres) -> single-cell crops.
# Only built when config cells.activate is true.
from phenoprofiler_core.cells import nuclei_cli_args


rule cells:
    input:
        manifest=f"{DRESULTS}/manifest.parquet",
        illum=illum_input,
    output:
        crops=f"{DRESULTS}/cells/{{plate}}.npy",
        table=f"{DRESULTS}/cells/{{plate}}.cells.parquet",
        # cells.save_masks: the nucleus label image of every site (<well>_s<site>.tiff)
        masks=(directory(f"{DRESULTS}/cells/{{plate}}.masks") if config["cells"]["save_masks"] else []),
    log:
        f"{DRESULTS}/logs/cells/{{plate}}.log",
    benchmark:
        f"{DRESULTS}/benchmarks/cells/{{plate}}.tsv"
    group:
        plate_group()
    conda:
        "../../envs/cells.yaml"
    threads: threads_of("cells")
    resources:
        **rule_resources("cells"),
    params:
        illum=illum_arg,
        channels=CHANNELS,
        # a function, so the {plate}/{well}/{site} of locations_pattern are not taken for wildcards
        nuclei=lambda wildcards: nuclei_cli_args(dconfig(wildcards)["cells"]),
        box_size=dparam("cells", "box_size"),
        crop_size=dparam("cells", "crop_size"),
        # crops get the same robust per-plate-and-channel rescale as the site tiles
        percentiles=dparam("tiles", "percentiles"),
        seed=dparam("seed"),
        masks=lambda wildcards, output: (["--masks", output.masks] if config["cells"]["save_masks"] else []),
    shell:
        "phenoprofiler cells {input.manifest:q} --plate {wildcards.plate:q} "
        "--out {output.crops:q} --table {output.table:q} {params.illum:q} --channels {params.channels:q} "
        "{params.nuclei:q} --box-size {params.box_size:q} --crop-size {params.crop_size:q} "
        "--percentiles {params.percentiles:q} --seed {params.seed:q} --workers {threads:q} {params.masks:q} "
        "> {log:q} 2>&1"
