"""Gate training on GPUs (skipped without CUDA): FlexAttention matches the reference, bf16 training runs, and
2-GPU DeepSpeed ZeRO-2 / torchrun give the losses of one GPU on the same batches. Run with -s to see the curves."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from test_train import REPO, config, files  # noqa: F401  (the module fixture)

import trimkv
from trimkv.train.losses import attention_implementation, objective
from trimkv.train.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_flex_matches_reference_on_gpu():
    model = tiny_model().cuda()
    trimkv.attach_gates(model, trimkv.GateConfig(intermediate_size=32, bias_init=2.0, init_std=0.2))
    plain = model.config._attn_implementation
    ids = torch.randint(4, 97, (1, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for backend in ("reference", "flex"):
        model.zero_grad(set_to_none=True)
        with attention_implementation(model, f"trimkv_{backend}"):
            parts = objective(model, ids, 16, plain)
            parts["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = ({k: float(v.detach()) for k, v in parts.items()}, grads)
    print("reference", results["reference"][0], "\nflex", results["flex"][0])
    for k, v in results["reference"][0].items():
        assert results["flex"][0][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    for name, g in results["reference"][1].items():
        torch.testing.assert_close(results["flex"][1][name], g, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("form", ["released", "paper"])
def test_flex_capacity_matches_blocks_on_gpu(form):
    from test_train_losses import random_log_beta

    from trimkv.train.losses import capacity_loss

    results = {}
    for backend in ("blocks", "flex"):
        log_betas = [lb.float().cuda().requires_grad_(True) for lb in random_log_beta(L=2, B=1, T=700, H=4)]
        loss = capacity_loss(log_betas, 20, form, backend=backend)
        loss.backward()
        results[backend] = (float(loss.detach()), [lb.grad for lb in log_betas])
    print(form, "blocks", results["blocks"][0], "flex", results["flex"][0])
    assert results["flex"][0] == pytest.approx(results["blocks"][0], rel=1e-4)
    for a, b in zip(results["flex"][1], results["blocks"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_bf16_flex_training_with_checkpointing(files, tmp_path):  # noqa: F811
    cfg = config(files, tmp_path / "o", max_steps=3, grad_accum=2, gradient_checkpointing=True, attention="flex")
    assert train(cfg) == 0
    params = json.loads((tmp_path / "o" / "params.json").read_text())
    assert params["student_attention"] == "trimkv_flex" and params["dtype"] == "torch.bfloat16"
    gates = load_file(tmp_path / "o" / "trimkv_gates.safetensors")
    assert all(t.dtype == torch.float32 for t in gates.values())


def curves(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["curves"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("deepspeed", [True, False], ids=["zero2", "torchrun"])
def test_two_gpus_match_one_gpu(files, tmp_path, deepspeed):  # noqa: F811
    if deepspeed:
        pytest.importorskip("deepspeed")
    one = config(files, tmp_path / "one", max_steps=5, grad_accum=2, max_length=64)
    assert train(one) == 0
    argv = ["--model", one.model, "--data", *one.data, "--memory-size", "8", "--max-length", "64",
            "--max-steps", "5", "--lr", "1e-2", "--gate-bias-init", "3", "--gate-intermediate-size", "32",
            "--grad-accum", "1", "--out", str(tmp_path / "two")]
    if deepspeed:
        argv += ["--deepspeed", str(REPO / "configs" / "deepspeed_zero2.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(["torchrun", "--nproc-per-node", "2", "-m", "trimkv.train.trainer", *argv], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    a, b = curves(tmp_path / "one"), curves(tmp_path / "two")
    print(f"\n{'zero2' if deepspeed else 'torchrun'}: 1 GPU x accum 2 loss {a['loss']}\n"
          f"                 2 GPUs x accum 1 loss {b['loss']}")
    assert b["loss"][0] == pytest.approx(a["loss"][0], rel=2e-3)  # the same batch, the same weights
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)  # then bf16 training drifts only slightly
    assert b["tokens"] == a["tokens"]


def test_resume_on_gpu_is_exact_enough(files, tmp_path):  # noqa: F811
    cfg = config(files, tmp_path / "straight", max_steps=4, grad_accum=2)
    assert train(cfg) == 0
    again = replace(cfg, out=str(tmp_path / "resumed"))
    assert train(again, stop_after=2) != 0 and train(again) == 0
    a, b = load_file(tmp_path / "straight" / "trimkv_gates.safetensors"), load_file(
        tmp_path / "resumed" / "trimkv_gates.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_deepspeed_one_gpu_matches_plain(files, tmp_path):  # noqa: F811
    """DeepSpeed ZeRO-2 in bf16 on one GPU (module cast to bf16, fp32 master gates) vs the plain trainer (bf16
    autocast, fp32 gates): the same loss on the same first batch, close after."""
    pytest.importorskip("deepspeed")
    plain = config(files, tmp_path / "plain", max_steps=5, grad_accum=2)
    assert train(plain) == 0
    ds = replace(plain, out=str(tmp_path / "ds"), deepspeed=str(REPO / "configs" / "deepspeed_zero2.json"))
    assert train(ds) == 0
    a, b = curves(tmp_path / "plain"), curves(tmp_path / "ds")
    print(f"\nplain loss {a['loss']}\nzero2 loss {b['loss']}")
    assert b["loss"][0] == pytest.approx(a["loss"][0], rel=2e-3)
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
    gates = load_file(tmp_path / "ds" / "trimkv_gates.safetensors")
    assert all(t.dtype == torch.float32 for t in gates.values())
