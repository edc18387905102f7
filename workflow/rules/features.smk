# Hand-crafted ("classic") CellProfiler-like features per site, from the full-resolution corrected images.
# Nucleus settings come from config section `cells` (shared with the single-cell crops).
from phenoprofiler_core.cells import nuclei_cli_args


rule classic:
    input:
        manifest=f"{DRESULTS}/manifest.parquet",
        illum=illum_input,
    output:
        f"{DRESULTS}/features/classic/{{plate}}.parquet",
    log:
        f"{DRESULTS}/logs/classic/{{plate}}.log",
    benchmark:
        f"{DRESULTS}/benchmarks/classic/{{plate}}.tsv"
    group:
        plate_group()
    conda:
        "../../envs/cells.yaml"
    threads: threads_of("classic")
    resources:
        **rule_resources("classic"),
    params:
        illum=illum_arg,
        channels=CHANNELS,
        # a function, so the {plate}/{well}/{site} of locations_pattern are not taken for wildcards
        nuclei=lambda wildcards: nuclei_cli_args(dconfig(wildcards)["cells"]),
        # one argument; an empty value tells the CLI to grow cells into the mean of the non-nucleus channels
        cell_channel=lambda wildcards: f"--cell-channel={dconfig(wildcards)['classic']['cell_channel'] or ''}",
        cell_sigma=dparam("classic", "cell_sigma"),
        cell_threshold_factor=dparam("classic", "cell_threshold_factor"),
        max_expansion=dparam("classic", "max_expansion"),
        texture_levels=dparam("classic", "texture_levels"),
        texture_distance=dparam("classic", "texture_distance"),
    shell:
        "phenoprofiler classic {input.manifest:q} --plate {wildcards.plate:q} --out {output:q} "
        "{params.illum:q} --channels {params.channels:q} {params.nuclei:q} "
        "{params.cell_channel:q} --cell-sigma {params.cell_sigma:q} "
        "--cell-threshold-factor {params.cell_threshold_factor:q} --max-expansion {params.max_expansion:q} "
        "--texture-levels {params.texture_levels:q} --texture-distance {params.texture_distance:q} "
        "--workers {threads:q} > {log:q} 2>&1"
