"""What a trained gate keeps: retention heatmaps, eviction decisions and the retained-token text.

`trace` loads nothing itself: given a gated model and its tokenizer it
1. generates a continuation of the text with `make_cache("trimkv", memory_size=M, buffer_size=B)` and, through
   a forward hook on the decoder (`model.model`), records after every forward pass which original positions
   each chosen (layer, KV head) still caches (`cache.kept_positions`);
2. runs one plain forward over the whole sequence (prompt + continuation) with `trimkv.retention` for
   log beta of every token.

Outputs of `write_all` (stem = the output directory):
  retention_heatmap.{png,pdf}  beta_i^(t-i) = exp((t - i) log beta_i): query step t down, key position i across,
                               lower-triangular, one panel per (layer, KV head)
  eviction.{png,pdf}           after each forward pass (down; the first row is the prompt), each position
                               (across): kept, evicted or not yet seen
  retained_tokens.html / .png  the text with each token coloured kept / evicted at the end of generation, one
                               block per (layer, KV head), and a block with the fraction of all layers and KV
                               heads that keep it
  retention.json               the data behind all of these
The heatmap is the gate's view of a full-attention pass; the eviction plots are what the bounded cache did
during generation (where later hidden states saw only the kept tokens).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trimkv.report.figures import new_figure, save

KEPT, EVICTED, UNSEEN = "#a6d96a", "#f4a6a0", "#eeeeee"
LINE_CHARS = 100  # characters per line of the token picture


@dataclass
class RetentionTrace:
    tokens: list[str]  # display text of every token: prompt, then the generated ones
    ids: list[int]
    prompt_len: int
    seen: int  # tokens the cache saw (the last generated token is never fed back)
    memory_size: int
    buffer_size: int
    layers: list[int]
    heads: list[int]
    num_layers: int
    num_heads: int
    log_beta: dict[str, list[float]] = field(default_factory=dict)  # "layer,head" -> per token
    steps: list[int] = field(default_factory=list)  # tokens seen after each forward pass
    kept: dict[str, list[list[int]]] = field(default_factory=dict)  # "layer,head" -> per pass: kept positions
    kept_fraction: list[float | None] = field(default_factory=list)  # per token at the end, all layers and heads

    @property
    def panels(self) -> list[tuple[int, int]]:
        return [(layer, head) for layer in self.layers for head in self.heads]

    def final_kept(self, layer: int, head: int) -> set[int]:
        passes = self.kept[_key(layer, head)]
        return set(passes[-1]) if passes else set()


def _key(layer: int, head: int) -> str:
    return f"{layer},{head}"


def parse_indices(spec: str, count: int, what: str) -> list[int]:
    """'all', '3', '0,2' or '0-3' -> sorted indices, each checked against 0 .. count-1."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(count))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi if hi else lo) + 1))
    except ValueError:
        raise ValueError(f"--{what}: expected 'all' or indices like 0,2 or 0-3, got {spec!r}") from None
    bad = sorted(i for i in out if not 0 <= i < count)
    if bad or not out:
        raise ValueError(f"--{what} {spec!r}: the model has {count} {what} (0-{count - 1})")
    return sorted(out)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text: the growth of the decoded text when it is appended to a few tokens before it
    (keeps the leading spaces that decoding a single SentencePiece or byte-level token drops)."""
    texts = []
    for k in range(len(ids)):
        start = max(0, k - 8)
        before = tokenizer.decode(ids[start:k]) if k > start else ""
        text = tokenizer.decode(ids[start:k + 1])
        piece = text[len(before):] if text.startswith(before) else tokenizer.decode(ids[k:k + 1])
        texts.append(piece or tokenizer.convert_ids_to_tokens(ids[k]) or "")
    return texts


def trace(model, tokenizer, text: str, layers: list[int], heads: list[int], memory_size: int, buffer_size: int = 0,
          max_new_tokens: int = 32, prefill_chunk: int | None = None, max_input_tokens: int | None = 1024
          ) -> RetentionTrace:
    """Generate from `text` with the trimkv policy and record what the chosen layers and heads keep."""
    import torch

    import trimkv
    from trimkv.compat import cache_from_kwargs, generate_cache_kwarg

    device = next(model.parameters()).device
    ids = tokenizer(text)["input_ids"]
    if max_input_tokens is not None:
        ids = ids[:max_input_tokens]
    if not ids:
        raise ValueError("the text has no tokens")
    config = model.config
    num_layers, num_heads = config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or \
        config.num_attention_heads
    bad_layers = [i for i in layers if not 0 <= i < num_layers]
    bad_heads = [i for i in heads if not 0 <= i < num_heads]
    if bad_layers or bad_heads:
        raise ValueError(f"the model has {num_layers} layers and {num_heads} KV heads; got layers {layers}, "
                         f"heads {heads}")
    cache = trimkv.make_cache("trimkv", memory_size=memory_size, buffer_size=buffer_size,
                              prefill_chunk=prefill_chunk)
    result = RetentionTrace(tokens=[], ids=[], prompt_len=len(ids), seen=0, memory_size=memory_size,
                            buffer_size=buffer_size, layers=list(layers), heads=list(heads), num_layers=num_layers,
                            num_heads=num_heads, kept={_key(l, h): [] for l in layers for h in heads})

    def after_forward(module, args, kwargs, output):  # runs after trimkv's own hook has closed the pass
        if cache_from_kwargs(kwargs) is not cache:
            return
        result.steps.append(int(cache.seen[0]))
        for layer in layers:
            kept = cache.kept_positions(layer)[0]  # (H_kv, n), -1 pads
            for head in heads:
                result.kept[_key(layer, head)].append(sorted(p for p in kept[head].tolist() if p >= 0))
        return

    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    handle = model.model.register_forward_hook(after_forward, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 **{generate_cache_kwarg(model): cache})
    finally:
        handle.remove()
    result.ids = out[0].tolist()
    result.tokens = token_texts(tokenizer, result.ids)
    result.seen = int(cache.seen[0])

    counts = [0] * len(result.ids)
    for layer in range(num_layers):
        for row in cache.kept_positions(layer)[0].tolist():
            for p in row:
                if p >= 0:
                    counts[p] += 1
    total = num_layers * num_heads
    result.kept_fraction = [c / total if p < result.seen else None for p, c in enumerate(counts)]

    with torch.no_grad():
        log_beta = trimkv.retention(model, out)  # per layer (1, T, H_kv)
    for layer in layers:
        for head in heads:
            result.log_beta[_key(layer, head)] = log_beta[layer][0, :, head].float().cpu().tolist()
    return result


# ---- figures ----

def _grid(trace_: RetentionTrace, width: float, height: float):
    rows, cols = len(trace_.layers), len(trace_.heads)
    fig = new_figure(width * cols, height * rows)
    return fig, fig.subplots(rows, cols, squeeze=False)


def retention_matrix(log_beta: list[float]):
    """A[t, i] = beta_i^(t - i) for i <= t, NaN above the diagonal."""
    import numpy as np

    lb = np.asarray(log_beta, dtype=np.float64)
    t = np.arange(len(lb))
    distance = t[:, None] - t[None, :]
    a = np.exp(np.maximum(distance, 0) * lb[None, :])
    a[distance < 0] = np.nan
    return a


def heatmap_figure(trace_: RetentionTrace):
    import numpy as np

    fig, axes = _grid(trace_, 4.2, 3.6)
    image = None
    for r, layer in enumerate(trace_.layers):
        for c, head in enumerate(trace_.heads):
            ax = axes[r][c]
            a = np.ma.masked_invalid(retention_matrix(trace_.log_beta[_key(layer, head)]))
            image = ax.imshow(a, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
            ax.axvline(trace_.prompt_len - 0.5, color="white", linewidth=0.6, linestyle=":")
            ax.set_title(f"layer {layer}, KV head {head}", fontsize=9)
            ax.set_xlabel("key position i")
            ax.set_ylabel("query step t")
    fig.colorbar(image, ax=axes, shrink=0.8, label=r"$\beta_i^{\,t-i}$")
    return fig


def eviction_matrix(trace_: RetentionTrace, layer: int, head: int):
    """(passes, positions): 2 kept, 1 evicted, 0 not yet seen."""
    import numpy as np

    passes = trace_.kept[_key(layer, head)]
    m = np.zeros((len(passes), len(trace_.ids)), dtype=np.int8)
    for s, (seen, kept) in enumerate(zip(trace_.steps, passes)):
        m[s, :seen] = 1
        m[s, kept] = 2
    return m


def eviction_figure(trace_: RetentionTrace):
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, axes = _grid(trace_, 4.2, 3.6)
    colours = ListedColormap([UNSEEN, EVICTED, "#1a6b30"])
    for r, layer in enumerate(trace_.layers):
        for c, head in enumerate(trace_.heads):
            ax = axes[r][c]
            m = eviction_matrix(trace_, layer, head)
            ax.imshow(m, cmap=colours, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
            ax.axvline(trace_.prompt_len - 0.5, color="black", linewidth=0.6, linestyle=":")
            ticks = sorted({0, len(trace_.steps) // 2, len(trace_.steps) - 1})
            ax.set_yticks(ticks, [str(trace_.steps[t]) for t in ticks])
            ax.set_title(f"layer {layer}, KV head {head}", fontsize=9)
            ax.set_xlabel("token position")
            ax.set_ylabel("tokens seen (after each pass)")
    fig.legend(handles=[Patch(color="#1a6b30", label="kept"), Patch(color=EVICTED, label="evicted"),
                        Patch(color=UNSEEN, label="not yet seen")], loc="outside lower center", ncols=3,
               fontsize=8, frameon=False)
    fig.suptitle(f"trimkv eviction, M = {trace_.memory_size}, buffer = {trace_.buffer_size}", fontsize=10)
    return fig


def _panels(trace_: RetentionTrace) -> list[tuple[str, list[str]]]:
    """(title, colour per token) for each (layer, head) and the all-layers summary."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    panels = []
    for layer, head in trace_.panels:
        kept = trace_.final_kept(layer, head)
        colours = [UNSEEN if p >= trace_.seen else KEPT if p in kept else EVICTED for p in range(len(trace_.ids))]
        panels.append((f"layer {layer}, KV head {head}: {len(kept)} of {trace_.seen} tokens kept", colours))
    greens = colormaps["Greens"]
    summary = [UNSEEN if f is None else to_hex(greens(0.08 + 0.8 * f)) for f in trace_.kept_fraction]
    panels.append((f"all {trace_.num_layers} layers x {trace_.num_heads} KV heads: fraction keeping each token",
                   summary))
    return panels


def _display(token: str) -> tuple[str, bool]:
    """The token as shown (visible newline and tab marks) and whether a line break follows it."""
    return token.replace("\t", "⇥").replace("\n", "⏎"), "\n" in token


def tokens_figure(trace_: RetentionTrace):
    from matplotlib.patches import Rectangle

    font = 8.0
    char_w = 0.602 * font / 72  # inches per character of DejaVu Sans Mono
    line_h = 1.9 * font / 72
    layouts = []
    for title, colours in _panels(trace_):
        x, line, placed = 0, 0, []
        for p, token in enumerate(trace_.tokens):
            shown, newline = _display(token)
            shown = shown[:LINE_CHARS] or "∅"
            if x + len(shown) > LINE_CHARS:
                x, line = 0, line + 1
            placed.append((x, line, shown, colours[p], p >= trace_.prompt_len))
            x += len(shown)
            if newline:
                x, line = 0, line + 1
        layouts.append((title, placed, line + 1))
    lines = sum(n + 2 for _, _, n in layouts)
    fig = new_figure(LINE_CHARS * char_w + 0.4, lines * line_h + 0.3, layout="none")
    ax = fig.add_axes((0.2 / fig.get_figwidth(), 0, 1 - 0.4 / fig.get_figwidth(), 1))
    ax.set_xlim(0, LINE_CHARS)
    ax.set_ylim(lines + 0.5, -0.5)
    ax.axis("off")
    top = 0
    for title, placed, n in layouts:
        ax.text(0, top + 0.5, title, fontsize=font + 1, fontweight="bold", va="center")
        for x, line, shown, colour, generated in placed:
            y = top + 1 + line
            ax.add_patch(Rectangle((x, y + 0.08), len(shown), 0.84, facecolor=colour, edgecolor="none"))
            if generated:
                ax.plot([x, x + len(shown)], [y + 0.95, y + 0.95], color="#333333", linewidth=0.6)
            ax.text(x, y + 0.5, shown, family="DejaVu Sans Mono", fontsize=font, va="center", ha="left")
        top += n + 2
    return fig


def tokens_html(trace_: RetentionTrace) -> str:
    sections = []
    for (title, colours), key in zip(_panels(trace_), [*(_key(l, h) for l, h in trace_.panels), None]):
        spans = []
        for p, token in enumerate(trace_.tokens):
            shown, newline = _display(token)
            state = "not cached" if p >= trace_.seen else (
                ("kept" if p in trace_.final_kept(*map(int, key.split(","))) else "evicted") if key
                else f"kept by {trace_.kept_fraction[p]:.0%} of layers x heads")
            beta = f", log beta {trace_.log_beta[key][p]:.3f}" if key else ""
            cls = ' class="gen"' if p >= trace_.prompt_len else ""
            spans.append(f'<span{cls} style="background:{colours[p]}" title="position {p}: {state}{beta}">'
                         f"{html.escape(shown)}</span>" + ("<br>" if newline else ""))
        sections.append(f"<section><h2>{html.escape(title)}</h2><p class=\"tokens\">{''.join(spans)}</p></section>")
    legend = (f'<span style="background:{KEPT}">kept</span> <span style="background:{EVICTED}">evicted</span> '
              f'<span style="background:{UNSEEN}">not cached (never fed back)</span> '
              '<span class="gen">generated tokens are underlined</span>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TRIM-KV retained tokens</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
.tokens {{ font-family: "DejaVu Sans Mono", monospace; font-size: 13px; line-height: 1.9; white-space: pre-wrap; }}
.tokens span {{ border-radius: 2px; }}
.gen {{ text-decoration: underline; }}
h2 {{ font-size: 1em; margin-top: 1.5em; }}
</style></head><body>
<h1>Retained tokens</h1>
<p>trimkv policy, memory size M = {trace_.memory_size}, buffer {trace_.buffer_size}: {trace_.prompt_len} prompt
tokens, {len(trace_.ids) - trace_.prompt_len} generated; what the cache holds at the end of generation.
Hover a token for its position and log beta.</p>
<p>{legend}</p>
{chr(10).join(sections)}
</body></html>
"""


def write_all(trace_: RetentionTrace, out: Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = save(heatmap_figure(trace_), out, "retention_heatmap")
    paths += save(eviction_figure(trace_), out, "eviction")
    html_path = out / "retained_tokens.html"
    html_path.write_text(tokens_html(trace_), encoding="utf-8")
    paths.append(html_path)
    fig = tokens_figure(trace_)
    png = out / "retained_tokens.png"
    fig.savefig(png, dpi=150, metadata={"Software": None})
    paths.append(png)
    data = out / "retention.json"
    data.write_text(json.dumps({k: v for k, v in asdict(trace_).items()}, ensure_ascii=False) + "\n")
    paths.append(data)
    return paths


def run(model_dir: str, text: str, out: Path, layers: str = "0", heads: str = "0", memory_size: int | None = None,
        buffer_size: int | None = None, max_new_tokens: int = 32, prefill_chunk: int | None = None,
        max_input_tokens: int | None = 1024, tokenizer: str | None = None, device: str = "cpu",
        dtype: str = "float32") -> list[Path]:
    """Load a gate checkpoint with its base model and tokenizer, trace and write every output."""
    import torch
    from transformers import AutoTokenizer

    import trimkv

    model = trimkv.load_pretrained(model_dir, dtype=getattr(torch, dtype), device=device).eval()
    defaults = getattr(model, "trimkv_defaults", {}) or {}
    memory_size = memory_size if memory_size is not None else defaults.get("memory_size")
    if memory_size is None:
        raise ValueError(f"{model_dir} records no memory_size; pass --memory-size")
    buffer_size = buffer_size if buffer_size is not None else defaults.get("buffer_size", 0)
    source = tokenizer or (getattr(model, "trimkv_source", {}) or {}).get("base_model") or model_dir
    tok = AutoTokenizer.from_pretrained(source)
    config = model.config
    num_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    result = trace(model, tok, text, parse_indices(layers, config.num_hidden_layers, "layers"),
                   parse_indices(heads, num_heads, "heads"), memory_size, buffer_size, max_new_tokens,
                   prefill_chunk, max_input_tokens)
    return write_all(result, out)


__all__ = ["RetentionTrace", "eviction_matrix", "parse_indices", "retention_matrix", "run", "trace", "write_all"]
