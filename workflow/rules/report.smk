# Report stage: every evaluation and QC output of the run -> one self-contained HTML page.
#
# The page is flagged with report() so `snakemake --report` carries it too.  Training histories
# and benchmark files are read when present but not listed as inputs: the histories sit beside the
# checkpoints the embeddings already depend on, and the benchmark of a job is only complete after
# the job, so listing them would only add ordering without adding information.


rule report:
    input:
        unpack(report_inputs),
    output:
        report(
            f"{RESULTS}/report.html",
            caption="../report/benchmark_report.rst",
            category="Benchmark report",
        ),
    log:
        f"{RESULTS}/logs/report/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/report.tsv"
    localrule: is_local("report")
    conda:
        "../../envs/report.yaml"
    threads: threads_of("report")
    resources:
        **rule_resources("report"),
    # UMAP with a fixed random_state runs single-threaded (reproducible), so one core is enough.
    # bench/bench_report_scale.py: peak 0.7 GB at BBBC022 size, 0.9 GB and ~3 min at
    # JUMP-compound size (403,200 wells, 100,000 treatments, 4 sets; 2 busy cores).
    params:
        results_dir=lambda wildcards, output: os.path.dirname(output[0]),
        sets=FEATURE_SETS,
        title=config["report"]["title"] or f"PhenoProfiler benchmark: {config['dataset']}",
        umap_neighbors=config["report"]["umap_neighbors"],
        umap_min_dist=config["report"]["umap_min_dist"],
        umap_min_wells=config["report"]["umap_min_wells"],
        example_treatments=config["report"]["example_treatments"],
        table_rows=config["report"]["table_rows"],
        umap_max_wells=config["report"]["umap_max_wells"],
        qc_plates=config["report"]["qc_plates"],
        seed=config["seed"],
    shell:
        "phenoprofiler report --results-dir {params.results_dir:q} --sets {params.sets:q} "
        "--title {params.title:q} --out {output:q} "
        "--umap-neighbors {params.umap_neighbors:q} --umap-min-dist {params.umap_min_dist:q} "
        "--umap-min-wells {params.umap_min_wells:q} --example-treatments {params.example_treatments:q} "
        "--table-rows {params.table_rows:q} --umap-max-wells {params.umap_max_wells:q} "
        "--qc-plates {params.qc_plates:q} --seed {params.seed:q} > {log:q} 2>&1"
