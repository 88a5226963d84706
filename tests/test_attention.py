import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from trimkv.attention import (
    BACKENDS,
    retention_attention,
    retention_attention_flex,
    retention_attention_forward,
    retention_attention_reference,
)

B, HQ, HKV, D = 2, 4, 2, 8


def make_inputs(T: int, S: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, S, D, generator=g, dtype=dtype)
    log_beta = F.logsigmoid(torch.randn(B, HKV, S, generator=g, dtype=dtype) * 2)
    return q, k, v, log_beta


def brute_force(q, k, v, log_beta):
    """One (b, h, t) at a time: weights ∝ exp(q.k_i / sqrt(D)) * beta_i^(t - i) over i <= t."""
    T, S = q.shape[2], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(HQ):
            kv = h // (HQ // HKV)
            for t in range(T):
                pos = S - T + t
                w = [math.exp(float(q[b, h, t] @ k[b, kv, i]) / math.sqrt(D))
                     * math.exp(log_beta[b, kv, i]) ** (pos - i) for i in range(pos + 1)]
                out[b, h, t] = sum(wi * v[b, kv, i] for i, wi in enumerate(w)) / sum(w)
    return out


@pytest.mark.parametrize("T,S", [(7, 7), (3, 7)])
def test_reference_matches_brute_force(T, S):
    q, k, v, log_beta = make_inputs(T, S)
    torch.testing.assert_close(retention_attention_reference(q, k, v, log_beta), brute_force(q, k, v, log_beta))


def test_zero_log_beta_is_causal_sdpa():
    q, k, v, _ = make_inputs(7, 7)
    out = retention_attention_reference(q, k, v, torch.zeros(B, HKV, 7))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    rep = lambda x: x.repeat_interleave(HQ // HKV, dim=1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, rep(k), rep(v), is_causal=True))


def test_masks_and_positions():
    q, k, v, log_beta = make_inputs(7, 7)
    pad = torch.ones(B, 1, 7, 7, dtype=torch.bool)
    pad[0, ..., :2] = False  # left padding of 2 in sequence 0: rows 0-1 have no allowed key
    out = retention_attention_reference(q, k, v, log_beta, attention_mask=pad)
    assert torch.isfinite(out).all() and out[0, :, :2].eq(0).all()
    additive = torch.zeros(pad.shape).masked_fill(~pad, torch.finfo(torch.float32).min)
    torch.testing.assert_close(retention_attention_reference(q, k, v, log_beta, attention_mask=additive)[:, :, 2:],
                               out[:, :, 2:])
    # explicit positions equal to the defaults change nothing
    explicit = retention_attention_reference(q, k, v, log_beta, query_positions=torch.arange(7).expand(B, 7),
                                             key_positions=torch.arange(7))
    torch.testing.assert_close(explicit, retention_attention_reference(q, k, v, log_beta))


def test_reference_gradcheck_log_beta():
    q, k, v, log_beta = make_inputs(4, 5, dtype=torch.float64)
    log_beta.requires_grad_(True)
    pad = torch.ones(B, 1, 4, 5, dtype=torch.bool)
    pad[0, ..., :3] = False  # includes fully masked rows: their gradient must be 0, not NaN
    f = lambda lb: retention_attention_reference(q, k, v, lb, attention_mask=pad)
    assert torch.autograd.gradcheck(f, (log_beta,))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("T,S", [(7, 7), (3, 7)])
def test_flex_matches_reference(T, S):
    try:
        q, k, v, log_beta = make_inputs(T, S)
        log_beta.requires_grad_(True)
        out = retention_attention_flex(q, k, v, log_beta)
    except Exception as err:  # noqa: BLE001 -- any backend failure on this device means "cannot test here"
        pytest.skip(f"flex_attention cannot run on this device: {err}")
    ref_beta = log_beta.detach().requires_grad_(True)
    ref = retention_attention_reference(q, k, v, ref_beta)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(log_beta.grad, ref_beta.grad, atol=1e-5, rtol=1e-5)
    pad = torch.rand(B, 1, T, S, generator=torch.Generator().manual_seed(1)) > 0.3
    torch.testing.assert_close(retention_attention_flex(q, k, v, log_beta, attention_mask=pad),
                               retention_attention_reference(q, k, v, log_beta, attention_mask=pad),
                               atol=1e-5, rtol=1e-5)


def test_backend_by_name():
    q, k, v, log_beta = make_inputs(3, 5)
    assert set(BACKENDS) == {"reference", "flex", "triton"}
    torch.testing.assert_close(retention_attention(q, k, v, log_beta), retention_attention_reference(q, k, v, log_beta))
    with pytest.raises(ValueError, match="unknown retention attention backend 'nope'"):
        retention_attention(q, k, v, log_beta, backend="nope")


@pytest.fixture(scope="module")
def tiny_qwen3():
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=97)
    return Qwen3ForCausalLM(config).eval()


def test_hf_interface_zero_log_beta_equals_sdpa(tiny_qwen3):
    attn = tiny_qwen3.model.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, h, 6, 16, generator=g) for h in (4, 2, 2))
    out, weights = retention_attention_forward(attn, q, k, v, None, scaling=attn.scaling,
                                               retention_log_beta=torch.zeros(B, 6, 2))
    expected, _ = sdpa_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
    assert weights is None and out.shape == (B, 6, 4, 16)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="attach the retention gates"):
        retention_attention_forward(attn, q, k, v, None)


def test_registered_model_with_padding_matches_sdpa(tiny_qwen3):
    ids = torch.randint(0, 97, (B, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    model = tiny_qwen3
    model.set_attn_implementation("sdpa")
    expected = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("trimkv_reference")
    with pytest.raises(ValueError, match="retention_log_beta"):
        model(ids, attention_mask=mask)
    # the gates' hook normally supplies this per layer; zeros turn retention off
    out = model(ids, attention_mask=mask, retention_log_beta=torch.zeros(B, 6, 2)).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, 2:], expected[1, 2:])
