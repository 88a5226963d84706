"""Static decode (trimkv.decode) gives the tokens of stock generate with the same cache, for every policy and
model family, with eviction, buffers of any size, chunked prefill, left padding and early stopping. On CPU the
same code runs without graph capture; tests/test_gpu.py replays it as CUDA graphs.

The models run in float64: static decode attends over all slots (empty ones masked), the dynamic path over the
filled ones, and a matrix product's rounding depends on its length; in fp32 that ~1e-6 difference flips argmax
near-ties of these random tiny models, in fp64 it does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES
from test_cache import gated, generate, left_padded

import trimkv
from trimkv.decode import StaticDecoder, sample_next
from trimkv.decode import generate as static_generate

POLICIES = sorted(trimkv.POLICIES)


@pytest.fixture(scope="module")
def models():
    return {family: gated(family).double() for family in FAMILIES}


def both(model, ids, mask, max_new_tokens=24, **cache_kw):
    stock = generate(model, ids, mask, trimkv.make_cache(**cache_kw), max_new_tokens=max_new_tokens)
    ours = static_generate(model, ids, mask, trimkv.make_cache(**cache_kw), max_new_tokens, graph=False)
    return stock, ours


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_matches_stock_generate_with_eviction(models, policy):
    ids, mask = left_padded([23, 17, 9])
    for memory_size, buffer_size, chunk in [(6, 2, None), (5, 0, 7), (8, 5, None)]:
        kw = dict(policy=policy, memory_size=memory_size, buffer_size=buffer_size, prefill_chunk=chunk)
        stock, ours = both(models["qwen3"], ids, mask, **kw)
        assert torch.equal(ours, stock), kw


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_stock_generate(models, family):
    ids, mask = left_padded([14, 20])
    for policy in ("trimkv", "full", "snapkv", "streaming"):
        stock, ours = both(models[family], ids, mask, policy=policy, memory_size=6, buffer_size=3)
        assert torch.equal(ours, stock), policy


def test_state_stays_in_place_and_rows_compress_on_time(models):
    """What a CUDA graph relies on: every cached tensor keeps its address across steps (a replay writes
    where the capture wrote), and the host's count of each row matches the cache's."""
    model = models["qwen3"]
    ids, mask = left_padded([13, 6])
    cache = trimkv.make_cache("snapkv", memory_size=5, buffer_size=3)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=cache)
    decoder = StaticDecoder(model, cache, max_new_tokens=20)

    def addresses():
        layers = [[t.data_ptr() for t in layer.tensors().values()] + [layer.queries.data_ptr()] for layer in cache.layers]
        return layers, cache.count.data_ptr(), cache.seen.data_ptr()

    before = addresses()
    token = torch.tensor([5, 7])
    with torch.no_grad():
        for _ in range(19):
            token = decoder.step(token).argmax(-1)
            assert cache.count.tolist() == decoder.counts
            assert max(decoder.counts) < 5 + 3
    assert addresses() == before
    assert decoder.compressions >= 19 // 3 - 1
    decoder.close()
    assert cache.seen_total == ids.shape[1] + 19


def test_stops_when_every_row_ended_like_generate(models):
    model = models["qwen3"]
    ids, mask = left_padded([10, 12])
    greedy = static_generate(model, ids, mask, trimkv.make_cache("full"), 30, graph=False)
    eos = int(greedy[0, ids.shape[1] + 3])  # the token row 0 emits 4th: make it the end of sequence
    stock = generate(model, ids, mask, trimkv.make_cache("full"), max_new_tokens=30, eos_token_id=eos,
                     pad_token_id=0)
    ours = static_generate(model, ids, mask, trimkv.make_cache("full"), 30, eos_token_id=eos, pad_token_id=0,
                           graph=False, check_every=4)
    assert torch.equal(ours, stock)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1)
    assert sample_next(logits, False).tolist() == [3]
    torch.manual_seed(0)
    draws = torch.stack([sample_next(logits, True, top_k=2) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {2, 3}
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    draws = torch.stack([sample_next(p, True, top_p=0.75) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75: the rest is cut


def test_clear_errors(models):
    model = models["qwen3"]
    ids, mask = left_padded([5])
    with pytest.raises(TypeError, match="BoundedCache"):
        static_generate(model, ids, mask, None, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        static_generate(model, ids, mask, trimkv.make_cache("full"), 0)


def test_continues_a_cache_that_holds_a_prefix(models):
    """A conversation's next turn: the cache holds the earlier columns, generate is handed all of them."""
    model = models["qwen3"]
    ids, _ = left_padded([30])
    results = []
    for run in ("stock", "static"):
        cache = trimkv.make_cache("trimkv", memory_size=8, buffer_size=4)
        with torch.no_grad():
            model(input_ids=ids[:, :20], attention_mask=torch.ones(1, 20, dtype=torch.long), use_cache=True,
                  past_key_values=cache)
        mask = torch.ones_like(ids)
        if run == "stock":
            results.append(generate(model, ids, mask, cache, max_new_tokens=12))
        else:
            results.append(static_generate(model, ids, mask, cache, 12, graph=False))
    assert torch.equal(results[1], results[0])


def test_a_full_cache_set_up_for_n_tokens_refuses_more_and_a_model_takes_one_decoder_at_a_time(models):
    model = models["qwen3"]
    ids, _ = left_padded([10])
    cache = trimkv.make_cache("full")
    with torch.no_grad():
        token = model(input_ids=ids, use_cache=True, past_key_values=cache).logits[:, -1].argmax(-1)
        with StaticDecoder(model, cache, max_new_tokens=3) as decoder:
            for _ in range(3):
                token = decoder.step(token).argmax(-1)
            with pytest.raises(RuntimeError, match="past the cache's slots"):
                decoder.step(token)
            other = trimkv.make_cache("full")  # a second decoder on the model while this one holds it
            model(input_ids=ids, use_cache=True, past_key_values=other)
            with pytest.raises(RuntimeError, match="close"):
                StaticDecoder(model, other, max_new_tokens=1).step(token)


SHARED = {  # per family, layer 0's layers that read one input in a decode step, in call order (the gate runs first)
    "phi3": [["self_attn.retention_gate.linear1", "self_attn.qkv_proj"]],  # gate_up_proj is fused already
    **{family: [["self_attn.retention_gate.linear1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["mlp.gate_proj", "mlp.up_proj"]] for family in ("llama", "mistral", "qwen2", "qwen3")},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_groups_the_layers_that_share_an_input_and_close_gives_them_back(models, family):
    """The first step finds q, k, v and the gate's first layer (one input), and the MLP's gate and up; while
    decoding their parameters are views of one buffer, and close() leaves every layer a plain nn.Linear with its
    own storage, the same parameter objects and the same values."""
    model = models[family]
    names = {m: name for name, m in model.named_modules()}
    params = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    ids, mask = left_padded([9, 7])
    cache = trimkv.make_cache("trimkv", memory_size=6, buffer_size=2)
    with torch.no_grad():
        token = model(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=cache).logits[:, -1]
        decoder = StaticDecoder(model, cache, max_new_tokens=4)
        for _ in range(3):
            token = decoder.step(token.argmax(-1))
    groups = [[names[m].removeprefix("model.layers.0.") for m in group.linears] for group in decoder.shared
              if len(group.linears) > 1 and names[group.linears[0]].startswith("model.layers.0.")]
    assert sorted(groups) == sorted(SHARED[family])
    shared = next(g for g in decoder.shared if len(g.linears) > 1)
    assert {m.weight.untyped_storage().data_ptr() for m in shared.linears} == {shared.weight.data_ptr()}
    decoder.close()
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    for name, p in model.named_parameters():
        assert p is params[name][0] and torch.equal(p, params[name][1]), name
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name  # its own storage again


def test_shared_input_product_equals_each_layer_and_another_input_is_computed_alone():
    """Three layers (two with a bias, one without) as one product: each gets what it computes alone. A layer
    after the first, called on another input, computes its own product; the group keeps nothing once each layer
    took its slice."""
    from trimkv.decode import SharedInput, StepLinear

    g = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(6, n, bias=b).double() for n, b in ((4, True), (3, False), (5, True))]
    for m in layers:
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
    x, y = torch.randn(2, 6, dtype=torch.float64, generator=g), torch.randn(2, 6, dtype=torch.float64, generator=g)
    alone = [m(x) for m in layers]
    shared = SharedInput(layers)
    assert all(type(m) is StepLinear for m in layers)
    got = [m(x) for m in layers]
    for a, b in zip(got, alone):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert shared.input is None and shared.outputs is None
    first = layers[0](x)
    torch.testing.assert_close(layers[1](y), y @ layers[1].weight.T, rtol=1e-12, atol=1e-12)  # not x: its own
    torch.testing.assert_close(layers[1](input=x), alone[1], rtol=1e-12, atol=1e-12)  # x: the group's slice
    torch.testing.assert_close(first, alone[0], rtol=1e-12, atol=1e-12)
    shared.release()
    assert all(type(m) is torch.nn.Linear for m in layers)


def test_shared_input_traces_whole_under_compile():
    """torch.compile takes the grouped layers in one graph (fullgraph) and keeps no state between calls: new
    inputs neither break the graph nor recompile it."""
    from trimkv.decode import SharedInput

    q, k, o = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(12, 3)
    SharedInput([q, k]), SharedInput([o])

    def forward(x):
        h = x * 2
        return o(torch.cat([q(h), k(h)], -1))

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for seed in range(3):
            h = 2 * torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
            expected = F.linear(torch.cat([F.linear(h, q.weight, q.bias), h @ k.weight.T], -1), o.weight, o.bias)
            torch.testing.assert_close(compiled(h / 2), expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_a_tiny_product_is_a_sum_that_gives_the_linear_layer():
    """With kernel=True a weight of at most TINY_WEIGHT elements (the gate's second layer) is computed as a sum of
    products in fp32, which compile fuses into what came before: it gives F.linear's values, with and without a
    bias, in the input's dtype."""
    from trimkv.decode import TINY_WEIGHT, linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 512, generator=g, dtype=torch.float64)
    w, b = torch.randn(8, 512, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    assert w.numel() <= TINY_WEIGHT
    torch.testing.assert_close(linear(x, w, b, kernel=True), F.linear(x, w, b), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(linear(x, w, None, kernel=True), F.linear(x, w), rtol=1e-6, atol=1e-5)
    half = linear(x.bfloat16(), w.bfloat16(), None, kernel=True)
    assert half.dtype == torch.bfloat16 and half.shape == (4, 1, 8)
    torch.testing.assert_close(half.double(), F.linear(x.bfloat16().double(), w.bfloat16().double()), rtol=1e-2,
                               atol=5e-2)
