"""Decoding with a bounded cache in static shapes, captured in a CUDA graph on GPU (the gpt-fast recipe).

Stock `generate` runs every decode step as ~2,000 separate kernel launches from Python, and the dynamic
cache path reads counts back to the host each step, so decoding a small model is launch-bound. Here:

1. prefill is one ordinary forward (chunked by the cache's `prefill_chunk`, padding dropped);
2. the cache switches to static decode (`BoundedCache.begin_static_decode`): every tensor keeps its
   shape and address, the new token goes to each row's first free slot, attention spans all slots;
3. one decode step (model forward with its hooks) is captured as a CUDA graph and replayed; rows that
   filled their M + buffer slots are compressed by a second captured graph. Each row gains one token a
   step, so the host knows from the prefill counts when a row fills: nothing is read back per step,
   except the end-of-sequence check every `check_every` steps;
4. the linear layers that read the same input in a step (q, k, v and the retention gate's first layer; the
   MLP's gate and up) run as one product over their weights laid end to end (`SharedInput`): at 4-8 rows a
   product's time is reading its weights plus a fixed cost per kernel, so one product in place of four saves
   three fixed costs a layer. Which layers share an input is seen in the first step, not assumed per model.

The tokens are those of `model.generate` with the same cache (greedy; sampled ones follow the same
distribution), proven on tiny models by tests/test_decode.py on CPU (the same code without capture) and
on the GPU by tests/test_gpu.py.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn
from torch.nn import functional as F

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


TINY_WEIGHT = 1 << 16  # elements: a product this small (the gate's second layer) is a sum, not a matrix kernel


def on_side_stream(fn):
    """Run fn on a side stream, as CUDA-graph capture wants its warm-up runs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = fn()
    torch.cuda.current_stream().wait_stream(side)
    return result


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: bool) -> torch.Tensor:
    """F.linear, or with kernel=True where it fits (at most 16 fp16/bf16 rows on a GPU)
    `trimkv.kernels.decode_linear`. With kernel=True a weight of at most TINY_WEIGHT elements is a sum of products
    in fp32 instead, which torch.compile fuses into the operation that made x: the gate's second layer
    (n_kv_heads x 512) then costs no kernel of its own, where a matrix kernel would cost ~3 us a layer, nearly
    all of it fixed cost."""
    if kernel and weight.numel() <= TINY_WEIGHT:
        y = (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)
        return y if bias is None else y + bias
    if kernel:
        from trimkv.kernels.decode_linear import decode_linear, fits

        if fits(x, weight):
            y = decode_linear(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], -1)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class SharedInput:
    """Linear layers of one model that read the same input tensor in a forward, computed as one product: their
    weights (and biases) are laid end to end in one buffer, and each layer's parameters become views of its
    rows, so the model's values, parameters and memory stay as they were. `release` gives each layer its own
    storage back. kernel: a product of at most 16 fp16/bf16 rows on a GPU runs `trimkv.kernels.decode_linear`."""

    def __init__(self, linears: list[nn.Linear], kernel: bool = False):
        self.linears, self.kernel = linears, kernel
        self.sizes = [m.out_features for m in linears]
        self.weight = self._lay_end_to_end([m.weight for m in linears])
        biases = [m.bias for m in linears]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = self._lay_end_to_end(
                [b if b is not None else self.weight.new_zeros(n) for b, n in zip(biases, self.sizes)])
        self.input = self.outputs = None
        for i, m in enumerate(linears):
            m.__class__, m.shared, m.index = StepLinear, self, i

    def _lay_end_to_end(self, params: list[torch.Tensor]) -> torch.Tensor:
        if len(params) == 1:
            return params[0].detach()
        joined = torch.cat([p.detach() for p in params])
        for p, rows in zip(params, joined.split(self.sizes)):
            if isinstance(p, nn.Parameter):  # a bias filled in with zeros is no parameter
                p.data = rows
        return joined

    def product(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear(x, self.weight, self.bias, self.kernel).split(self.sizes, -1)

    def release(self) -> None:
        for m in self.linears:
            if len(self.linears) > 1:
                m.weight.data = m.weight.data.clone()
                if m.bias is not None:
                    m.bias.data = m.bias.data.clone()
            m.__class__ = nn.Linear
            del m.shared, m.index
        self.weight = self.bias = self.input = self.outputs = None


class StepLinear(nn.Linear):
    """The class of a decode step's `nn.Linear` layers while a `SharedInput` holds them (listed in the order the
    step calls them): the first computes the group's product, the others take their slice of it if they are
    called on the same input (by identity), and otherwise compute their own. Once the last took its slice the
    group forgets the input, so under torch.compile nothing is left over between steps to guard on."""

    shared: SharedInput
    index: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Linear's argument name, for keyword calls
        s = self.shared
        if self.index == 0:
            s.input, s.outputs = input, s.product(input)
        elif s.input is not input:
            return linear(input, self.weight, self.bias, s.kernel)
        y = s.outputs[self.index]
        if self.index == len(s.sizes) - 1:
            s.input = s.outputs = None
        return y


def shared_inputs(model: nn.Module, forward) -> tuple[object, list[list[nn.Linear]]]:
    """Run forward() once and see which plain `nn.Linear` layers of model read the same input tensor: returns
    forward's result and the groups, each in call order (the gate's linear1 with q, k and v; the MLP's gate and
    up; every other layer alone). A layer called more than once or never, or whose weight differs in dtype,
    width or device from its group's first, stays alone."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    inputs: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in linears}  # held, so no id is reused
    called: list[nn.Module] = []

    def record(m, args):
        inputs[m].append(args[0] if args else object())  # called by keyword: shares with nothing
        called.append(m)

    hooks = [m.register_forward_pre_hook(record) for m in linears]
    try:
        result = forward()
    finally:
        for h in hooks:
            h.remove()
    by_input: dict[int, list[nn.Linear]] = {}
    groups = []
    for m in dict.fromkeys(called + linears):  # in call order, then the layers never called
        group = by_input.setdefault(id(inputs[m][0]), []) if len(inputs[m]) == 1 else []
        first = group[0] if group else m
        if (m.weight.dtype, m.in_features, m.weight.device) == (first.weight.dtype, first.in_features,
                                                                first.weight.device) and m.weight.is_contiguous():
            group.append(m)
            if len(group) == 1:
                groups.append(group)
        else:
            groups.append([m])
    return result, groups


class StaticDecoder:
    """Drives a prefilled `BoundedCache` in static decode; `step(tokens)` returns next-token logits.

    graph=True captures the step (and compression) as CUDA graphs after `warmup` eager steps.
    compile=True first compiles the step with `torch.compile` (hooks and cache included, one graph): the
    ~70 small kernels of a layer's norms, rotary embedding, gate and cache update fuse into a few, which is
    what a captured step of a small-batch decode spends most of its time on. The first step runs plain and finds
    the linear layers that share an input (`shared_inputs`); later steps run each group as one product
    (`SharedInput`), and `close` gives the layers back as they were. decode_linear (with graph=True on a GPU):
    the products of the step (fp16/bf16, at most 16 rows) run `trimkv.kernels.decode_linear` instead of cuBLAS,
    which reads the weights at 81-82% of the copy bandwidth at so few rows against the kernel's 87-88% (H100,
    docs/benchmarks.md), and the smallest (the gate's second layer) become sums that compile fuses (`linear`).
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
        self.shared: list[SharedInput] | None = None  # set by the first step

    def _first_forward(self) -> torch.Tensor:
        if any(type(m) is StepLinear for m in self.model.modules()):  # its graphs would read our layers' buffers
            raise RuntimeError("another StaticDecoder holds this model's linear layers: close() it first (or use "
                               "`with StaticDecoder(...) as decoder:`)")
        logits, groups = shared_inputs(self.model, self._forward)
        self.shared = [SharedInput(group, kernel=self.decode_linear) for group in groups]
        return logits

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.tokens, position_ids=self.cache.seen[:, None].clone(), use_cache=True,
                         **{self.cache_kwarg: self.cache})
        return out.logits[:, -1]

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        self._step_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._step_graph, pool=pool):
            self.logits = self._run()
        if self.full_at is not None:
            self.rows.zero_()
            on_side_stream(lambda: self.cache.compress_full_rows(self.rows))  # a no-op: warm-up
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
        run = self._first_forward if self.shared is None else self._run
        if self._step_graph is not None:
            self._step_graph.replay()
        elif self.graph:
            self.logits = on_side_stream(run)
        else:
            self.logits = run()
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End static decode: the cache goes back to the dynamic path and the model's layers to what they were."""
        self.cache.end_static_decode()
        self._step_graph = self._compress_graph = None
        for group in self.shared or []:
            group.release()
        self.shared = None


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
