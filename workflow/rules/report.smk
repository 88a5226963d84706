# Tables and figures, computed from the jobs' JSON outputs only.


rule report_tables:
    input:
        eval_cells(),
        bench_outputs(),
        gates=expand("results/gates/{model}/metrics.json", model=MODELS),
    output:
        tables=report(
            directory("results/tables"),
            patterns=["{name}.md"],
            caption="../report/tables.rst",
            category="Tables",
        ),
    log:
        "logs/report/tables.log",
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m trimkv report tables --eval-dir results/eval --gates-dir results/gates"
        " $( [ -d results/bench ] && echo --bench-dir results/bench ) --out {output.tables} 2> {log}"


rule report_figures:
    input:
        eval_cells(),
        gates=expand("results/gates/{model}/metrics.json", model=MODELS),
    output:
        figures=report(
            directory("results/figures/budget"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Accuracy vs budget",
        ),
    log:
        "logs/report/figures.log",
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m trimkv report figures --eval-dir results/eval --gates-dir results/gates --out {output.figures} 2> {log}"


rule report_retention:
    input:
        gates=lambda wc: f"results/gates/{config['report']['retention']['model']}/metrics.json",
        data=lambda wc: f"resources/data/{config['report']['retention']['benchmark']}/manifest.json",
    output:
        figures=report(
            directory("results/figures/retention"),
            patterns=["{name}.png"],
            caption="../report/retention.rst",
            category="Retention",
        ),
    log:
        "logs/report/retention.log",
    conda:
        "../../envs/report.yaml"
    params:
        model=lambda wc: f"results/gates/{config['report']['retention']['model']}",
        benchmark=lambda wc: config["report"]["retention"]["benchmark"],
        options=retention_options,
    shell:
        "python -m trimkv report retention --model {params.model} --benchmark {params.benchmark}"
        " --data-dir resources/data/{params.benchmark} {params.options} --out {output.figures} 2> {log}"
