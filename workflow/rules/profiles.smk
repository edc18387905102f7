# Per feature set: site features of every plate -> well, normalized, selected and consensus profiles
# (pycytominer), with the PhenoProfiler phenotype correction on learned embedding sets.  An external
# profile table (config `external:`) enters at the well (or treatment) step instead of site features.
rule profiles:
    input:
        unpack(profiles_input),
    output:
        well=f"{RESULTS}/profiles/{{set}}/well.parquet",
        normalized=f"{RESULTS}/profiles/{{set}}/normalized.parquet",
        selected=f"{RESULTS}/profiles/{{set}}/selected.parquet",
        consensus=f"{RESULTS}/profiles/{{set}}/consensus.parquet",
        normalization=f"{RESULTS}/profiles/{{set}}/normalization.json",
    log:
        f"{RESULTS}/logs/profiles/{{set}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/profiles/{{set}}.tsv"
    wildcard_constraints:
        set="[^/]+",
    conda:
        "../../envs/profiles.yaml"
    threads: threads_of("profiles")
    resources:
        **rule_resources("profiles"),
    params:
        source=profiles_source_args,
        out=lambda wildcards: f"{RESULTS}/profiles/{wildcards.set}",
        alpha=profiles_correction_alpha,
        aggregate=config["profiles"]["aggregate"],
        normalize=config["profiles"]["normalize"],
        scope=config["profiles"]["normalize_scope"],
        batch=profiles_batch_arg,
        min_controls=config["profiles"]["min_controls_per_plate"],
        mad_epsilon=config["profiles"]["mad_epsilon"],
        spherize_method=config["profiles"]["spherize_method"],
        spherize_epsilon=config["profiles"]["spherize_epsilon"],
        feature_select=config["profiles"]["feature_select"],
        na_cutoff=config["profiles"]["na_cutoff"],
        corr_threshold=config["profiles"]["corr_threshold"],
        min_variance=config["profiles"]["min_variance"],
        freq_cut=config["profiles"]["freq_cut"],
        unique_cut=config["profiles"]["unique_cut"],
        outlier_cutoff=config["profiles"]["outlier_cutoff"],
        consensus=config["profiles"]["consensus"],
    shell:
        "phenoprofiler profiles {params.source:q} --out {params.out:q} "
        "--correction-alpha {params.alpha:q} --aggregate {params.aggregate:q} --normalize {params.normalize:q} "
        "--normalize-scope {params.scope:q} {params.batch:q} --min-controls-per-plate {params.min_controls:q} "
        "--mad-epsilon {params.mad_epsilon:q} --spherize-method {params.spherize_method:q} "
        "--spherize-epsilon {params.spherize_epsilon:q} --feature-select {params.feature_select:q} "
        "--na-cutoff {params.na_cutoff:q} --corr-threshold {params.corr_threshold:q} "
        "--min-variance {params.min_variance:q} --freq-cut {params.freq_cut:q} "
        "--unique-cut {params.unique_cut:q} --outlier-cutoff {params.outlier_cutoff:q} "
        "--consensus {params.consensus:q} > {log:q} 2>&1"
