# Report stage: every evaluation and QC output of the run -> one self-contained HTML page.
#
# The page is flagged with report() so `snakemake --report` carries it too.  Training histories
# and benchmark files are read when present but not listed as inputs: the histories sit beside the
# checkpoints the embeddings already depend on, and the benchmark of a job is only complete after
# the job, so listing them would only add ordering without adding information.


def report_inputs(wildcards):
    """What the report summarises; QC inputs are listed so a changed plate re-renders the page."""
    inputs = {
        "manifest": f"{RESULTS}/manifest.parquet",
        "summary": f"{RESULTS}/eval/summary.parquet",
        "activity": expand(f"{RESULTS}/eval/{{set}}/map_activity.parquet", set=FEATURE_SETS),
        "profiles": expand(f"{RESULTS}/profiles/{{set}}/normalized.parquet", set=FEATURE_SETS),
        "tiles": expand(f"{RESULTS}/tiles/{{plate}}.npy", plate=PLATES),
    }
    if config["illumination"]["activate"]:
        inputs["illum"] = expand(f"{RESULTS}/illum/{{plate}}", plate=PLATES)
    if "classic" in FEATURE_SETS:
        inputs["counts"] = expand(f"{RESULTS}/features/classic/{{plate}}.parquet", plate=PLATES)
    return inputs


rule report:
    input:
        unpack(report_inputs),
    output:
        report(
            f"{RESULTS}/report.html",
            caption="../report/benchmark_report.rst",
            category="Benchmark report",
        ),
    params:
        results_dir=RESULTS,
        sets=FEATURE_SETS,
        # empty = the default title naming the dataset (the CLI treats "" as not given)
        title=config["report"]["title"] or "",
        umap_neighbors=config["report"]["umap_neighbors"],
        umap_min_dist=config["report"]["umap_min_dist"],
        umap_min_wells=config["report"]["umap_min_wells"],
        example_treatments=config["report"]["example_treatments"],
        table_rows=config["report"]["table_rows"],
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/report/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/report.tsv"
    # UMAP with a fixed random_state runs single-threaded (reproducible), so one core is enough.
    threads: 1
    conda:
        "../../envs/report.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "phenoprofiler report --results-dir {params.results_dir} --sets {params.sets:q} "
        "--title {params.title:q} --out {output} "
        "--umap-neighbors {params.umap_neighbors} --umap-min-dist {params.umap_min_dist} "
        "--umap-min-wells {params.umap_min_wells} --example-treatments {params.example_treatments} "
        "--table-rows {params.table_rows} --seed {params.seed} > {log} 2>&1"
