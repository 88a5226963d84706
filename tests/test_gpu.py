"""GPU equivalence checks: skipped without CUDA (CI is CPU-only); run on the H200, results in docs/benchmarks.md."""

from __future__ import annotations

import pytest
import torch
from test_cache import gated, generate, left_padded

import trimkv
from trimkv.attention import retention_attention_flex, retention_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("T", [128, 1024])
def test_flex_matches_reference_forward_and_backward_on_gpu(T):
    torch.manual_seed(0)
    B, Hq, Hkv, D = 2, 8, 2, 64
    q = torch.randn(B, Hq, T, D, device="cuda", requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device="cuda", requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device="cuda", requires_grad=True)
    log_beta = (-torch.rand(B, Hkv, T, device="cuda") * 0.05).requires_grad_()
    grads = []
    for fn in (retention_attention_reference, retention_attention_flex):
        out = fn(q, k, v, log_beta)
        (out * torch.linspace(-1, 1, D, device="cuda")).sum().backward()
        grads.append((out.detach(), *(t.grad.clone() for t in (q, k, v, log_beta))))
        for t in (q, k, v, log_beta):
            t.grad = None
    for ref, flex in zip(*grads):
        torch.testing.assert_close(flex, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("policy", ["trimkv", "snapkv", "h2o"])
def test_bounded_cache_on_gpu_matches_full_and_rows_alone(policy):
    model = gated("qwen3").cuda()
    ids, mask = left_padded([9, 16, 5])
    ids, mask = ids.cuda(), mask.cuda()
    full = generate(model, ids, mask, trimkv.make_cache("full"))
    assert torch.equal(generate(model, ids, mask, trimkv.make_cache(policy, memory_size=64)), full)
    batch = generate(model, ids, mask, trimkv.make_cache(policy, memory_size=5, buffer_size=2))
    T = ids.shape[1]
    for b, n in enumerate([9, 16, 5]):
        alone = generate(model, ids[b:b + 1, T - n:], cache=trimkv.make_cache(policy, memory_size=5, buffer_size=2))
        assert torch.equal(batch[b, T:], alone[0, n:])
