# Config validation first (a bad config fails before any job starts), then the input functions.
import argparse

from snakemake.logging import logger
from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

MODELS = config["models"]
BENCHMARKS = config["benchmarks"]
POLICIES = config["policies"]
UNBOUNDED = {"full"}  # policies evaluated once, without a budget
# Learned retention: config section (= results/<section>/) -> the policy that evaluates it (= the
# trainer's --method). The learned baselines need a models.<model>.<policy> section when in `policies`.
LEARNED_SECTIONS = {"gates": "trimkv", "locret": "locret", "seerattn_r": "seerattn_r"}
SECTION_PATTERN = "|".join(LEARNED_SECTIONS)
# The policies that load a training run; the rest evaluate the base model itself.
LEARNED_POLICIES = set(LEARNED_SECTIONS.values())
LEARNED = [
    s for s in LEARNED_SECTIONS if s != "gates"
]  # the baselines' sections, named as their policies


wildcard_constraints:
    model="[^/]+",
    seed="[0-9]+",


def _check_names():
    for name, bench in BENCHMARKS.items():
        for model in bench.get("models") or []:
            if model not in MODELS:
                raise ValueError(
                    f"config: benchmarks.{name}.models: unknown model {model!r}; models: {sorted(MODELS)}"
                )
    retention = config.get("report", {}).get("retention")
    if retention and retention["model"] not in MODELS:
        raise ValueError(
            f"config: report.retention.model: unknown model {retention['model']!r}"
        )
    for name, model in MODELS.items():
        for policy in LEARNED:
            if policy in POLICIES and policy not in model:
                raise ValueError(
                    f"config: models.{name}.{policy} is required when policies include {policy}"
                )
        for section in LEARNED_SECTIONS:
            spec = model.get(section, {})
            if spec.get("seeds") and "seed" in (spec.get("options") or {}):
                raise ValueError(
                    f"config: models.{name}.{section}: give seeds or options.seed, not both"
                )
            if len(spec.get("seeds") or []) > 1 and "select" not in model:
                raise ValueError(
                    f"config: models.{name}.{section}.seeds: several seeds need models.{name}.select"
                    " (the benchmark, split and budget that choose among them)"
                )
            for dataset in spec.get("data", []):
                if dataset != "synthetic" and dataset not in config.get("datasets", {}):
                    raise ValueError(
                        f"config: models.{name}.{section}.data: {dataset!r} is not in datasets"
                    )


_check_names()


def cli_flag(key: str) -> str:
    """An options key as the flag it becomes: grad_accum -> --grad-accum."""
    return f"--{key.replace('_', '-')}"


def _check_flags():
    """Every key of an options block must be a flag of the command it feeds, so that a typo fails here and not
    when that job starts, hours into a run. Only in the main process (each job reads the Snakefile again) and
    only where trimkv imports (a bare Snakemake env, its jobs in conda envs, checks nothing).
    """
    if not workflow.is_main_process:
        return
    try:
        from trimkv.cli import build_parser
    except ImportError as e:
        logger.warning(f"options blocks not checked against the CLI: {e}")
        return

    cli = build_parser()

    def flags(*command):
        parser = cli
        for name in command:
            sub = next(
                a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            )
            parser = sub.choices[name]
        return {s for a in parser._actions for s in a.option_strings}

    synthetic = config.get("synthetic", {})
    blocks = {
        ("synthetic", "generate"): {"synthetic.task": synthetic.get("task")},
        ("synthetic", "pretrain"): {"synthetic.pretrain": synthetic.get("pretrain")},
        ("train",): {
            f"models.{name}.{section}.options": model[section].get("options")
            for name, model in MODELS.items()
            for section in LEARNED_SECTIONS
            if section in model
        },
        ("eval",): {"eval": config.get("eval")}
        | {
            f"benchmarks.{b}.options": spec.get("options")
            for b, spec in BENCHMARKS.items()
        },
    }
    for command, options in blocks.items():
        known = flags(*command)
        for where, block in options.items():
            for key in block or {}:
                flag = cli_flag(key)
                if flag not in known:
                    raise ValueError(
                        f"config: {where}.{key}: `python -m trimkv {' '.join(command)}` has no flag"
                        f" {flag} (see its --help)"
                    )


_check_flags()


def cli_options(options: dict) -> str:
    """{"lr": 1e-3, "pack": True} -> "--lr 0.001 --pack": config dicts become CLI flags."""
    flags = []
    for key, value in (options or {}).items():
        flag = cli_flag(key)
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            values = value if isinstance(value, list) else [value]
            flags.append(f"{flag} {' '.join(str(v) for v in values)}")
    return " ".join(flags)


def eval_options(benchmark: str) -> str:
    """The flags of an evaluation job: the eval section's, then the benchmark's own options."""
    return cli_options(
        {**config.get("eval", {}), **BENCHMARKS.get(benchmark, {}).get("options", {})}
    )


def base_model(model: str) -> str:
    """The base model to load: the pipeline's own tiny model, or a Hub id."""
    base = MODELS[model]["base"]
    return "results/base/synthetic" if base == "synthetic" else base


def base_model_input(wildcards):
    return (
        ["results/base/synthetic/config.json"]
        if MODELS[wildcards.model]["base"] == "synthetic"
        else []
    )


def dataset_dir(name: str) -> str:
    return f"resources/data/{name}"


def train_data_input(wildcards) -> list[str]:
    """Input function: the manifests of the datasets models.<model>.<section> trains on."""
    return [
        f"{dataset_dir(d)}/manifest.json"
        for d in MODELS[wildcards.model][wildcards.section]["data"]
    ]


def train_data_files(wildcards) -> list[str]:
    """The synthetic task's train split; a fetched dataset's directory (the trainer reads its manifest)."""
    return [
        f"{dataset_dir(d)}/train.jsonl" if d == "synthetic" else dataset_dir(d)
        for d in MODELS[wildcards.model][wildcards.section]["data"]
    ]


def learned_dir(model: str, policy: str) -> str:
    """The kept training run a learned policy loads: TRIM-KV's gates or a learned baseline's own run."""
    return f"results/{policy if policy in LEARNED else 'gates'}/{model}"


def eval_model(wildcards) -> str:
    """What an evaluation loads: a learned policy's kept run, or for a rule-based policy the base model itself,
    so that those cells wait for no training and a retrained gate leaves them valid."""
    if wildcards.policy in LEARNED_POLICIES:
        return learned_dir(wildcards.model, wildcards.policy)
    return base_model(wildcards.model)


def eval_revision(wildcards) -> str:
    """--revision of the base model an evaluation loads itself (a kept run records its base model's own)."""
    if wildcards.policy in LEARNED_POLICIES:
        return ""
    return cli_options({"revision": MODELS[wildcards.model].get("revision")})


def eval_model_input(wildcards) -> list[str]:
    """The file that marks what `eval_model` loads: the kept run's metrics, or the pipeline's own base model."""
    if wildcards.policy in LEARNED_POLICIES:
        return [f"{learned_dir(wildcards.model, wildcards.policy)}/metrics.json"]
    return base_model_input(wildcards)


def seeds(model: str, section: str) -> list[int]:
    spec = MODELS[model][section]
    return spec.get("seeds") or [(spec.get("options") or {}).get("seed", 0)]


def seed_runs(model: str, section: str) -> list[str]:
    return [f"results/{section}/{model}/seeds/{seed}" for seed in seeds(model, section)]


def validation_scores(model: str, section: str) -> list[str]:
    """The validation evaluations that choose among several seeds (none for one seed)."""
    runs = seeds(model, section)
    return (
        [f"results/select/{model}/{section}/{seed}/metrics.json" for seed in runs]
        if len(runs) > 1
        else []
    )


def train_launcher(wildcards) -> str:
    """`python`, or torchrun with one process per GPU when models.<model>.<section>.gpus > 1 (the trainer then
    runs DDP, or DeepSpeed when its options name a config)."""
    gpus = MODELS[wildcards.model][wildcards.section].get("gpus", 0)
    return f"torchrun --standalone --nproc-per-node {gpus}" if gpus > 1 else "python"


def train_options(model: str, section: str) -> dict:
    """The trainer flags of a section, after the base model's revision (models.<model>.revision, which the
    checkpoint records and evaluation loads); the seed comes from the run's {seed} wildcard.
    """
    options = {"revision": MODELS[model].get("revision")}
    options.update(MODELS[model][section].get("options") or {})
    options.pop("seed", None)
    return options


def benchmark_models(benchmark: str) -> list[str]:
    return BENCHMARKS[benchmark].get("models") or list(MODELS)


def budgets(benchmark: str, policy: str) -> list[str]:
    return (
        ["full"]
        if policy in UNBOUNDED
        else [str(b) for b in BENCHMARKS[benchmark]["budgets"]]
    )


def eval_cells(benchmark: str | None = None, model: str | None = None) -> list[str]:
    """Every results/eval/<model>/<benchmark>/<policy>/<budget>/metrics.json the config asks for."""
    cells = []
    for bench in [benchmark] if benchmark else BENCHMARKS:
        for m in benchmark_models(bench):
            if model and m != model:
                continue
            for policy in POLICIES:
                for budget in budgets(bench, policy):
                    cells.append(
                        f"results/eval/{m}/{bench}/{policy}/{budget}/metrics.json"
                    )
    return cells


def retention_outputs() -> list[str]:
    return (
        ["results/figures/retention"]
        if config.get("report", {}).get("retention")
        else []
    )


def config_hash() -> str:
    """Short hash of the whole config: MLflow runs are tagged with it."""
    import hashlib
    import json

    return hashlib.sha256(
        json.dumps(config, sort_keys=True, default=str).encode()
    ).hexdigest()[:12]


def bench_outputs() -> list[str]:
    """The decode-throughput measurement, where the config asks for one (the paper's Table 5)."""
    return (
        [f"results/bench/{config['bench']['architecture']}/metrics.json"]
        if "bench" in config
        else []
    )


def all_outputs() -> list[str]:
    outputs = [f"results/gates/{m}/metrics.json" for m in MODELS]
    for policy in LEARNED:
        if policy in POLICIES:
            outputs += [f"results/{policy}/{m}/metrics.json" for m in MODELS]
    outputs += eval_cells()
    outputs += bench_outputs()
    outputs += [
        "results/tables",
        "results/figures/budget",
        *retention_outputs(),
        "results/mlflow.db",
    ]
    return outputs


def eval_data(wildcards):
    name = wildcards.benchmark
    return [f"resources/data/{name}/manifest.json"]


def retention_options(wildcards):
    spec = config["report"]["retention"]
    layers = ",".join(str(x) for x in spec.get("layers", [0]))
    heads = ",".join(str(x) for x in spec.get("heads", [0]))
    memory = f"--memory-size {spec['memory_size']}" if "memory_size" in spec else ""
    return (
        f"--layers {layers} --heads {heads} --sample {spec.get('sample', 0)} {memory}"
    )
