# Fetch stage: a dataset's images (and plate maps) from the Cell Painting Gallery, before the manifest.
# Only active with `fetch.activate: true`; then the manifest depends on the fetch listing (FETCH_LISTING).
# Plates come from images.plates, so planning needs no images on disk; with no plates listed the first
# run plans the fetch alone (common.smk: fetch_pending) and the next one finds the plates in the images.


# What the manifest waits for (images.smk: `fetched=FETCH_LISTING`): the fetch listing, written last, or
# nothing when fetching is off (images already on disk).
FETCH_LISTING = [f"{RESULTS}/fetch/files.tsv"] if config["fetch"]["activate"] else []


rule fetch:
    output:
        f"{RESULTS}/fetch/files.tsv",
    log:
        f"{RESULTS}/logs/fetch.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch/fetch.tsv"
    conda:
        "../../envs/images.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=720,
    params:
        configfile=lambda wildcards: write_config_snapshot(),
        # the sections the download depends on: a change here refetches (already complete files are skipped)
        sections=lambda wildcards: {
            "fetch": config["fetch"],
            "root": config["images"]["root"],
            "plates": config["images"]["plates"],
        },
    shell:
        "phenoprofiler fetch --configfile {params.configfile:q} --out {output:q} > {log:q} 2>&1"
