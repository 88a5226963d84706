# One local job imports every job's metrics.json / params.json into MLflow: the only writer of the DB.


localrules:
    track,


rule track:
    input:
        eval_cells(),
        tables="results/tables",
        figures="results/figures/budget",
        retention=retention_outputs(),
    output:
        db="results/mlflow.db",
    log:
        "logs/tracking/track.log",
    conda:
        "../../envs/report.yaml"
    params:
        experiment=config.get("tracking", {}).get(
            "experiment", f"trimkv-{config['preset']}"
        ),
        config_hash=config_hash(),
    shell:
        "python -m trimkv track --results results --db {output.db} --experiment {params.experiment}"
        " --config-hash {params.config_hash} --tables {input.tables} --figures results/figures 2> {log}"
