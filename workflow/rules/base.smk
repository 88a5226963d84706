# Offline preset only: the tiny base model, pretrained from scratch on the synthetic task.


rule synthetic_base:
    input:
        "resources/data/synthetic/manifest.json",
    output:
        config="results/base/synthetic/config.json",
        metrics="results/base/synthetic/metrics.json",
    log:
        "logs/base/synthetic.log",
    benchmark:
        "benchmarks/base/synthetic.tsv"
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=0,
        runtime=60,
    params:
        options=lambda wc: cli_options(config["synthetic"]["pretrain"]),
    shell:
        "python -m trimkv synthetic pretrain --data resources/data/synthetic --out results/base/synthetic --quiet"
        " {params.options} 2> {log}"
