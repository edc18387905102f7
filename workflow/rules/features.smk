# Hand-crafted ("classic") CellProfiler-like features per site, from the full-resolution corrected images.
# Nucleus settings come from config section `cells` (shared with the single-cell crops).
from phenoprofiler_core.cells import nuclei_cli_args


rule classic:
    input:
        manifest=f"{RESULTS}/manifest.parquet",
        illum=illum_input,
    output:
        f"{RESULTS}/features/classic/{{plate}}.parquet",
    log:
        f"{RESULTS}/logs/classic/{{plate}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/classic/{{plate}}.tsv"
    conda:
        "../../envs/cells.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    params:
        illum=lambda wildcards, input: f"--illum {input.illum}" if input.illum else "",
        channels=" ".join(CHANNELS),
        # a function, so the {plate}/{well}/{site} of locations_pattern are not taken for wildcards
        nuclei=lambda wildcards: nuclei_cli_args(config["cells"]),
        # '' tells the CLI to grow cells into the mean of the non-nucleus channels
        cell_channel=config["classic"]["cell_channel"] or "''",
        cell_sigma=config["classic"]["cell_sigma"],
        cell_threshold_factor=config["classic"]["cell_threshold_factor"],
        max_expansion=config["classic"]["max_expansion"],
        texture_levels=config["classic"]["texture_levels"],
        texture_distance=config["classic"]["texture_distance"],
    shell:
        "phenoprofiler classic {input.manifest} --plate {wildcards.plate} --out {output} "
        "{params.illum} --channels {params.channels} {params.nuclei} "
        "--cell-channel {params.cell_channel} --cell-sigma {params.cell_sigma} "
        "--cell-threshold-factor {params.cell_threshold_factor} --max-expansion {params.max_expansion} "
        "--texture-levels {params.texture_levels} --texture-distance {params.texture_distance} "
        "--workers {threads} > {log} 2>&1"
