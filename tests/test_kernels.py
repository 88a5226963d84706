"""The Triton kernels (trimkv/kernels/) against the reference implementations.

Without a GPU they run in Triton's CPU interpreter on tiny shapes (fp32/fp16; the interpreter has no bf16);
with CUDA the `gpu` tests add bf16 at 4K tokens against the fp32 reference. Skipped where triton is not installed.
"""

import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when @triton.jit decorates, so before the kernels' import
triton = pytest.importorskip("triton")


def _interpreter_index_fix() -> None:
    """Triton 3.6's interpreter turns a loop bound into an int with int(1-element array), which numpy >= 2.4
    rejects; take the element instead (interpreter only, tests only)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "trimkv_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.trimkv_fixed = True
    interpreter._patch_lang_tensor = patched


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    _interpreter_index_fix()
elif not CUDA:
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from trimkv.attention import retention_attention_reference
from trimkv.kernels.capacity import capacity_sums
from trimkv.kernels.decode_attention import BLOCK_N, decode_attention, splits_for
from trimkv.kernels.decode_linear import MAX_ROWS, decode_linear, split_for
from trimkv.kernels.retention_attention import retention_attention_triton
from trimkv.train.losses import capacity_loss, log_capacity

if CUDA:
    from test_train import files  # noqa: F401  (the module fixture of the GPU training test)

DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def make_inputs(B, Hq, Hkv, T, S, D, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    log_beta = F.logsigmoid(torch.randn(B, Hkv, S, generator=g) * 2 + 1)  # beta spread over (0, 1)
    return [x.to(device=device, dtype=dtype if x is not log_beta else torch.float32) for x in (q, k, v, log_beta)]


def run_both(inputs, mask=None, seed=1, rows_read=None):
    """Triton output and gradients of (q, k, v, log_beta), and the same from the fp64 reference (fp32 on GPU).
    rows_read (B, T) bool: the output rows the loss reads (the others get a zero gradient)."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = retention_attention_triton(*leaves, attention_mask=mask)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    if rows_read is not None:
        grad = grad * rows_read[:, None, :, None].to(grad.device)
    got = torch.autograd.grad(out, leaves, grad)
    exact_dtype = torch.float32 if CUDA else torch.float64
    ref_leaves = [x.detach().to(exact_dtype).requires_grad_() for x in inputs]
    ref_mask = mask.to(exact_dtype) if mask is not None and mask.dtype != torch.bool else mask
    ref = retention_attention_reference(*ref_leaves, attention_mask=ref_mask)
    exact = torch.autograd.grad(ref, ref_leaves, grad.to(exact_dtype))
    return (out, *got), (ref, *exact)


def assert_all_close(got, exact, rtol, atol):
    for name, g, e in zip(("out", "dq", "dk", "dv", "dlog_beta"), got, exact, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.to(e.dtype), e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


# ---- retention attention: CPU interpreter (or GPU), fp32 -------------------------------------------------------

@pytest.mark.parametrize("B,Hq,Hkv,T,S,D", [
    (1, 2, 2, 5, 5, 8),  # G = 1, one partial block
    (2, 4, 2, 37, 37, 16),  # G = 2, T not a multiple of the block
    (1, 4, 2, 20, 45, 8),  # fewer queries than keys: queries at positions S - T .. S - 1
    (1, 6, 2, 33, 33, 24),  # G = 3, head dim not a power of two
])
def test_attention_matches_reference(B, Hq, Hkv, T, S, D):
    got, exact = run_both(make_inputs(B, Hq, Hkv, T, S, D))
    assert_all_close(got, exact, rtol=1e-4, atol=1e-4)


def test_attention_left_padding_mask():
    """The HF mask of a left-padded batch (causal & key is not padding): padded query rows output zeros and get
    zero gradients, as in the reference; the other rows match."""
    B, T = 2, 37
    inputs = make_inputs(B, 4, 2, T, T, 16, seed=2)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, :5] = False  # sequence 0: 5 padding tokens on the left
    mask = (torch.ones(T, T, dtype=torch.bool).tril() & keep[:, None, None, :]).to(DEVICE)  # (B, 1, T, T)
    got, exact = run_both(inputs, mask)
    assert_all_close(got, exact, rtol=1e-4, atol=1e-4)
    assert got[0][0, :, :5].eq(0).all() and got[1][0, :, :5].eq(0).all()  # padded rows: zero output, zero dq


def test_attention_arbitrary_masks():
    inputs = make_inputs(2, 4, 2, 21, 21, 8, seed=3)
    per_head = (torch.rand(2, 4, 21, 21, generator=torch.Generator().manual_seed(4)) > 0.4).to(DEVICE)
    got, exact = run_both(inputs, per_head)  # (B, Hq, T, S), with some rows fully masked
    assert_all_close(got, exact, rtol=1e-4, atol=1e-4)
    broadcast = per_head[:1, :1]  # (1, 1, T, S)
    got, exact = run_both(inputs, broadcast)
    assert_all_close(got, exact, rtol=1e-4, atol=1e-4)


def test_attention_additive_float_mask():
    """HF's float mask (0 = attend, dtype-min = masked): equal to the bool mask on every row with an allowed key.
    Rows with none are padding, whose output differs between the backends (the reference spreads 1/S over the
    causal keys, flex and Triton 1/(t+1)) and which no loss reads."""
    T = 23
    inputs = make_inputs(2, 4, 2, T, T, 8, seed=5)
    keep = torch.ones(2, T, dtype=torch.bool)
    keep[1, :3] = False
    allowed = (torch.ones(T, T, dtype=torch.bool).tril() & keep[:, None, None, :]).to(DEVICE)
    additive = torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, torch.finfo(torch.float32).min)
    got_float, exact = run_both(inputs, additive, rows_read=keep)
    got_bool, _ = run_both(inputs, allowed, rows_read=keep)
    for g, b, e in zip(got_float[1:], got_bool[1:], exact[1:], strict=True):  # dq, dk, dv, dlog_beta
        torch.testing.assert_close(g, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_float[0][0], exact[0][0].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_float[0][1, :, 3:], exact[0][1, :, 3:].float(), rtol=1e-4, atol=1e-4)


def test_attention_half_precision_and_strides():
    """fp16 inputs (fp32 accumulation), and query/key/value as the HF layout hands them: (B, T, H, D) transposed."""
    B, Hq, Hkv, T, D = 1, 4, 2, 29, 16
    q, k, v, log_beta = make_inputs(B, Hq, Hkv, T, T, D, seed=6)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).half() for x in (q, k, v))
    assert not q.is_contiguous()
    got, exact = run_both([q, k, v, log_beta])
    assert_all_close(got, exact, rtol=2e-2, atol=2e-2)


def test_attention_rejects_bad_input():
    q, k, v, log_beta = make_inputs(1, 3, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        retention_attention_triton(q, k, v, log_beta)
    q, k, v, log_beta = make_inputs(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="log_beta must have shape"):
        retention_attention_triton(q, k, v, log_beta[..., :3])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        retention_attention_triton(q, k, v, log_beta, attention_mask=torch.ones(1, 1, 4, 5, dtype=torch.bool))


def test_registered_backend_in_a_model_with_padding():
    """trimkv_triton through transformers' attention interface equals trimkv_reference, left padding included."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=97)
    model = Qwen3ForCausalLM(config).eval().to(DEVICE)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 19), generator=g).to(DEVICE)
    mask = torch.ones(2, 19, dtype=torch.long, device=DEVICE)
    mask[1, :4] = 0
    log_beta = F.logsigmoid(torch.randn(2, 19, 2, generator=g)).to(DEVICE)
    logits = {}
    for name in ("trimkv_reference", "trimkv_triton"):
        model.set_attn_implementation(name)
        logits[name] = model(ids, attention_mask=mask, retention_log_beta=log_beta).logits
    torch.testing.assert_close(logits["trimkv_triton"][0], logits["trimkv_reference"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["trimkv_triton"][1, 4:], logits["trimkv_reference"][1, 4:], rtol=1e-4,
                               atol=1e-4)


def test_training_objective_matches_reference():
    """The whole gate-training objective (KL + NTP + capacity) and the gates' gradients: trimkv_triton equals
    trimkv_reference (on GPU this is the trainer's default path when triton is installed)."""
    from conftest import tiny_model

    import trimkv
    from trimkv.train.losses import attention_implementation, objective

    model = tiny_model().to(DEVICE)
    trimkv.attach_gates(model, trimkv.GateConfig(intermediate_size=32, bias_init=2.0, init_std=0.2))
    plain = model.config._attn_implementation
    ids = torch.randint(4, 97, (1, 45), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with attention_implementation(model, f"trimkv_{backend}"):
            parts = objective(model, ids, 8, plain)
            parts["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = ({k: float(v.detach()) for k, v in parts.items()}, grads)
    assert results["triton"][1], "no gate received a gradient"
    for k, v in results["reference"][0].items():
        assert results["triton"][0][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    for name, g in results["reference"][1].items():
        torch.testing.assert_close(results["triton"][1][name], g, rtol=1e-3, atol=1e-5)


# ---- capacity sums ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 37), (1, 100)])
def test_capacity_sums_match_reference(shape):
    g = torch.Generator().manual_seed(7)
    lb = F.logsigmoid(torch.randn(*shape, generator=g) * 3).double().to(DEVICE)
    leaf = lb.float().requires_grad_()
    exact_leaf = lb.clone().requires_grad_()
    S, exact = capacity_sums(leaf), log_capacity(exact_leaf).exp()
    grad = torch.randn(shape, generator=g).to(DEVICE)
    S.backward(grad)
    exact.backward(grad.double())
    torch.testing.assert_close(S.double(), exact.double(), rtol=1e-5, atol=0)  # log_capacity works in fp32
    torch.testing.assert_close(leaf.grad.double(), exact_leaf.grad, rtol=1e-4, atol=1e-4)


def test_capacity_loss_triton_backend():
    g = torch.Generator().manual_seed(8)
    log_betas = [F.logsigmoid(torch.randn(2, 40, 3, generator=g) * 2 + 3).to(DEVICE) for _ in range(2)]
    for form in ("released", "paper"):
        leaves = [lb.clone().requires_grad_() for lb in log_betas]
        ref_leaves = [lb.clone().requires_grad_() for lb in log_betas]
        got = capacity_loss(leaves, 8, form, backend="triton")
        exact = capacity_loss(ref_leaves, 8, form, backend="blocks")
        got.backward()
        exact.backward()
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)
        for a, b in zip(leaves, ref_leaves, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


# ---- GPU: bf16 at training lengths (run on the H200) -----------------------------------------------------------

def decode_reference(q, k, v, mask, scale):
    """float64, every query head against its KV head's keys, the mask broadcast over heads."""
    G = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(G, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~mask, -torch.inf).softmax(-1) @ v


@pytest.mark.parametrize("B,Hq,Hkv,N,D,per_head", [(2, 8, 2, 300, 16, False), (3, 4, 4, 70, 16, False),
                                                   (2, 6, 2, 129, 16, True), (1, 16, 2, 2 * BLOCK_N, 16, False),
                                                   (2, 4, 2, 90, 24, False)])
def test_decode_attention_matches_reference(B, Hq, Hkv, N, D, per_head):
    """Split over the slots and merged: the attention of every query head over its row's unmasked slots, for
    splits of whole and partial blocks, GQA groups of 1-8, masks shared by the heads or per head, and a head
    dim that is no power of two (Phi-3's 96 in small)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, 1), (Hkv, N), (Hkv, N)))
    filled = torch.randint(1, N + 1, (B,), generator=g)
    mask = (torch.arange(N)[None, :] < filled[:, None])[:, None, None]  # a row's first slots, as in static decode
    if per_head:
        mask = mask & (torch.rand(B, Hq, 1, N, generator=g) < 0.7)
        mask[..., 0] = True
    assert splits_for(B * Hkv, N) > 1 or N <= BLOCK_N
    got = decode_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE), 0.25)
    assert got.shape == q.shape
    torch.testing.assert_close(got.cpu().double(), decode_reference(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)


def test_decode_attention_under_compile_and_in_the_decode_path():
    """The custom op traces whole under torch.compile (fake tensor shapes), and the GQA decode path dispatches to
    it on a GPU and nowhere else."""
    from trimkv.hooks import _split_decode

    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    compiled = torch.compile(lambda *a: decode_attention(*a, 0.25), backend="eager", fullgraph=True)
    got = compiled(*(x.to(DEVICE) for x in (q, k, v, mask)))
    torch.testing.assert_close(got.cpu().double(), decode_reference(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)
    assert _split_decode(q.to(DEVICE), mask.to(DEVICE)) == CUDA
    assert not _split_decode(q.double().to(DEVICE), mask.to(DEVICE))


@gpu
@pytest.mark.parametrize("B", [4, 8])
def test_gpu_bf16_decode_attention(B):
    """Table 5's shapes (Qwen3-4B heads, M + buffer = 1,152 slots) in bf16 against the float64 reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, 128, generator=g) for h, n in ((32, 1), (8, 1152), (8, 1152)))
    mask = (torch.arange(1152)[None, :] < torch.randint(1025, 1153, (B,), generator=g)[:, None])[:, None, None]
    got = decode_attention(*(x.cuda().bfloat16() for x in (q, k, v)), mask.cuda(), 128**-0.5)
    assert (got.cpu().double() - decode_reference(q, k, v, mask, 128**-0.5)).abs().max() < 2e-2


@pytest.mark.parametrize("M,N,K", [(1, 50, 80), (3, 70, 300), (MAX_ROWS, 64, 64), (5, 40, 2100)])
def test_decode_linear_matches_reference(M, N, K):
    """Split over K in slices of the block width, the partial sums added: x W^T for 1 to MAX_ROWS rows, column
    and inner sizes that fill no block, and (K = 2,100) four splits of several slices each."""
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5
    got = decode_linear(x.to(DEVICE, dtype), w.to(DEVICE, dtype))
    assert got.shape == (M, N) and got.dtype == dtype
    exact = x.to(dtype).double() @ w.to(dtype).double().T  # the rounding of the inputs is not the kernel's
    torch.testing.assert_close(got.cpu().double(), exact, rtol=1e-2, atol=1e-2)
    assert torch.equal(decode_linear(x.to(DEVICE, dtype), w.to(DEVICE, dtype)), got)  # a fixed order of sums
    with pytest.raises(ValueError, match="rows"):
        decode_linear(torch.zeros(MAX_ROWS + 1, K, dtype=dtype, device=DEVICE), w.to(DEVICE, dtype))


def test_decode_linear_under_compile():
    """Traced by torch.compile, the partials' op is taken whole (its fake gives the split's shape) and the sum is
    left to the graph, split by split in the eager kernel's order: the same bits as the eager op's own summing
    kernel."""
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    x, w = torch.randn(3, 2100, dtype=dtype, device=DEVICE), torch.randn(40, 2100, dtype=dtype, device=DEVICE) / 45
    compiled = torch.compile(decode_linear, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, w), decode_linear(x, w))


def test_decode_linear_splits_by_shape():
    """Hand-counted for a 132-SM H100 or H200 (up to 528 blocks): column blocks of 32, doubled splits while the
    blocks fit and each slice of K keeps >= 512; and the interpreter's 4 "SMs" split the K = 2,100 case above in
    four."""
    assert split_for(4096, 2560, 132) == 4  # q_proj: 128 blocks x 4
    assert split_for(1024, 2560, 132) == 4  # k_proj, v_proj: 32 blocks x 4 (640-wide slices; x 8 would be 320)
    assert split_for(2560, 4096, 132) == 4  # o_proj: 80 x 4 (x 8 would be 640 > 528)
    assert split_for(9728, 2560, 132) == 1  # gate, up: 304 blocks (x 2 would be 608)
    assert split_for(2560, 9728, 132) == 4  # down: 80 x 4
    assert split_for(151936, 2560, 132) == 1  # lm_head: 4,748 blocks
    assert split_for(40, 2100, 4) == 4


@gpu
@pytest.mark.parametrize("rows", [4, 8])
def test_gpu_bf16_decode_linear_at_qwen3_4b_shapes(rows):
    """bf16 at every product of a Qwen3-4B decode step against the float64 product of the same bf16 inputs."""
    g = torch.Generator().manual_seed(0)
    for K, N in [(2560, 4096), (2560, 1024), (4096, 2560), (2560, 9728), (9728, 2560), (2560, 151936)]:
        x, w = torch.randn(rows, K, generator=g).bfloat16(), (torch.randn(N, K, generator=g) / K**0.5).bfloat16()
        got = decode_linear(x.cuda(), w.cuda()).cpu().double()
        exact = x.double() @ w.double().T
        assert (got - exact).abs().max() < 2e-2 * exact.abs().max(), (K, N)


def max_rel_error(got, exact) -> float:
    """max |got - exact| / max |exact|: the error on the tensor's own scale."""
    return float((got.float() - exact.float()).abs().max() / exact.float().abs().max().clamp(min=1e-12))


@gpu
@pytest.mark.parametrize("T,Hq,Hkv", [(4096, 16, 8), (4096 + 37, 32, 8)])
def test_gpu_bf16_attention_4k(T, Hq, Hkv):
    """bf16 kernel vs the fp32 reference on the same bf16 inputs, Qwen3-1.7B head shape (and G = 4, T not a
    multiple of any block). bf16 rounds probabilities and outputs to ~0.4%; 2% of each tensor's scale is a
    bound a correct kernel meets with a wide margin, and a wrong slope, mask or block edge does not."""
    inputs = make_inputs(1, Hq, Hkv, T, T, 128, dtype=torch.bfloat16, seed=9)
    inputs[3] = inputs[3] * 0.05  # beta near 1 as the trained gates start (bias init 10): long-range attention
    got, exact = run_both(inputs)
    for name, g, e in zip(("out", "dq", "dk", "dv", "dlog_beta"), got, exact, strict=True):
        assert torch.isfinite(g).all(), name
        assert max_rel_error(g, e) < 2e-2, f"{name}: {max_rel_error(g, e):.3g}"


@gpu
def test_gpu_bf16_attention_left_padding():
    B, T = 2, 1000
    inputs = make_inputs(B, 16, 8, T, T, 128, dtype=torch.bfloat16, seed=10)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, :300] = False
    mask = (torch.ones(T, T, dtype=torch.bool).tril() & keep[:, None, None, :]).cuda()
    got, exact = run_both(inputs, mask)
    for name, g, e in zip(("out", "dq", "dk", "dv", "dlog_beta"), got, exact, strict=True):
        assert torch.isfinite(g).all(), name
        assert max_rel_error(g, e) < 2e-2, f"{name}: {max_rel_error(g, e):.3g}"
    assert got[0][1, :, :300].eq(0).all()


@gpu
def test_gpu_fp32_attention_exact():
    """fp32 inputs use IEEE fp32 dots: agreement to rounding."""
    got, exact = run_both(make_inputs(2, 8, 4, 777, 777, 64, seed=11))
    assert_all_close(got, exact, rtol=1e-3, atol=1e-3)


@gpu
def test_gpu_capacity_sums_long():
    lb = F.logsigmoid(torch.randn(2, 8, 16384, device="cuda") + 6).requires_grad_()  # beta ~ 0.998: S_t in the 100s
    exact_leaf = lb.detach().double().requires_grad_()
    S, exact = capacity_sums(lb), log_capacity(exact_leaf).exp().double()
    grad = torch.randn_like(S)
    S.backward(grad)
    exact.backward(grad.double())
    assert max_rel_error(S, exact) < 1e-5
    assert max_rel_error(lb.grad, exact_leaf.grad) < 1e-4


@gpu
def test_gpu_bf16_training_picks_triton(tmp_path, files):
    """The trainer's `auto` attention is trimkv_triton on a GPU with triton; bf16 training with checkpointing runs."""
    import json

    from test_train import config

    from trimkv.train.trainer import train

    cfg = config(files, tmp_path / "o", max_steps=3, grad_accum=2, gradient_checkpointing=True)
    assert train(cfg) == 0
    params = json.loads((tmp_path / "o" / "params.json").read_text())
    assert params["student_attention"] == "trimkv_triton" and params["dtype"] == "torch.bfloat16"
