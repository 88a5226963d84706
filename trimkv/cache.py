"""A KV cache with a hard memory bound, as a transformers `Cache` that stock `generate` drives.

Storage: each layer preallocates `memory_size + buffer_size` slots per (sequence, KV head) for keys,
values, original positions and the per-token signals the policy needs (e.g. log beta). Slots of a
row are compacted: entries [0, count_b) are its cached tokens in position order, the rest are empty.
Every layer and head of a row holds the same count (eviction keeps top-M per head), so one attention
mask serves the whole model.

Mechanics (one forward pass = prefill chunk or decode step), following the released TRIM-KV code:
1. the new tokens of a row (padding dropped: padding never occupies budget) go after its cached
   ones; attention sees all of them;
2. after each layer attended, the policy updates its signals from the layer's queries if it uses
   them, and a row whose count reached `memory_size + buffer_size` is compressed back to
   `memory_size`: per KV head the top-M by the policy's score, `sink` first and `window` last tokens
   forced in, ties broken by position.
New tokens that fit in the free slots are written in place; a prompt chunk that does not fit is
attended as a transient union of cached + new keys and compressed into the slots right after that
layer's attention, so storage never grows. `prefill_chunk` bounds that union for long prompts.

Because kept positions are no longer contiguous, the model's own mask cannot describe the cache: the
hooks installed by `trimkv.prepare(model)` hand the cache the 2-D padding mask at the start of each
forward and pass the 4-D mask it builds (`begin_forward`) to every layer.

Static decode (`begin_static_decode`, driven by `trimkv.decode`): after prefill, decode passes read no
value back to the host and keep every tensor at a fixed address and shape, so a step can be captured in
a CUDA graph: attention spans all slots (empty ones masked), the new token is scattered to each row's
first free slot, state is updated in place, and compression runs as a separate call
(`compress_full_rows`) for the rows the host knows are full (every row gains one token a step). The
result is the same as the dynamic path's, step for step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from trimkv.policies import POLICIES, CacheView, Policy, get_policy

GROW = 256  # an unbounded (full) cache grows its slots in steps of at least this many, doubling


@dataclass
class _Plan:
    """What one forward pass does to every layer; the same for all layers."""

    order: torch.Tensor  # (B, q) indices of the new tokens, real ones first in order
    n_real: torch.Tensor  # (B,) real new tokens per row
    count_before: torch.Tensor  # (B,) cached entries per row before this pass
    count_union: torch.Tensor  # (B,) entries attended this pass
    compress: torch.Tensor  # (B,) rows compressed back to memory_size after this pass
    width: int  # K, key length returned to attention
    all_real: bool  # no padding among the new tokens
    t: torch.Tensor  # (B, 1, 1) tokens seen after this pass + 1: the step scores are taken at
    seen_after: torch.Tensor  # (B,)


class SlotLayer(CacheLayerMixin):
    """One layer's slots. Plain tensors; the owning BoundedCache does all the bookkeeping."""

    is_sliding = False

    def __init__(self, index: int):
        super().__init__()
        self.index = index  # the decoder layer it caches, for policies that score per layer
        self.positions: torch.Tensor | None = None  # (B, H, S) long
        self.extras: dict[str, torch.Tensor] = {}  # name -> (B, H, S) float32
        self.queries: torch.Tensor | None = None  # (B, H_q, W, D) recent real queries, right-aligned
        self.query_positions: torch.Tensor | None = None  # (B, W), -1 = none yet
        self.pass_queries: tuple[torch.Tensor, float] | None = None  # this pass's queries and scaling
        self.pending: dict[str, torch.Tensor] | None = None  # transient union awaiting eviction
        self.scaling = 1.0  # the layer's softmax scale, last seen with its queries

    def lazy_initialization(self, key_states, value_states, slots: int = 0, extras=()) -> None:
        B, H, _, D = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states.new_zeros(B, H, slots, D)
        self.values = value_states.new_zeros(B, H, slots, value_states.shape[-1])
        self.positions = torch.full((B, H, slots), -1, dtype=torch.long, device=self.device)
        self.extras = {name: torch.zeros(B, H, slots, device=self.device) for name in extras}
        self.is_initialized = True

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "positions": self.positions, **self.extras}

    def assign(self, tensors: dict[str, torch.Tensor]) -> None:
        self.keys, self.values, self.positions = tensors["keys"], tensors["values"], tensors["positions"]
        self.extras = {k: v for k, v in tensors.items() if k not in ("keys", "values", "positions")}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values()) if self.is_initialized else 0

    # The owning cache implements the transformers entry points; a layer on its own is not usable.
    def update(self, *args, **kwargs):
        raise RuntimeError("SlotLayer is driven by BoundedCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots + query_length, 0

    def get_seq_length(self) -> int:
        raise RuntimeError("use BoundedCache.get_seq_length")

    def get_max_length(self) -> int:
        return self.slots


def _gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, H, N[, D]) gathered along N with index (B, H, M) -> (B, H, M[, D])."""
    if t.dim() == 4:
        index = index.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])
    return t.gather(2, index)


class BoundedCache(Cache):
    """See the module docstring. Build it with `trimkv.make_cache`."""

    is_compileable = False

    def __init__(self, policy: Policy, memory_size: int | None, buffer_size: int = 0, sink: int = 0, window: int = 0,
                 prefill_chunk: int | None = None):
        super().__init__(layers=[])
        self.policy = policy
        self.prefill_chunk = prefill_chunk
        self.memory_size = memory_size if policy.bounded and not policy.stores_all else None  # None: keep every token
        self.budget = memory_size if policy.bounded else None  # M as given; what `policy.select` reads within
        self.buffer_size = buffer_size
        self.sink, self.window = sink, window
        self.seen_total = 0  # columns processed, padding included: what generate slices inputs by
        self.seen: torch.Tensor | None = None  # (B,) real tokens seen per row
        self.count: torch.Tensor | None = None  # (B,) entries cached per row, every layer and head
        self._plan: _Plan | None = None
        self._staged: dict[int, dict[str, torch.Tensor]] = {}
        self.static = False  # static decode mode, see the module docstring

    # ---- what the model hooks call ----

    def begin_forward(self, attention_mask: torch.Tensor | None, batch: int, q_len: int, device, mask_format: str,
                      dtype: torch.dtype) -> torch.Tensor:
        """Plan this pass from the 2-D padding mask and return the 4-D attention mask for every layer."""
        if self._plan is not None:
            raise RuntimeError("BoundedCache: a forward pass began before the previous one ended")
        real = torch.ones(batch, q_len, dtype=torch.bool, device=device)
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("BoundedCache needs a 2-D padding mask (batch, seen + new), not a prepared 4-D mask")
            real = attention_mask[:, -q_len:].to(device=device, dtype=torch.bool)
        if self.seen is None:
            self.seen = torch.zeros(batch, dtype=torch.long, device=device)
            self.count = torch.zeros(batch, dtype=torch.long, device=device)
        elif self.seen.shape[0] != batch:
            raise ValueError(f"BoundedCache holds a batch of {self.seen.shape[0]}, got {batch}; use a new cache")

        n_real = real.sum(1)
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        count_union = self.count + n_real
        if self.static:  # one real token per row, attention over every slot, compression done apart
            if q_len != 1 or attention_mask is not None:
                raise ValueError("a BoundedCache in static decode takes one token per row and no padding mask")
            width, all_real = self.layers[0].slots, True
            compress = torch.zeros_like(count_union, dtype=torch.bool)
        else:
            width, all_real = max(int(count_union.max()), 1), bool(real.all())
            if self.memory_size is None:
                compress = torch.zeros_like(count_union, dtype=torch.bool)
            else:
                compress = count_union >= self.memory_size + self.buffer_size
        seen_after = self.seen + n_real
        self._plan = _Plan(order, n_real, self.count, count_union, compress, width, all_real,
                           (seen_after + 1).view(-1, 1, 1), seen_after)

        # Query j of row b sees its cached entries and the row's real new tokens up to itself. A padding
        # query sees at least one slot so no softmax row is empty (its output is discarded anyway).
        upto = self.count[:, None] + real.long().cumsum(1)  # (B, q)
        upto = upto.clamp(min=1)
        allowed = torch.arange(width, device=device)[None, None, :] < upto[:, :, None]  # (B, q, K)
        allowed = allowed[:, None]  # (B, 1, q, K)
        if mask_format == "bool":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)

    def stage(self, layer_idx: int, name: str, value: torch.Tensor) -> None:
        """Per-token signal for the new tokens of this pass, (B, q, H_kv), e.g. the gate's log beta."""
        self._staged.setdefault(layer_idx, {})[name] = value

    def observe_queries(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        """The layer's queries of this pass, (B, H_q, q, D), for policies that score with attention."""
        if self.policy.query_window or self.policy.state:
            self.layers[layer_idx].pass_queries = (query, scaling)
            self.layers[layer_idx].scaling = scaling

    def layer_mask(self, module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mask `module` attends with: the pass's 4-D mask, narrowed to the keys the policy's `select` reads
        (a policy that reads part of what it stores: seerattn_r); unchanged for every other policy."""
        keep = self.policy.select(module, query, key, self.seen, self.budget)
        if keep is None:
            return mask
        if mask.dtype == torch.bool:
            return mask & keep
        return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)

    def after_attention(self, layer_idx: int) -> None:
        """After the layer attended: update the policy's signals, then evict rows that are full."""
        plan, layer = self._plan, self.layers[layer_idx]
        candidates = layer.pending if layer.pending is not None else layer.tensors()
        scaling = 1.0
        if layer.pass_queries is not None:
            query, scaling = layer.pass_queries
            layer.pass_queries = None
            B, Hq, q, D = query.shape
            queries = query.gather(2, plan.order[:, None, :, None].expand(B, Hq, q, D))  # real ones first
            j = torch.arange(q, device=query.device)
            positions = torch.where(j < plan.n_real[:, None], self.seen[:, None] + j, -1)  # (B, q)
            if self.policy.state:
                self.policy.observe(self._view(candidates, plan, scaling, layer), queries, positions)
            if self.policy.query_window:
                self._push_queries(layer, queries, positions, plan)
        if self.memory_size is not None and not self.static and bool(plan.compress.any()):
            self._compress_into(layer, candidates, plan, scaling)
        layer.pending = None

    def end_forward(self) -> None:
        plan = self._plan
        if plan is None:
            return
        if any(layer.pending is not None for layer in self.layers):
            raise RuntimeError("BoundedCache: a layer attended without its after-attention hook (trimkv.prepare)")
        count = plan.count_union
        if self.memory_size is not None:
            count = torch.where(plan.compress, torch.full_like(count, self.memory_size), count)
        # in place: a captured decode step must leave its state where the next replay reads it
        self.count.copy_(count)
        self.seen.copy_(plan.seen_after)
        if not self.static:  # static decode: the decoder counts, as a graph replay runs no Python
            self.seen_total += plan.order.shape[1]
        self._plan = None
        self._staged.clear()

    # ---- static decode (trimkv.decode) ----

    def begin_static_decode(self, max_new_tokens: int) -> list[int]:
        """Switch to static decode after prefill; returns each row's cached count (the one host read).

        Makes room for what decoding will need (a bounded cache: one token beyond M + buffer at most; the
        full cache: every token still to come), so no decode step reallocates.
        """
        if self.count is None or not self.layers:
            raise RuntimeError("static decode starts after a prefill pass")
        counts = self.count.tolist()
        if self.memory_size is not None:
            needed = max(self.memory_size + self.buffer_size, self.memory_size + 1, max(counts) + 1)
        else:
            needed = max(counts) + max_new_tokens
        for layer in self.layers:
            # the full cache also sheds the spare slots its doubling left: a static step reads every slot
            if layer.slots < needed or (self.memory_size is None and layer.slots > needed):
                self._resize(layer, needed)
        self.static = True
        return counts

    def end_static_decode(self) -> None:
        self.static = False

    def compress_full_rows(self, rows: torch.Tensor) -> None:
        """Compress the rows marked in `rows` (B,) bool back to M in every layer, as the dynamic path does
        right after the pass that filled them (same scores: the queries and signals of that pass).
        Static shapes and no host read, so it can be captured too."""
        seen = self.seen
        plan = _Plan(order=seen[:, None], n_real=torch.zeros_like(seen), count_before=self.count,
                     count_union=self.count, compress=rows, width=self.layers[0].slots, all_real=True,
                     t=(seen + 1).view(-1, 1, 1), seen_after=seen)
        for layer in self.layers:
            self._compress_into(layer, layer.tensors(), plan, layer.scaling)
        self.count.masked_fill_(rows, self.memory_size)

    # ---- transformers Cache API ----

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        plan = self._plan
        if plan is None:
            raise RuntimeError(
                "BoundedCache was called by a model without trimkv hooks: "
                "call trimkv.prepare(model) (or trimkv.attach_gates / trimkv.load_pretrained) first"
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(SlotLayer(len(self.layers)))
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states, self._initial_slots(plan.width),
                                     self.policy.needs + self.policy.state)
        new = self._new_tokens(layer_idx, key_states, value_states, plan)

        if plan.width > layer.slots and self.memory_size is None:
            self._grow(layer, plan.width)
        if plan.width <= layer.slots:
            if plan.all_real:  # decode: write each row's new tokens to its first free slots
                # index_put_, not scatter_: torch.compile writes it in place, where a scatter_ on the cache
                # became a copy of every slot of the layer (keys and values) each decode step
                B, H, q = key_states.shape[:3]
                arange = functools.partial(torch.arange, device=key_states.device)
                index = (arange(B)[:, None, None], arange(H)[None, :, None],
                         (plan.count_before[:, None] + arange(q))[:, None, :])  # broadcast to (B, H, q)
                for name, stored in layer.tensors().items():
                    stored.index_put_(index, new[name])
            else:
                merged = self._merge(layer, new, plan)
                for name, stored in layer.tensors().items():
                    stored[:, :, : plan.width].copy_(merged[name])
            return layer.keys[:, :, : plan.width], layer.values[:, :, : plan.width]

        # Does not fit: attend the transient union; after attention it is compressed into the slots.
        layer.pending = self._merge(layer, new, plan)
        return layer.pending["keys"], layer.pending["values"]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_total

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *args) -> tuple[int, int]:
        # Not used for masking (the hooks pass a prepared 4-D mask); sizes of what update returns.
        held = int(self.count.max()) if self.count is not None else 0
        return held + (query_length if isinstance(query_length, int) else query_length.shape[-1]), 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.memory_size is None else self.memory_size + self.buffer_size

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers < 5.20 name
        return self.get_max_length(layer_idx)

    def reset(self) -> None:
        self.layers, self.seen, self.count, self.seen_total = [], None, None, 0  # a fresh start, same settings
        self._plan, self._staged = None, {}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("BoundedCache cannot be cropped (assisted decoding is not supported)")

    # ---- inspection ----

    @property
    def slots(self) -> int:
        return self.layers[0].slots if self.layers else 0

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """(B, H_kv, n) original positions still cached in `layer_idx`, ascending; -1 pads short rows."""
        layer = self.layers[layer_idx]
        n = int(self.count.max())
        positions = layer.positions[:, :, :n]
        empty = torch.arange(n, device=positions.device)[None, None, :] >= self.count[:, None, None]
        return positions.masked_fill(empty, -1)

    def nbytes(self) -> int:
        """Bytes of storage this cache holds (all layers: keys, values, positions, policy signals)."""
        return sum(layer.nbytes() for layer in self.layers)

    def stats(self) -> dict:
        return {
            "policy": self.policy.name,
            "memory_size": self.memory_size,
            "buffer_size": self.buffer_size,
            "tokens_seen": self.seen.tolist() if self.seen is not None else [],
            "tokens_kept": self.count.tolist() if self.count is not None else [],
            "slots_per_head": self.slots,
            "nbytes": self.nbytes(),
        }

    # ---- mechanics ----

    def _initial_slots(self, width: int) -> int:
        if self.memory_size is not None:
            return self.memory_size + self.buffer_size
        return max(GROW, GROW * math.ceil(width / GROW))

    def _grow(self, layer: SlotLayer, width: int) -> None:
        self._resize(layer, max(2 * layer.slots, GROW * math.ceil(width / GROW)))

    def _resize(self, layer: SlotLayer, slots: int) -> None:
        """Reallocate the layer's slots to `slots` (at least every row's count), keeping the entries."""
        resized = {}
        for name, t in layer.tensors().items():
            shape = list(t.shape)
            shape[2] = slots
            r = torch.full(shape, -1, dtype=t.dtype, device=t.device) if name == "positions" else t.new_zeros(shape)
            n = min(slots, t.shape[2])
            r[:, :, :n] = t[:, :, :n]
            resized[name] = r
        layer.assign(resized)

    def _new_tokens(self, layer_idx, key_states, value_states, plan: _Plan) -> dict[str, torch.Tensor]:
        """The new tokens as (B, H, q[, D]) tensors, real ones first, for every stored field."""
        B, H, q, _ = key_states.shape
        order = plan.order[:, None, :].expand(B, H, q)
        staged = self._staged.get(layer_idx, {})
        new = {
            "keys": _gather_tokens(key_states, order),
            "values": _gather_tokens(value_states, order),
            "positions": (self.seen[:, None, None] + torch.arange(q, device=key_states.device)).expand(B, H, q),
        }
        for name in self.policy.needs:
            if name not in staged:
                hint = " (attach retention gates: trimkv.attach_gates or trimkv.load_pretrained)" if name == "log_beta" else ""
                raise ValueError(f"policy {self.policy.name!r} needs {name!r} for layer {layer_idx}, none was given{hint}")
            new[name] = staged[name].transpose(1, 2).float().gather(2, order)
        for name in self.policy.state:
            new[name] = key_states.new_zeros(B, H, q, dtype=torch.float32)
        return new

    def _merge(self, layer: SlotLayer, new: dict[str, torch.Tensor], plan: _Plan) -> dict[str, torch.Tensor]:
        """Per row: cached entries, then the real new tokens -> (B, H, K[, D]) with K = plan.width."""
        n_old = int(plan.count_before.max())
        j = torch.arange(plan.width, device=plan.order.device)[None, :]  # (1, K)
        before = plan.count_before[:, None]
        src = torch.where(j < before, j, n_old + j - before)  # (B, K) index into cat(old, new)
        src = src.clamp(max=n_old + plan.order.shape[1] - 1)
        stored = layer.tensors()
        merged = {}
        for name, fresh in new.items():
            both = torch.cat([stored[name][:, :, :n_old], fresh], dim=2)
            merged[name] = _gather_tokens(both, src[:, None, :].expand(both.shape[0], both.shape[1], -1))
        return merged

    def _view(self, candidates: dict[str, torch.Tensor], plan: _Plan, scaling: float, layer: SlotLayer) -> CacheView:
        positions = candidates["positions"]
        valid = torch.arange(positions.shape[-1], device=positions.device)[None, None, :] < plan.count_union[:, None, None]
        extras = {k: candidates[k] for k in self.policy.needs + self.policy.state}
        return CacheView(candidates["keys"], candidates["values"], positions, extras, plan.t, valid,
                         self.memory_size, layer.queries, layer.query_positions, scaling, layer.index)

    def _push_queries(self, layer: SlotLayer, queries: torch.Tensor, positions: torch.Tensor, plan: _Plan) -> None:
        """Keep each row's last W real queries, right-aligned: (B, H_q, W, D) and positions (B, W)."""
        B, Hq, _, D = queries.shape
        W = self.policy.query_window
        if layer.queries is None:
            layer.queries = queries.new_zeros(B, Hq, W, D)
            layer.query_positions = torch.full((B, W), -1, dtype=torch.long, device=queries.device)
        # cat(old, new) holds each row's valid queries contiguously, ending at W + n_real: take the last W.
        src = plan.n_real[:, None] + torch.arange(W, device=queries.device)  # (B, W)
        both = torch.cat([layer.queries, queries], dim=2)
        layer.queries.copy_(both.gather(2, src[:, None, :, None].expand(B, Hq, W, D)))
        layer.query_positions.copy_(torch.cat([layer.query_positions, positions], dim=1).gather(1, src))

    def _compress_into(self, layer: SlotLayer, candidates: dict[str, torch.Tensor], plan: _Plan,
                       scaling: float = 1.0) -> None:
        """Write into the layer's slots: for compressing rows the top-M candidates per head (in position
        order), for the others their candidates as they are."""
        M, S = self.memory_size, layer.slots
        view = self._view(candidates, plan, scaling, layer)
        positions, valid = view.positions, view.valid
        B, H, _ = positions.shape
        scores = self.policy.score(view).float().masked_fill(~valid, -math.inf)
        forced = positions < self.sink
        if self.window:
            forced |= positions >= (plan.seen_after[:, None, None] - self.window)
        scores = scores.masked_fill(forced & valid, math.inf)
        # A stable sort breaks ties by slot (= position) order, so a row's choice never depends on its batch.
        top = scores.sort(dim=-1, descending=True, stable=True).indices[:, :, :M].sort(dim=-1).values  # (B, H, M)
        keep = torch.arange(S, device=positions.device).expand(B, H, S).clone()
        keep[:, :, :M] = torch.where(plan.compress[:, None, None], top, keep[:, :, :M])
        kept = {name: _gather_tokens(t, keep) for name, t in candidates.items()}
        stored = layer.tensors()
        for name, t in kept.items():
            stored[name].copy_(t)

    def _map_batch(self, fn) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.assign({name: fn(t) for name, t in layer.tensors().items()})
            if layer.queries is not None:
                layer.queries, layer.query_positions = fn(layer.queries), fn(layer.query_positions)
        if self.seen is not None:
            self.seen, self.count = fn(self.seen), fn(self.count)


def make_cache(policy: str, memory_size: int | None = None, buffer_size: int = 128, sink: int | None = None,
               window: int = 0, prefill_chunk: int | None = None, **policy_kwargs) -> BoundedCache:
    """A bounded KV cache for `model.generate(..., past_key_values=cache)`.

    policy: a name in `trimkv.POLICIES` ("trimkv", "full", ...); extra keyword arguments go to it.
    memory_size: M, tokens kept per (sequence, layer, KV head) after compression (ignored by "full").
    buffer_size: tokens added beyond M before the cache compresses back to M (upstream default 128).
    sink, window: always keep the first `sink` and the last `window` tokens. A policy with a `sink`
        option of its own (streaming) takes `sink` instead; None keeps its default.
    prefill_chunk: run a longer prompt in chunks of this many tokens, evicting after each, so memory
        stays bounded during prefill too (None: the prompt is one pass).
    The model must carry trimkv's hooks: `trimkv.attach_gates`, `trimkv.load_pretrained` or `trimkv.prepare`.
    """
    if sink is not None and policy in POLICIES and "sink" in {f.name for f in fields(POLICIES[policy])}:
        policy_kwargs["sink"], sink = sink, None
    rule = get_policy(policy, **policy_kwargs)
    sink = sink or 0
    if rule.bounded:
        if memory_size is None or memory_size <= 0:
            raise ValueError(f"memory_size must be a positive integer for policy {policy!r}, got {memory_size}")
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {buffer_size}")
        forced = sink + window + getattr(rule, "sink", 0)
        if sink < 0 or window < 0 or forced > memory_size:
            raise ValueError(f"need 0 <= sink + window <= memory_size, got sink={sink or getattr(rule, 'sink', 0)} "
                             f"window={window} memory_size={memory_size}")
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk}")
    return BoundedCache(rule, memory_size, buffer_size, sink, window, prefill_chunk)
