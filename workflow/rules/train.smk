# Learned retention per base model, base model frozen, one trainer: TRIM-KV's gates (the paper's
# objective) and the learned baselines, LocRet's retaining heads and SeerAttention-R's AttnGates.


rule train_gates:
    input:
        base=base_model_input,
        data=train_data_input("gates"),
    output:
        config="results/gates/{model}/trimkv_config.json",
        metrics="results/gates/{model}/metrics.json",
    log:
        "logs/train/{model}.gates.log",
    benchmark:
        "benchmarks/train/{model}.gates.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=lambda wc: MODELS[wc.model]["gates"].get("gpus", 0),
        runtime=lambda wc: MODELS[wc.model]["gates"].get("runtime", 60),
    params:
        base=lambda wc: base_model(wc.model),
        data=train_data_files("gates"),
        spec=lambda wc: MODELS[wc.model]["gates"],
        options=lambda wc: cli_options(MODELS[wc.model]["gates"].get("options")),
    shell:
        "python -m trimkv train --method trimkv --model {params.base} --data {params.data}"
        " --out results/gates/{wildcards.model} --memory-size {params.spec[memory_size]}"
        " --max-length {params.spec[max_length]} --max-steps {params.spec[max_steps]} {params.options} 2> {log}"


rule train_locret:
    input:
        base=base_model_input,
        data=train_data_input("locret"),
    output:
        config="results/locret/{model}/locret_config.json",
        metrics="results/locret/{model}/metrics.json",
    log:
        "logs/train/{model}.locret.log",
    benchmark:
        "benchmarks/train/{model}.locret.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=lambda wc: MODELS[wc.model]["locret"].get("gpus", 0),
        runtime=lambda wc: MODELS[wc.model]["locret"].get("runtime", 60),
    params:
        base=lambda wc: base_model(wc.model),
        data=train_data_files("locret"),
        spec=lambda wc: MODELS[wc.model]["locret"],
        options=lambda wc: cli_options(MODELS[wc.model]["locret"].get("options")),
    shell:
        "python -m trimkv train --method locret --model {params.base} --data {params.data}"
        " --out results/locret/{wildcards.model} --memory-size {params.spec[memory_size]}"
        " --max-length {params.spec[max_length]} --max-steps {params.spec[max_steps]} {params.options} 2> {log}"


rule train_seerattn_r:
    input:
        base=base_model_input,
        data=train_data_input("seerattn_r"),
    output:
        config="results/seerattn_r/{model}/seer_config.json",
        metrics="results/seerattn_r/{model}/metrics.json",
    log:
        "logs/train/{model}.seerattn_r.log",
    benchmark:
        "benchmarks/train/{model}.seerattn_r.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=lambda wc: MODELS[wc.model]["seerattn_r"].get("gpus", 0),
        runtime=lambda wc: MODELS[wc.model]["seerattn_r"].get("runtime", 60),
    params:
        base=lambda wc: base_model(wc.model),
        data=train_data_files("seerattn_r"),
        spec=lambda wc: MODELS[wc.model]["seerattn_r"],
        options=lambda wc: cli_options(MODELS[wc.model]["seerattn_r"].get("options")),
    shell:
        "python -m trimkv train --method seerattn_r --model {params.base} --data {params.data}"
        " --out results/seerattn_r/{wildcards.model} --memory-size {params.spec[memory_size]}"
        " --max-length {params.spec[max_length]} --max-steps {params.spec[max_steps]} {params.options} 2> {log}"
