# One cell of the paper's tables: a model x benchmark x policy x budget.


rule evaluate:
    input:
        model=eval_model_input,
        data=eval_data,
    output:
        metrics="results/eval/{model}/{benchmark}/{policy}/{budget}/metrics.json",
    log:
        "logs/eval/{model}/{benchmark}/{policy}/{budget}.log",
    benchmark:
        "benchmarks/eval/{model}/{benchmark}/{policy}/{budget}.tsv"
    wildcard_constraints:
        budget="full|[0-9]+",
    conda:
        "../../envs/eval.yaml"
    resources:
        gpu=lambda wc: config.get("eval_gpus", 0),
        runtime=lambda wc: BENCHMARKS[wc.benchmark].get("runtime", 60),
    params:
        model=eval_model,
        revision=eval_revision,
        budget=lambda wc: "" if wc.budget == "full" else f"--budget {wc.budget}",
        options=lambda wc: eval_options(wc.benchmark),
    shell:
        "python -m trimkv eval --model {params.model} --benchmark {wildcards.benchmark}"
        " --data-dir resources/data/{wildcards.benchmark} --policy {wildcards.policy} {params.budget}"
        " --out results/eval/{wildcards.model}/{wildcards.benchmark}/{wildcards.policy}/{wildcards.budget}"
        " --no-progress {params.options} {params.revision} 2> {log}"
