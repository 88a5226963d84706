# Learned retention per base model, base model frozen, one trainer: TRIM-KV's gates (the paper's
# objective) and the learned baselines, LocRet's retaining heads and SeerAttention-R's AttnGates.
# {section} is the config section and results directory: gates, locret, seerattn_r (LEARNED_SECTIONS).
#
# Each seed in models.<model>.<section>.seeds trains its own run; with several, every run is evaluated on
# the validation split of models.<model>.select and the best is kept (python -m trimkv select --help).
# The kept run is copied to results/<section>/<model>/, which evaluation and the report read.


rule train:
    input:
        base=base_model_input,
        data=train_data_input,
    output:
        metrics="results/{section}/{model}/seeds/{seed}/metrics.json",
    log:
        "logs/train/{model}.{section}.seed{seed}.log",
    benchmark:
        "benchmarks/train/{model}.{section}.seed{seed}.tsv"
    wildcard_constraints:
        section=SECTION_PATTERN,
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=lambda wc: MODELS[wc.model][wc.section].get("gpus", 0),
        runtime=lambda wc: MODELS[wc.model][wc.section].get("runtime", 60),
    params:
        launcher=train_launcher,
        method=lambda wc: LEARNED_SECTIONS[wc.section],
        base=lambda wc: base_model(wc.model),
        data=train_data_files,
        spec=lambda wc: MODELS[wc.model][wc.section],
        options=lambda wc: cli_options(train_options(wc.model, wc.section)),
    shell:
        "{params.launcher} -m trimkv train --method {params.method} --model {params.base} --data {params.data}"
        " --out results/{wildcards.section}/{wildcards.model}/seeds/{wildcards.seed} --seed {wildcards.seed}"
        " --memory-size {params.spec[memory_size]} --max-length {params.spec[max_length]}"
        " --max-steps {params.spec[max_steps]} {params.options} 2> {log}"


rule validate:
    input:
        run="results/{section}/{model}/seeds/{seed}/metrics.json",
        data=lambda wc: f"{dataset_dir(MODELS[wc.model]['select']['benchmark'])}/manifest.json",
    output:
        metrics="results/select/{model}/{section}/{seed}/metrics.json",
    log:
        "logs/select/{model}/{section}/{seed}.log",
    wildcard_constraints:
        section=SECTION_PATTERN,
    conda:
        "../../envs/eval.yaml"
    resources:
        gpu=lambda wc: config.get("eval_gpus", 0),
    params:
        policy=lambda wc: LEARNED_SECTIONS[wc.section],
        spec=lambda wc: MODELS[wc.model]["select"],
        options=lambda wc: eval_options(MODELS[wc.model]["select"]["benchmark"]),
    shell:
        "python -m trimkv eval --model results/{wildcards.section}/{wildcards.model}/seeds/{wildcards.seed}"
        " --benchmark {params.spec[benchmark]} --subset {params.spec[subset]}"
        " --data-dir resources/data/{params.spec[benchmark]} --policy {params.policy} --budget {params.spec[budget]}"
        " --out results/select/{wildcards.model}/{wildcards.section}/{wildcards.seed} --no-progress"
        " {params.options} 2> {log}"


rule select:
    input:
        runs=lambda wc: [
            f"{run}/metrics.json" for run in seed_runs(wc.model, wc.section)
        ],
        scores=lambda wc: validation_scores(wc.model, wc.section),
    output:
        metrics="results/{section}/{model}/metrics.json",
        selection="results/{section}/{model}/selection.json",
    log:
        "logs/select/{model}/{section}.log",
    wildcard_constraints:
        section=SECTION_PATTERN,
    conda:
        "../../envs/train.yaml"
    params:
        runs=lambda wc: seed_runs(wc.model, wc.section),
    shell:
        "python -m trimkv select --runs {params.runs} --scores {input.scores}"
        " --out results/{wildcards.section}/{wildcards.model} > {log} 2>&1"
