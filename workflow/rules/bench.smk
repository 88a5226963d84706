# The paper's Table 5: decode throughput with the bounded cache, on random weights of an architecture
# (python -m trimkv bench decode --help). One GPU job; its results/bench/<architecture>/metrics.json
# fills the report's throughput and peak-memory tables. Only where the config has a `bench` section.


rule bench_decode:
    output:
        metrics="results/bench/{architecture}/metrics.json",
    log:
        "logs/bench/{architecture}.log",
    conda:
        "../../envs/eval.yaml"
    resources:
        gpu=1,
        runtime=lambda wc: config["bench"].get("runtime", 60),
    params:
        spec=lambda wc: config["bench"],
        settings=lambda wc: " ".join(config["bench"]["settings"]),
        policies=lambda wc: " ".join(config["bench"]["policies"]),
    shell:
        "python -m trimkv bench decode --architecture {wildcards.architecture} --settings {params.settings}"
        " --policies {params.policies} --memory-size {params.spec[memory_size]}"
        " --generate {params.spec[new_tokens]} --out {output.metrics} > {log} 2>&1"
