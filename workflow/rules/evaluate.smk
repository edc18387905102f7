# Per feature set: copairs activity / MoA-consistency mAP, FoE, both published MAP flavours and
# Recall@k (DESIGN.md §6); then one summary table over all sets for the report.


rule evaluate:
    input:
        selected=f"{RESULTS}/profiles/{{set}}/selected.parquet",
        consensus=f"{RESULTS}/profiles/{{set}}/consensus.parquet",
        same_wells=evaluate_same_wells_input,
    output:
        activity=f"{RESULTS}/eval/{{set}}/map_activity.parquet",
        consistency=f"{RESULTS}/eval/{{set}}/map_consistency.parquet",
        retrieval=f"{RESULTS}/eval/{{set}}/foe_map_recall.parquet",
        notes=f"{RESULTS}/eval/{{set}}/notes.json",
    log:
        f"{RESULTS}/logs/evaluate/{{set}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{set}}.tsv"
    wildcard_constraints:
        set="[^/]+",
    conda:
        "../../envs/profiles.yaml"
    threads: threads_of("evaluate")
    resources:
        **rule_resources("evaluate"),
    params:
        profiles=lambda wildcards: f"{RESULTS}/profiles/{wildcards.set}",
        out=lambda wildcards: f"{RESULTS}/eval/{wildcards.set}",
        same_wells=evaluate_same_wells_arg,
        level=lambda wildcards: ["--level", config["external"].get(wildcards.set, {}).get("level", "well")],
        null_size=config["evaluate"]["null_size"],
        threshold=config["evaluate"]["threshold"],
        seed=config["seed"],
        foe_percentile=config["evaluate"]["foe_percentile"],
        recall_percents=config["evaluate"]["recall_percents"],
        same_plate="--same-plate-negcon" if config["evaluate"]["same_plate_negcon"] else "",
        consensus=config["profiles"]["consensus"],
    shell:
        "phenoprofiler evaluate --profiles {params.profiles:q} --out {params.out:q} {params.level:q} {params.same_wells:q} "
        "--null-size {params.null_size:q} --threshold {params.threshold:q} --seed {params.seed:q} "
        "--foe-percentile {params.foe_percentile:q} --recall-percents {params.recall_percents:q} "
        "{params.same_plate:q} --consensus {params.consensus:q} > {log:q} 2>&1"


rule evaluate_summary:
    input:
        expand(f"{RESULTS}/eval/{{s}}/{{table}}.parquet", s=FEATURE_SETS, table=EVAL_TABLES),
        expand(f"{RESULTS}/eval/{{s}}/notes.json", s=FEATURE_SETS),
    output:
        f"{RESULTS}/eval/summary.parquet",
    log:
        f"{RESULTS}/logs/evaluate/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/summary.tsv"
    localrule: is_local("evaluate_summary")
    conda:
        "../../envs/profiles.yaml"
    threads: threads_of("evaluate_summary")
    resources:
        **rule_resources("evaluate_summary"),
    params:
        # one folder per set, derived from the inputs (eval/<set>/<table>.parquet)
        eval_dirs=lambda wildcards, input: sorted({os.path.dirname(p) for p in input}),
        threshold=config["evaluate"]["threshold"],
    shell:
        "phenoprofiler evaluate --summary {params.eval_dirs:q} --out {output:q} "
        "--threshold {params.threshold:q} > {log:q} 2>&1"
