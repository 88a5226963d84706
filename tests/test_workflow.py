"""The Snakemake workflow: DAG sizes of both presets, lint and format, config validation, pinned envs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

import trimkv
from trimkv.bench_decode import ARCHITECTURES
from trimkv.eval import BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")


def snakemake(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["snakemake", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def test_offline_preset_dag():
    run = snakemake("-n", "--forceall", "--quiet", "rules")  # every job, whatever results/ holds
    assert run.returncode == 0, run.stderr
    counts = job_counts(run.stdout)
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    bounded = [p for p in config["policies"] if trimkv.POLICIES[p].bounded]
    cells = len(config["benchmarks"]["synthetic"]["budgets"]) * len(bounded) + 1
    runs = 3 * 3  # gates, LocRet, SeerAttention-R, seeds 0-2 each: every run evaluated on validation
    assert counts == {"synthetic_task": 1, "synthetic_base": 1, "train": runs, "validate": runs, "select": 3,
                      "evaluate": cells, "report_tables": 1, "report_figures": 1, "report_retention": 1,
                      "track": 1, "all": 1, "total": cells + 2 * runs + 10}


def test_seed_selection_wiring(tmp_path):
    """Each seed trains its own run with --seed; selection reads every run's validation evaluation; evaluation
    loads the kept copy."""
    run = snakemake("-n", "--forceall", "-p", "results/eval/synthetic-tiny/synthetic/trimkv/16/metrics.json")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for seed in (0, 1, 2):
        assert f"--out results/gates/synthetic-tiny/seeds/{seed} --seed {seed}" in out
        assert (f"--model results/gates/synthetic-tiny/seeds/{seed} --benchmark synthetic --subset validation"
                in out)
    scores = " ".join(f"results/select/synthetic-tiny/gates/{s}/metrics.json" for s in (0, 1, 2))
    assert f"--scores {scores} --out results/gates/synthetic-tiny" in out
    assert "eval --model results/gates/synthetic-tiny --benchmark synthetic" in out
    single = bad_config(tmp_path, lambda c: [c["models"]["synthetic-tiny"][s].pop("seeds")
                                             for s in ("gates", "locret", "seerattn_r")])
    assert single.returncode == 0 and "validate" not in job_counts(single.stdout)  # one seed: nothing to choose


def test_paper_preset_covers_every_model_benchmark_policy_and_budget():
    run = snakemake("-n", "--quiet", "rules", "--configfile", "config/paper.yaml")
    assert run.returncode == 0, run.stderr
    counts = job_counts(run.stdout)
    config = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    assert len(config["models"]) == 7 and len(config["benchmarks"]) == 8
    bounded = [p for p in config["policies"] if trimkv.POLICIES[p].bounded]
    cells = sum(len(b.get("models") or config["models"]) * (len(b["budgets"]) * len(bounded) + 1)
                for b in config["benchmarks"].values())
    assert counts["evaluate"] == cells == 1072  # 7 models, 8 benchmarks, 9 budgeted policies x budgets + full
    assert counts["train"] == counts["select"] == 3 * 7 and "validate" not in counts  # one seed each
    assert counts["fetch_dataset"] == len(config["datasets"])
    assert "synthetic_base" not in counts  # the paper preset does not merge the offline one
    assert counts["bench_decode"] == 1  # Table 5


def test_base_model_revision_reaches_training(tmp_path):
    """models.<m>.revision pins the base model: every training run of that model loads it at that revision
    (the checkpoint records it for evaluation), and so does a rule-based policy's evaluation, which loads the
    base model itself; other models get no --revision."""
    config = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    config["models"]["qwen3-4b"]["revision"] = "0123abcd"
    path = tmp_path / "pinned.yaml"
    path.write_text(yaml.safe_dump(config))
    run = snakemake("results/gates/qwen3-4b/seeds/0/metrics.json", "results/locret/qwen3-4b/seeds/0/metrics.json",
                    "results/gates/qwen3-8b/seeds/0/metrics.json",
                    "results/eval/qwen3-4b/gsm8k/snapkv/128/metrics.json",
                    "results/eval/qwen3-8b/gsm8k/full/full/metrics.json",
                    "--forceall", "-n", "-p", "--configfile", str(path))
    assert run.returncode == 0, run.stderr
    commands = [c for c in re.findall(r"Shell command: ([^\n]*)", run.stdout)
                if re.search(" -m trimkv (train|eval) ", c)]
    assert len(commands) == 5
    for command in commands:
        assert ("--revision 0123abcd" in command) == ("--model Qwen/Qwen3-4B " in command), command


def test_rule_based_cells_load_the_base_model_and_wait_for_no_training():
    """A cell of a policy without learned parts evaluates the base model itself: it needs no training run, so it
    runs beside training and survives a retrain. Learned policies load their kept runs."""
    run = snakemake("-n", "--forceall", "-p", *(f"results/eval/synthetic-tiny/synthetic/{p}/16/metrics.json"
                                                 for p in ("snapkv", "streaming")),
                    "results/eval/synthetic-tiny/synthetic/full/full/metrics.json")
    assert run.returncode == 0, run.stderr
    assert job_counts(run.stdout) == {"synthetic_task": 1, "synthetic_base": 1, "evaluate": 3, "total": 5}
    for policy in ("snapkv", "streaming", "full"):
        assert f"eval --model results/base/synthetic --benchmark synthetic --data-dir resources/data/synthetic " \
               f"--policy {policy} " in run.stdout
    learned = snakemake("-n", "--forceall", "-p", *(f"results/eval/synthetic-tiny/synthetic/{p}/16/metrics.json"
                                                    for p in ("locret", "seerattn_r")))
    assert learned.returncode == 0, learned.stderr
    for policy in ("locret", "seerattn_r"):
        assert f"eval --model results/{policy}/synthetic-tiny --benchmark synthetic" in learned.stdout
        assert f"--out results/{policy}/synthetic-tiny/seeds/0 " in learned.stdout


def paper_on_slurm(tmp_path: Path, *targets: str) -> subprocess.CompletedProcess:
    """Dry-run of the paper preset's targets through profiles/slurm, printing each job's resources and command
    (without its conda envs: conda is not installed here)."""
    profile = tmp_path / "slurm"
    profile.mkdir()
    text = (ROOT / "profiles/slurm/config.yaml").read_text()
    (profile / "config.yaml").write_text(text.replace("software-deployment-method: conda", ""))
    return snakemake(*targets, "--forceall", "-n", "-p", "--profile", str(profile), "--configfile", "config/paper.yaml")


def test_bench_stage_runs_table_5_and_feeds_the_report(tmp_path):
    run = paper_on_slurm(tmp_path, "results/tables")
    assert run.returncode == 0, run.stderr
    bench = yaml.safe_load((ROOT / "config/paper.yaml").read_text())["bench"]
    (resources, command), = re.findall(r"rule bench_decode:.*?resources: ([^\n]*)\nShell command: ([^\n]*)",
                                        run.stdout, re.DOTALL)
    assert command.startswith(f"python -m trimkv bench decode --architecture qwen3-4b --settings "
                              f"{' '.join(bench['settings'])} --policies {' '.join(bench['policies'])} "
                              f"--memory-size 1024 --generate 1024 --out results/bench/qwen3-4b/metrics.json")
    assert "gpu=1," in resources and f"runtime={bench['runtime']}," in resources
    tables_input, = re.findall(r"rule report_tables:\n\s+input: ([^\n]*)", run.stdout)
    assert "results/bench/qwen3-4b/metrics.json" in tables_input.split(", ")  # the tables wait for it
    offline = snakemake("-n", "--forceall", "--quiet", "rules")
    assert "bench_decode" not in offline.stdout  # no GPU in the offline preset


def test_slurm_profile_takes_gpus_and_runtimes_from_the_config(tmp_path):
    """On the cluster a model trained on several GPUs gets them (torchrun, one process per GPU) and the time
    the config gives it; the profile sets no gpu or runtime that would override the config's."""
    run = paper_on_slurm(tmp_path, "results/gates/qwen3-14b/seeds/0/metrics.json",
                         "results/gates/qwen3-4b/seeds/0/metrics.json", "results/eval/qwen3-4b/gsm8k/snapkv/128/metrics.json")
    assert run.returncode == 0, run.stderr
    jobs = re.findall(r"resources: ([^\n]*)\nShell command: ([^\n]*)", run.stdout)  # (resources, command)
    config = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    big, small = config["models"]["qwen3-14b"]["gates"], config["models"]["qwen3-4b"]["gates"]
    assert big["gpus"] == 2 and small["gpus"] == 1
    (big_res, big_cmd), = [(r, c) for r, c in jobs if "--out results/gates/qwen3-14b/" in c]
    (small_res, small_cmd), = [(r, c) for r, c in jobs if "--out results/gates/qwen3-4b/" in c]
    (eval_res, _), = [(r, c) for r, c in jobs if "trimkv eval" in c]
    assert big_cmd.startswith("torchrun --standalone --nproc-per-node 2 -m trimkv train ")
    assert small_cmd.startswith("python -m trimkv train ")
    assert f"runtime={big['runtime']}," in big_res and "gpu=2," in big_res
    assert f"runtime={small['runtime']}," in small_res and "gpu=1," in small_res
    assert f"runtime={config['benchmarks']['gsm8k']['runtime']}," in eval_res
    assert f"gpu={config['eval_gpus']}," in eval_res


def test_lint_and_format_are_clean():
    lint = snakemake("--lint")
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    if shutil.which("snakefmt"):
        fmt = subprocess.run(["snakefmt", "--check", "Snakefile", "workflow"], cwd=ROOT, capture_output=True, text=True,
                             check=False)
        assert fmt.returncode == 0, fmt.stderr


def bad_config(tmp_path: Path, edit) -> subprocess.CompletedProcess:
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return snakemake("-n", "--configfile", str(path))


@pytest.mark.parametrize("edit,named", [
    (lambda c: c["policies"].append("lru"), "lru"),
    (lambda c: c["benchmarks"].update(gsm9k={"budgets": [8]}), "gsm9k"),
    (lambda c: c["benchmarks"]["synthetic"]["budgets"].append(0), "budgets"),
    (lambda c: c["models"]["synthetic-tiny"]["gates"].update(memory_sise=3), "memory_sise"),
    (lambda c: c["models"]["synthetic-tiny"]["gates"].update(max_steps="many"), "max_steps"),
    (lambda c: c["benchmarks"]["synthetic"].update(models=["nope"]), "nope"),
    (lambda c: c["models"]["synthetic-tiny"].pop("select"), "select"),
    (lambda c: c["models"]["synthetic-tiny"]["locret"]["options"].update(seed=3), "seed"),
    # an options block's keys are the flags of the command it feeds
    (lambda c: c["models"]["synthetic-tiny"]["gates"]["options"].update(gate_bias=8.0), "--gate-bias"),
    (lambda c: c["eval"].update(bufer_size=8), "--bufer-size"),
])
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, edit, named):
    run = bad_config(tmp_path, edit)
    assert run.returncode != 0
    assert named in run.stdout + run.stderr
    assert "Job stats" not in run.stdout


def test_schema_lists_exactly_the_registered_policies_and_benchmarks():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    assert sorted(schema["properties"]["policies"]["items"]["enum"]) == sorted(trimkv.POLICIES)
    ours = [name for name, cls in BENCHMARKS.items() if cls.__module__.startswith("trimkv.eval.")]  # not test ones
    assert sorted(schema["properties"]["benchmarks"]["propertyNames"]["enum"]) == sorted(ours)
    bench = schema["properties"]["bench"]["properties"]
    assert bench["architecture"]["enum"] == sorted(ARCHITECTURES)
    benched = [p for p, c in trimkv.POLICIES.items() if not c.learned or p == "trimkv"]  # the bench attaches gates
    assert sorted(bench["policies"]["items"]["enum"]) == sorted(benched)


def pinned(env: dict) -> dict[str, str]:
    pins = {}
    for dep in env["dependencies"]:
        for item in dep["pip"] if isinstance(dep, dict) else [dep]:
            if item.startswith("-e "):
                continue
            name, sep, version = re.split(r"(==|=)", item, maxsplit=1) if "=" in item else (item, "", "")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+]*", version), f"{item!r} is not pinned to one version"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_env_pins_exact_versions_consistent_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert {e.stem for e in envs} >= {"data", "train", "eval", "report"}
    for env_file in envs:
        pins = pinned(yaml.safe_load(env_file.read_text()))
        assert pins["python"].startswith(f"{sys.version_info.major}.") and "torch" in pins
        for req in requirements:
            name = req.name.lower().replace("_", "-")
            if name in pins:
                assert req.specifier.contains(pins[name]), f"{env_file.name}: {name}=={pins[name]} breaks {req}"
        core = [r.name.lower().replace("_", "-") for r in requirements[: len(project["dependencies"])]]
        missing = [n for n in core if n not in pins]
        assert not missing, f"{env_file.name} lacks core dependencies {missing}"


def test_every_env_installs_this_checkout_from_where_conda_runs_pip(tmp_path):
    """Snakemake copies an env file to .snakemake/conda/<hash>.yaml and conda runs pip beside that copy, with the
    file's pip entries as a requirements file: trimkv's entry must still name this checkout from there."""
    assert "os.environ.update(TRIMKV_ROOT=workflow.basedir)" in (ROOT / "Snakefile").read_text()
    beside = tmp_path / ".snakemake" / "conda"
    beside.mkdir(parents=True)
    for env_file in sorted((ROOT / "envs").glob("*.yaml")):
        pip = next(d["pip"] for d in yaml.safe_load(env_file.read_text())["dependencies"] if isinstance(d, dict))
        local = [item for item in pip if item.startswith("-e ")]
        assert len(local) == 1, env_file.name
        (beside / "condaenv.requirements.txt").write_text(local[0] + "\n")
        install = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                                  "--no-build-isolation", "-r", "condaenv.requirements.txt"], cwd=beside,
                                 env={**os.environ, "TRIMKV_ROOT": str(ROOT)}, capture_output=True, text=True,
                                 check=False)
        assert install.returncode == 0 and "Would install trimkv-" in install.stdout, (env_file.name,
                                                                                       install.stderr[-2000:])

