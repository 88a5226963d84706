"""Decoding with a bounded cache in static shapes, captured in a CUDA graph on GPU (the gpt-fast recipe).

Stock `generate` runs every decode step as ~2,000 separate kernel launches from Python, and the dynamic
cache path reads counts back to the host each step, so decoding a small model is launch-bound. Here:

1. prefill is one ordinary forward (chunked by the cache's `prefill_chunk`, padding dropped);
2. the cache switches to static decode (`BoundedCache.begin_static_decode`): every tensor keeps its
   shape and address, the new token goes to each row's first free slot, attention spans all slots;
3. one decode step (model forward with its hooks) is captured as a CUDA graph and replayed; rows that
   filled their M + buffer slots are compressed by a second captured graph. Each row gains one token a
   step, so the host knows from the prefill counts when a row fills: nothing is read back per step,
   except the end-of-sequence check every `check_every` steps.

The tokens are those of `model.generate` with the same cache (greedy; sampled ones follow the same
distribution), proven on tiny models by tests/test_decode.py on CPU (the same code without capture) and
on the GPU by tests/test_gpu.py.
"""

from __future__ import annotations

import torch
from torch import nn

from trimkv import kernels
from trimkv.cache import BoundedCache
from trimkv.compat import generate_cache_kwarg


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0) -> torch.Tensor:
    """Next token per row from last-position logits (B, V): argmax, or a sample after temperature, top-k
    and top-p filtering (the order transformers applies them)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending, as transformers' TopPLogitsWarper
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


class StaticDecoder:
    """Drives a prefilled `BoundedCache` in static decode; `step(tokens)` returns next-token logits.

    graph=True captures the step (and compression) as CUDA graphs after `warmup` eager steps.
    compile=True first compiles the step with `torch.compile` (hooks and cache included, one graph): the
    ~70 small kernels of a layer's norms, rotary embedding, gate and cache update fuse into a few, which is
    what a captured step of a small-batch decode spends most of its time on. decode_linear (with graph=True on
    a GPU): the step's linear layers (fp16/bf16, at most 16 rows) run `trimkv.kernels.decode_linear` instead
    of cuBLAS, which reads the weights at about half the copy bandwidth at so few rows (docs/benchmarks.md:
    3.5% more tokens/s at 32K x 4 on an H100, 0.4% at 16K x 8).
    """

    def __init__(self, model: nn.Module, cache: BoundedCache, max_new_tokens: int, graph: bool = False,
                 warmup: int = 2, compile: bool = False, decode_linear: bool = True):
        self.model, self.cache, self.graph, self.warmup = model, cache, graph, warmup
        self.max_new_tokens = max_new_tokens
        self._run = torch.compile(self._forward) if compile else self._forward
        self.decode_linear = graph and decode_linear and kernels.available()
        self.counts = cache.begin_static_decode(max_new_tokens)  # the only host read of the cache
        self.full_at = (cache.memory_size + cache.buffer_size) if cache.memory_size is not None else None
        device = cache.count.device
        self.tokens = torch.zeros(len(self.counts), 1, dtype=torch.long, device=device)
        self.rows = torch.zeros(len(self.counts), dtype=torch.bool, device=device)
        self.cache_kwarg = generate_cache_kwarg(model)
        self.steps = 0
        self._step_graph = self._compress_graph = None
        self.logits: torch.Tensor | None = None
        self.compressions = 0

    def _step_forward(self) -> torch.Tensor:
        if not self.decode_linear:
            return self._run()
        from trimkv.kernels.decode_linear import decode_linears

        with decode_linears(self.model):  # the step's products at <= 16 rows: cuBLAS reads weights at ~half speed
            return self._run()

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.tokens, position_ids=self.cache.seen[:, None].clone(), use_cache=True,
                         **{self.cache_kwarg: self.cache})
        return out.logits[:, -1]

    def _on_side_stream(self, fn):
        """Run fn on a side stream, as CUDA-graph capture wants its warm-up runs."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = fn()
        torch.cuda.current_stream().wait_stream(side)
        return result

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        self._step_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._step_graph, pool=pool):
            self.logits = self._step_forward()
        if self.full_at is not None:
            self.rows.zero_()
            self._on_side_stream(lambda: self.cache.compress_full_rows(self.rows))  # a no-op: warm-up
            self._compress_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._compress_graph, pool=pool):
                self.cache.compress_full_rows(self.rows)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,), return the logits for the next one (B, V)."""
        if max(self.counts) >= self.cache.slots:  # only a cache that never evicts can run out of slots
            raise RuntimeError(f"static decode was set up for {self.max_new_tokens} new tokens; step {self.steps + 1} "
                               "would write past the cache's slots")
        self.tokens.copy_(tokens.view(-1, 1))
        if self._step_graph is None and self.graph and self.steps >= self.warmup:
            self._capture()  # capture records without running: the replay below runs this step
        if self._step_graph is not None:
            self._step_graph.replay()
        elif self.graph:
            self.logits = self._on_side_stream(self._step_forward)
        else:
            self.logits = self._run()
        self.cache.seen_total += 1  # host bookkeeping a replay does not do
        self.steps += 1
        self.counts = [c + 1 for c in self.counts]
        if self.full_at is not None:
            full = [c >= self.full_at for c in self.counts]
            if any(full):
                self.rows.copy_(torch.tensor(full), non_blocking=True)
                if self._compress_graph is not None:
                    self._compress_graph.replay()
                else:
                    self.cache.compress_full_rows(self.rows)
                self.compressions += 1
                self.counts = [self.cache.memory_size if f else c for c, f in zip(self.counts, full)]
        return self.logits

    def close(self) -> None:
        self.cache.end_static_decode()
        self._step_graph = self._compress_graph = None


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: BoundedCache,
             max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             graph: bool | None = None, compile: bool = False, check_every: int = 16) -> torch.Tensor:
    """`model.generate(input_ids, attention_mask=..., past_key_values=cache, max_new_tokens=...)` in static
    decode: returns (B, prompt width + new tokens), rows that ended padded with `pad_token_id` after their
    end-of-sequence token, and stops when every row has ended, as `generate` does.

    The cache may hold the first columns of input_ids already (it is fed the rest, as `generate` does).
    Left padding only (as for `generate` with decoder-only models). graph: capture CUDA graphs (default:
    when the model is on a GPU). top_k None takes the model's generation_config value when sampling, as
    `generate` does. compile: see `StaticDecoder` (pays a compilation per model and batch shape).
    """
    if not isinstance(cache, BoundedCache):
        raise TypeError(f"static decode needs a trimkv BoundedCache, got {type(cache).__name__}")
    start = cache.seen_total  # a cache may already hold a prefix of input_ids (a conversation's earlier turns)
    if start >= input_ids.shape[1]:
        raise ValueError(f"the cache already holds {start} columns of a {input_ids.shape[1]}-column input")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    graph = input_ids.device.type == "cuda" if graph is None else graph
    if do_sample and top_k is None:
        top_k = getattr(model.generation_config, "top_k", None)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0

    def pick(logits, done):
        token = sample_next(logits, do_sample, temperature, top_k, top_p)
        token = token.masked_fill(done, pad_token_id)
        return token, done | torch.isin(token, eos)

    positions = None
    if attention_mask is not None:  # a row's positions count its real tokens only, as in generate
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
    out = model(input_ids=input_ids[:, start:], attention_mask=attention_mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{generate_cache_kwarg(model): cache})
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    token, done = pick(out.logits[:, -1], done)
    generated, finished = [token], [done]
    decoder = StaticDecoder(model, cache, max_new_tokens, graph=graph, compile=compile)
    try:
        for i in range(1, max_new_tokens):
            if i % check_every == 0 and bool(done.all()):
                break
            token, done = pick(decoder.step(token), done)
            generated.append(token)
            finished.append(done)
    finally:
        decoder.close()
    new = torch.stack(generated, dim=1)
    # generate stops right after the step at which the last row ended
    all_done = torch.stack(finished, dim=1).all(0)
    n = int(all_done.nonzero()[0]) + 1 if bool(all_done.any()) else new.shape[1]
    return torch.cat([input_ids, new[:, :n]], dim=1)
