# Retention gates per base model: the paper's objective, base model frozen.


rule train_gates:
    input:
        base=base_model_input,
        data=train_data_input,
    output:
        gates="results/gates/{model}/trimkv_config.json",
        metrics="results/gates/{model}/metrics.json",
    log:
        "logs/train/{model}.log",
    benchmark:
        "benchmarks/train/{model}.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=lambda wc: MODELS[wc.model]["gates"].get("gpus", 0),
        runtime=lambda wc: MODELS[wc.model]["gates"].get("runtime", 60),
    params:
        base=lambda wc: base_model(wc.model),
        data=train_data_files,
        gates=lambda wc: MODELS[wc.model]["gates"],
        options=lambda wc: cli_options(MODELS[wc.model]["gates"].get("options")),
    shell:
        "python -m trimkv train --model {params.base} --data {params.data} --out results/gates/{wildcards.model}"
        " --memory-size {params.gates[memory_size]} --max-length {params.gates[max_length]}"
        " --max-steps {params.gates[max_steps]} {params.options} 2> {log}"
