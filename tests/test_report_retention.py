"""`report retention` on a tiny random gated model: heatmap values, recorded eviction decisions, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import save_tiny_model, save_tiny_tokenizer
from test_cache import randomize_gates
from transformers import AutoModelForCausalLM, AutoTokenizer

import trimkv
from trimkv.cli import main as trimkv_main
from trimkv.compat import generate_cache_kwarg


def main(argv):
    return trimkv_main(["report", *argv])
from trimkv.report.retention import eviction_matrix, parse_indices, retention_matrix, trace

TEXT = " ".join(f"w{4 + (i * 7) % 90}" for i in range(40))  # 40 tokens of the tiny vocabulary
M, BUFFER, NEW = 8, 2, 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    base = save_tiny_model(root / "base", "qwen3")
    save_tiny_tokenizer(base)
    model = randomize_gates(trimkv.attach_gates(AutoModelForCausalLM.from_pretrained(base)))
    trimkv.save_gates(model, root / "gates", base_model=str(base), extra={"memory_size": M, "buffer_size": BUFFER})
    return root


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model = trimkv.load_pretrained(checkpoint / "gates").eval()
    return model, AutoTokenizer.from_pretrained(model.trimkv_source["base_model"])


def test_retention_matrix_is_beta_to_the_distance():
    log_beta = [math.log(0.5), math.log(0.9), 0.0]
    a = retention_matrix(log_beta)
    assert math.isnan(a[0, 1]) and math.isnan(a[1, 2])  # above the diagonal: no entry
    assert a[0, 0] == a[1, 1] == a[2, 2] == 1.0
    assert a[2, 0] == pytest.approx(0.25) and a[2, 1] == pytest.approx(0.9)


def test_trace_records_the_cache_after_every_pass(loaded):
    model, tokenizer = loaded
    result = trace(model, tokenizer, TEXT, layers=[0, 1], heads=[0, 1], memory_size=M, buffer_size=BUFFER,
                   max_new_tokens=NEW)
    assert result.prompt_len == 40 and len(result.ids) == 40 + NEW and len(result.tokens) == len(result.ids)
    assert result.steps == list(range(40, 40 + NEW))  # prefill, then one pass per generated token but the last
    assert result.seen == 40 + NEW - 1
    for (layer, head), passes in ((p, result.kept[f"{p[0]},{p[1]}"]) for p in result.panels):
        assert len(passes) == len(result.steps)
        previous = None
        for seen, kept in zip(result.steps, passes):
            assert 0 < len(kept) <= M + BUFFER and all(0 <= p < seen for p in kept)
            if previous is not None:  # an evicted token never comes back
                assert set(kept) - set(range(previous[0], seen)) <= set(previous[1])
            previous = (seen, kept)
        m = eviction_matrix(result, layer, head)
        assert (m == 2).sum(axis=1).tolist() == [len(k) for k in passes]

    # the last record is the cache's own final state, as an independent run shows
    ids = torch.tensor([result.ids[:40]])
    cache = trimkv.make_cache("trimkv", memory_size=M, buffer_size=BUFFER)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                             pad_token_id=0, **{generate_cache_kwarg(model): cache})
    assert out[0].tolist() == result.ids
    for layer, head in result.panels:
        kept = cache.kept_positions(layer)[0, head]
        assert sorted(kept[kept >= 0].tolist()) == result.kept[f"{layer},{head}"][-1]

    log_beta = trimkv.retention(model, out)
    assert result.log_beta["1,0"] == pytest.approx(log_beta[1][0, :, 0].tolist(), abs=1e-6)
    assert len(result.kept_fraction) == len(result.ids) and result.kept_fraction[-1] is None  # never fed back
    assert all(0.0 <= f <= 1.0 for f in result.kept_fraction[:-1])


def test_chunked_prefill_shows_eviction_during_the_prompt(loaded):
    model, tokenizer = loaded
    result = trace(model, tokenizer, TEXT, layers=[0], heads=[1], memory_size=M, buffer_size=0, max_new_tokens=3,
                   prefill_chunk=16)
    assert result.steps == [16, 32, 40, 41, 42]
    assert all(len(kept) == M for kept in result.kept["0,1"])


def test_cli_writes_heatmap_eviction_and_text(checkpoint, capsys):
    out = checkpoint / "figures"
    assert main(["retention", "--model", str(checkpoint / "gates"), "--text", TEXT, "--layers", "0,1",
                 "--heads", "all", "--max-new-tokens", "6", "--out", str(out)]) == 0
    for name in ("retention_heatmap.png", "retention_heatmap.pdf", "eviction.png", "eviction.pdf",
                 "retained_tokens.png"):
        assert (out / name).stat().st_size > 5000, name
    html = (out / "retained_tokens.html").read_text()
    assert html.count("<section>") == 2 * 2 + 1  # (layer, head) pairs and the all-layers block
    assert html.count("<span") >= 5 * 46 and "w11" in html
    data = json.loads((out / "retention.json").read_text())
    assert data["memory_size"] == M and data["buffer_size"] == BUFFER  # the checkpoint's values
    assert data["layers"] == [0, 1] and data["heads"] == [0, 1]
    (checkpoint / "prompt.txt").write_text(TEXT)
    assert main(["retention", "--model", str(checkpoint / "gates"), "--input-file", str(checkpoint / "prompt.txt"),
                 "--layers", "5", "--out", str(out)]) == 2
    assert "--layers '5': the model has 2 layers" in capsys.readouterr().err


def test_parse_indices():
    assert parse_indices("all", 3, "heads") == [0, 1, 2]
    assert parse_indices("2,0-1", 4, "layers") == [0, 1, 2]
    with pytest.raises(ValueError, match="expected 'all'"):
        parse_indices("x", 4, "layers")
