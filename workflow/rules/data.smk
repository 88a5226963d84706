# Data: Hub datasets at pinned revisions (paper preset), and the synthetic task (offline preset).


rule fetch_dataset:
    output:
        manifest="resources/data/{dataset}/manifest.json",
    log:
        "logs/data/{dataset}.log",
    wildcard_constraints:
        dataset="(?!synthetic$)[A-Za-z0-9_.-]+",
    conda:
        "../../envs/data.yaml"
    params:
        revision=lambda wc: config["datasets"][wc.dataset].get("revision") or "",
    shell:
        "python -m trimkv data fetch {wildcards.dataset} --out resources/data/{wildcards.dataset}"
        " $( [ -n '{params.revision}' ] && echo --revision {params.revision} ) 2> {log}"
        " && python -m trimkv data verify resources/data/{wildcards.dataset} 2>> {log}"


rule synthetic_task:
    output:
        manifest="resources/data/synthetic/manifest.json",
        train="resources/data/synthetic/train.jsonl",
        test="resources/data/synthetic/test.jsonl",
    log:
        "logs/data/synthetic.log",
    conda:
        "../../envs/train.yaml"
    params:
        task=lambda wc: cli_options(config["synthetic"]["task"]),
        splits=lambda wc: cli_options(config["synthetic"]["splits"]),
    shell:
        "python -m trimkv synthetic generate --out resources/data/synthetic {params.task} {params.splits} 2> {log}"
