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


@pytest.mark.parametrize("policy", ["trimkv", "full", "streaming", "snapkv", "h2o", "keydiff", "rkv", "tova"])
def test_cuda_graph_decode_matches_stock_generate(policy):
    """Static decode replayed as CUDA graphs, with eviction every few steps, gives the tokens of stock generate
    (float64, as in test_decode.py: attention over all slots rounds differently from attention over the filled
    ones)."""
    from trimkv.decode import generate as static_generate

    model = gated("qwen3").double().cuda()
    ids, mask = left_padded([23, 17, 9])
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(policy=policy, memory_size=6, buffer_size=3, prefill_chunk=8)
    stock = generate(model, ids, mask, trimkv.make_cache(**kw), max_new_tokens=40)
    ours = static_generate(model, ids, mask, trimkv.make_cache(**kw), 40, graph=True)
    eager = static_generate(model, ids, mask, trimkv.make_cache(**kw), 40, graph=False)
    assert torch.equal(eager, stock)
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("policy", ["trimkv", "full", "streaming", "snapkv"])
def test_compiled_decode_step_matches_plain_step(policy):
    """The torch.compile'd step (FlexAttention's decode kernel, slot writes in place) gives the plain step's
    logits, fed the same tokens, across evictions (float32)."""
    from trimkv.decode import StaticDecoder

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model = gated("qwen3").float().cuda()
    ids = torch.randint(3, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0)).cuda()
    feed = torch.randint(3, model.config.vocab_size, (30, 3), generator=torch.Generator().manual_seed(1)).cuda()
    logits = []
    for compile in (False, True):
        cache = trimkv.make_cache(policy, **({} if policy == "full" else {"memory_size": 8, "buffer_size": 4}))
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, past_key_values=cache)
            decoder = StaticDecoder(model, cache, len(feed), graph=True, compile=compile)
            logits.append(torch.stack([decoder.step(token).clone() for token in feed]))
            decoder.close()
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tiny_weight", [0, None])
def test_graph_decode_step_in_bf16_runs_decode_linear(monkeypatch, tiny_weight):
    """In bf16 with decode_linear=True the captured step gives the plain step's logits up to bf16 rounding, and
    the model is plain nn.Linear after. With TINY_WEIGHT = 0 every linear layer runs the kernel (tuned for the tiny
    model's shapes); with the default every product of the tiny model is small enough to be a fused sum instead,
    and the kernel never runs."""
    import trimkv.decode
    from trimkv.decode import StaticDecoder
    from trimkv.kernels.decode_linear import _decode_linear_kernel

    if tiny_weight is not None:
        monkeypatch.setattr(trimkv.decode, "TINY_WEIGHT", tiny_weight)
    model = gated("qwen3").bfloat16().cuda()
    ids = torch.randint(3, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0)).cuda()
    feed = torch.randint(3, model.config.vocab_size, (12, 3), generator=torch.Generator().manual_seed(1)).cuda()
    _decode_linear_kernel.cache.clear()
    logits = []
    for graph in (False, True):
        cache = trimkv.make_cache("trimkv", memory_size=8, buffer_size=4)
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, past_key_values=cache)
            decoder = StaticDecoder(model, cache, len(feed), graph=graph, decode_linear=True)
            logits.append(torch.stack([decoder.step(token).float() for token in feed]))
            decoder.close()
    assert (len(_decode_linear_kernel.cache) > 0) == (tiny_weight == 0)  # tuned if and only if it ran
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(logits[1], logits[0], rtol=3e-2, atol=3e-2)


def test_cuda_graph_decode_reads_nothing_back_per_step():
    """After the capture, a decode step neither synchronizes with the host nor allocates."""
    from trimkv.decode import StaticDecoder

    model = gated("qwen3").cuda()
    ids, _ = left_padded([20, 20])
    cache = trimkv.make_cache("trimkv", memory_size=8, buffer_size=4)
    with torch.no_grad():
        token = model(input_ids=ids.cuda(), use_cache=True, past_key_values=cache).logits[:, -1].argmax(-1)
        decoder = StaticDecoder(model, cache, 64, graph=True)
        for _ in range(4):
            token = decoder.step(token).argmax(-1)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):  # 8 + 4 filled the slots at step 4 (compressed); these three do not
                token = decoder.step(token).argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.cuda.memory_allocated() == allocated
        decoder.close()


def test_runner_uses_graph_decode_on_gpu(monkeypatch):
    from trimkv import decode
    from trimkv.eval.runner import generate_batch

    calls = []
    original = decode.generate
    monkeypatch.setattr(decode, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = gated("qwen3").cuda()
    ids, mask = left_padded([7, 5])
    out = generate_batch(model, ids.cuda(), mask.cuda(), 6, past_key_values=trimkv.make_cache("trimkv", memory_size=4),
                         pad_token_id=0, do_sample=False)
    assert calls and out.shape == (2, 7 + 6)
