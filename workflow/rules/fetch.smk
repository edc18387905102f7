# Fetch stage: a dataset's images and metadata files from the Cell Painting Gallery (or any S3 bucket, or
# a local mirror), before its manifest.  Only for datasets with `fetch.activate: true`; their manifest
# waits for the fetch listing, which is written last.  When images.plates is empty the manifest (a
# checkpoint) finds the plates in the fetched images, in the same run.


rule fetch:
    output:
        f"{DRESULTS}/fetch/files.tsv",
    log:
        f"{DRESULTS}/logs/fetch.log",
    benchmark:
        f"{DRESULTS}/benchmarks/fetch/fetch.tsv"
    localrule: is_local("fetch")
    conda:
        "../../envs/images.yaml"
    threads: threads_of("fetch")
    resources:
        **rule_resources("fetch"),
    params:
        configfile=lambda wildcards: write_config_snapshot(wildcards.dataset),
        # the sections the download depends on: a change here refetches (already complete files are skipped)
        sections=lambda wildcards: {
            "fetch": dconfig(wildcards)["fetch"],
            "root": dconfig(wildcards)["images"]["root"],
            "plates": dconfig(wildcards)["images"]["plates"],
        },
    shell:
        "phenoprofiler fetch --configfile {params.configfile:q} --out {output:q} > {log:q} 2>&1"
