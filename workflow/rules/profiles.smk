# Per feature set: site features of every plate -> well, normalized, selected and consensus profiles
# (pycytominer), with the PhenoProfiler phenotype correction on learned embedding sets.


rule profiles:
    input:
        features=expand(f"{RESULTS}/features/{{{{set}}}}/{{plate}}.parquet", plate=PLATES),
    output:
        well=f"{RESULTS}/profiles/{{set}}/well.parquet",
        normalized=f"{RESULTS}/profiles/{{set}}/normalized.parquet",
        selected=f"{RESULTS}/profiles/{{set}}/selected.parquet",
        consensus=f"{RESULTS}/profiles/{{set}}/consensus.parquet",
    log:
        f"{RESULTS}/logs/profiles/{{set}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/profiles/{{set}}.tsv"
    wildcard_constraints:
        set="[^/]+",
    conda:
        "../../envs/profiles.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        out=lambda wildcards: f"{RESULTS}/profiles/{wildcards.set}",
        alpha=profiles_correction_alpha,
        aggregate=config["profiles"]["aggregate"],
        normalize=config["profiles"]["normalize"],
        mad_epsilon=config["profiles"]["mad_epsilon"],
        spherize_method=config["profiles"]["spherize_method"],
        spherize_epsilon=config["profiles"]["spherize_epsilon"],
        feature_select=config["profiles"]["feature_select"],
        na_cutoff=config["profiles"]["na_cutoff"],
        corr_threshold=config["profiles"]["corr_threshold"],
        freq_cut=config["profiles"]["freq_cut"],
        unique_cut=config["profiles"]["unique_cut"],
        outlier_cutoff=config["profiles"]["outlier_cutoff"],
        consensus=config["profiles"]["consensus"],
    shell:
        "phenoprofiler profiles --features {input.features:q} --out {params.out:q} "
        "--correction-alpha {params.alpha:q} --aggregate {params.aggregate:q} --normalize {params.normalize:q} "
        "--mad-epsilon {params.mad_epsilon:q} --spherize-method {params.spherize_method:q} "
        "--spherize-epsilon {params.spherize_epsilon:q} --feature-select {params.feature_select:q} "
        "--na-cutoff {params.na_cutoff:q} --corr-threshold {params.corr_threshold:q} --freq-cut {params.freq_cut:q} "
        "--unique-cut {params.unique_cut:q} --outlier-cutoff {params.outlier_cutoff:q} "
        "--consensus {params.consensus:q} > {log:q} 2>&1"
