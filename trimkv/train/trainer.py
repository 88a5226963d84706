"""Train TRIM-KV retention gates on a frozen base model: `python -m trimkv train --model ... --data ... --out ...`.

`--method locret` trains the LocRet baseline's retaining heads instead (methods.py, locret_loss.py): the same
loop, data, checkpoints and outputs, one forward of the base model per sequence, heads saved as locret_heads.*.
`--method seerattn_r` likewise trains SeerAttention-R's AttnGates (seer_loss.py), saved as seer_gates.*.

One step: for each of grad_accum micro-batches (one sequence per process), the base model runs twice on the
same tokens, as teacher (its plain attention, no grad) and as student (retention-gated attention, the gates'
log beta on every key); the loss (losses.py) reaches only the gates. Then gradients are averaged over
processes, clipped, and AdamW steps with a warmup + cosine learning rate.

Runs the same way as one process, under `torchrun` (data parallel: gate gradients all-reduced once per step)
and under DeepSpeed ZeRO-2 (`--deepspeed configs/deepspeed_zero2.json`, launched by torchrun or deepspeed).
bf16 on GPU (base weights bf16, gates and optimizer fp32), fp32 on CPU.

The output directory holds the gates (`trimkv.load_pretrained(out)` loads them with their base model),
metrics.json (final values and per-step curves), params.json, train.log, and checkpoints/step-N/ every
--save-every steps: gates, optimizer, scheduler, RNG states, data position, written to a temp dir and renamed.
A rerun with the same --out resumes from the newest checkpoint; SIGTERM (e.g. SLURM preemption) writes a
checkpoint of the last finished step and exits 143; a NaN/inf loss stops with an error naming the step and
the loss part, leaving the checkpoints as they were.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from trimkv import compat
from trimkv.train import checkpointing, distributed
from trimkv.train import data as train_data
from trimkv.train.checkpointing import gate_extra, write_json
from trimkv.train.losses import CAPACITY_FORMS
from trimkv.train.methods import METHODS

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM'd job: the workflow retries
EXIT_NONFINITE = 3


def option(default=MISSING, help: str = "", **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    """Every option of `python -m trimkv train`; the defaults are the paper's unless said otherwise."""

    model: str = option(help="base model: a Hugging Face model directory or Hub id")
    data: list[str] = option(  # noqa: RUF009 (a dataclasses.field: required, no shared default)
        help="training data files (.parquet, .jsonl, .json); see trimkv.train.data", nargs="+")
    out: str = option(help="output directory (gates, metrics.json, params.json, train.log, checkpoints/)")
    memory_size: int = option(help="KV budget M per layer and KV head that the capacity loss targets", type=int)
    max_steps: int = option(help="optimizer steps", type=int)
    max_length: int = option(16384, help="tokens per training sequence (paper: 16K/32K for math, 128K long-context)")
    pack: bool = option(False, help="pack several samples into each sequence (default: one truncated sample each)")
    tokenizer: str | None = option(None, help="tokenizer with the chat template (default: --model)")
    revision: str | None = option(None, help="Hub revision of --model")
    lr: float = option(2e-4, help="peak learning rate of AdamW")
    weight_decay: float = option(0.01, help="AdamW weight decay")
    grad_accum: int = option(4, help="micro-batches (one sequence each) per process per optimizer step")
    warmup_ratio: float = option(0.05, help="fraction of max_steps of linear warmup before the cosine decay (ours)")
    min_lr_ratio: float = option(0.0, help="the cosine decays to lr * this (ours)")
    max_grad_norm: float = option(1.0, help="clip the gates' gradient norm to this; 0 = no clipping (ours)")
    kl_weight: float = option(0.5, help="weight of KL(teacher || student)")
    ntp_weight: float = option(0.5, help="weight of the next-token cross-entropy")
    capacity_weight: float = option(1.0, help="weight lambda_cap of the capacity loss")
    capacity_form: str = option("released", help="capacity loss: 'released' (upstream code) or 'paper' form",
                                choices=CAPACITY_FORMS)
    gate_bias_init: float = option(10.0, help="initial gate bias, beta ~ sigmoid(bias) (upstream code: 10)")
    gate_intermediate_size: int = option(512, help="hidden width of the gate MLP")
    attention: str = option("auto", help="student attention: reference, flex, triton, or auto (on GPU: triton "
                                         "if installed, else flex)", choices=("auto", "reference", "flex", "triton"))
    dtype: str = option("auto", help="base model dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32",
                        choices=("auto", "bfloat16", "float32"))
    gradient_checkpointing: bool = option(False, help="recompute each decoder layer in the backward pass")
    deepspeed: str | None = option(None, help="DeepSpeed config (e.g. configs/deepspeed_zero2.json); its 'auto' "
                                              "values are filled from these options")
    save_every: int = option(100, help="write a checkpoint every N steps (and at the last step)")
    keep_checkpoints: int = option(2, help="keep the newest N checkpoints")
    resume: str = option("auto", help="'auto' (newest checkpoint in OUT/checkpoints, if any), 'never', or a "
                                      "checkpoint directory")
    seed: int = option(0, help="seed of the gate init and the data order")
    log_every: int = option(1, help="write a train.log line every N steps")
    logit_block: int = option(1024, help="positions per block of the chunked lm_head in the loss")
    device: str | None = option(None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    method: str = option("trimkv", help="what trains: 'trimkv' retention gates (the paper), 'locret' retaining "
                                        "heads (the LocRet baseline, arXiv 2410.01805) or 'seerattn_r' AttnGates "
                                        "(the SeerAttention-R baseline, arXiv 2506.08889)", choices=tuple(METHODS))
    locret_intermediate_size: int = option(1024, help="--method locret: hidden width of the retaining heads "
                                                      "(released LocRet code: 1024)")
    smoothness_weight: float = option(0.0025, help="--method locret: weight alpha of the smoothness term "
                                                   "(LocRet paper: 0.0025)")
    seer_block_size: int = option(64, help="--method seerattn_r: tokens per key block (released: 64)")
    seer_gate_hidden_size: int = option(128, help="--method seerattn_r: width of the gate's queries and keys "
                                                  "(released: 128)")
    seer_loss_slice: float = option(0.5, help="--method seerattn_r: the loss covers positions >= this fraction of "
                                              "each sequence (released training script: 0.5)")


class NonFiniteLossError(RuntimeError):
    pass


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` subcommand: one option per TrainConfig field."""
    p = subparsers.add_parser("train", help="train retention gates on a frozen base model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        kwargs = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        if f.default is MISSING:
            kwargs.update(required=True)
        elif isinstance(f.default, bool):
            kwargs.update(action="store_true")
        else:
            kwargs.update(default=f.default, type=type(f.default) if f.default is not None else str)
            kwargs["help"] += f" (default: {f.default})"
        if kwargs.get("nargs"):
            kwargs["type"] = str
        p.add_argument(flag, **kwargs)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    try:
        return train(cfg)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE


def train(cfg: TrainConfig, stop_after: int | None = None) -> int:
    """Run (or resume) training; returns the exit status. stop_after=k acts like SIGTERM after step k."""
    # ---- 1. validate everything a user can get wrong, before any compute -------------------------------------
    check_config(cfg)
    out = Path(cfg.out)
    files = train_data.open_files(cfg.data)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_name = cfg.tokenizer or cfg.model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, revision=None if cfg.tokenizer else cfg.revision)
    train_data.check_tokenizer(tokenizer, files, tokenizer_name)
    ds_config = distributed.read_deepspeed_config(cfg.deepspeed) if cfg.deepspeed else None
    ckpt_dir = out / "checkpoints"
    source = checkpointing.find(cfg, ckpt_dir)

    # ---- 2. processes and devices ------------------------------------------------------------------------------
    rank, world, device, own_group = distributed.setup(cfg.device, deepspeed=ds_config is not None)
    main_process = rank == 0
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    method = METHODS[cfg.method]
    attention = method.attention(cfg, device)
    logged = (*method.logged, "tokens")  # per micro-batch, summed over micro-batches and processes
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train.log" if main_process else None)

    # ---- 3. model: frozen base + trainable gates (or heads) ---------------------------------------------------
    from trimkv.gates import decoder_layers

    model = AutoModelForCausalLM.from_pretrained(cfg.model, revision=cfg.revision, dtype=dtype,
                                                 attn_implementation="sdpa").to(device)
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"{cfg.model}: final_logit_softcapping is not supported by the chunked loss")
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the same gate init in every process
    method.attach(model, cfg)
    named = method.parameters(model)
    if ds_config is None:
        for p in named.values():
            p.data = p.data.float()  # fp32 master weights: a bf16 bias of 10 cannot move by lr 2e-4 steps
    params = list(named.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable != set(named):
        raise RuntimeError(f"only the {method.name} modules may train, but so would {sorted(trainable - set(named))}")
    teacher_impl, student_impl = model.config._attn_implementation, f"trimkv_{attention}"
    model.config._attn_implementation = student_impl  # from here on; objective() switches for the teacher
    model.eval()  # no dropout: the teacher must be the base model itself
    if cfg.gradient_checkpointing:
        compat.enable_gradient_checkpointing(model)
        for layer in decoder_layers(model):
            layer.training = True  # HF checkpoints a layer only in training mode; its submodules stay in eval

    # ---- 4. data, optimizer, schedule ---------------------------------------------------------------------------
    stream = train_data.SequenceStream(files, tokenizer, cfg.max_length, pack=cfg.pack, seed=cfg.seed)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup_ratio * cfg.max_steps)

    def lr_factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine = None
    if ds_config is not None:
        import deepspeed

        distributed.fill_deepspeed_config(ds_config, cfg.deepspeed, cfg.grad_accum, cfg.max_grad_norm, world,
                                          dtype)
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=params,
                                                               optimizer=optimizer, lr_scheduler=scheduler,
                                                               config=ds_config)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and engine is None else nullcontext()
    model.config.use_cache = False
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ---- 5. resume ----------------------------------------------------------------------------------------------
    state = {"step": 0, "history": [], "tokens": 0, "elapsed_s": 0.0}
    if source is not None:
        state = checkpointing.load(source, cfg, model, optimizer, scheduler, engine, stream, rank, world, log)
    elif main_process:
        write_json(out / "params.json", params_record(cfg, model, world, attention, dtype, len(params)))
    step, last_saved = state["step"], source
    log(f"{'resuming from ' + str(source) if source else 'starting'} at step {step}/{cfg.max_steps}: "
        f"{world} process(es) on {device}, {dtype}, student attention {student_impl}, "
        f"{sum(p.numel() for p in params):,} trainable {method.name} parameters")

    # ---- 6. train -----------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    stop = StopFlag()  # SIGTERM sets it; `stopping` is the decision all processes share (one all-reduce)
    stopping = False
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not main_process, dynamic_ncols=True, desc="train")
    try:
        while step < cfg.max_steps and not stopping:
            step_start_data, t0, lr = stream.state_dict(), time.perf_counter(), scheduler.get_last_lr()[0]
            sums = torch.zeros(len(logged), device=device)  # summed over micro-batches and processes
            for micro in range(cfg.grad_accum):
                stopping = distributed.any_process(bool(stop), world, device)
                if stopping:  # SIGTERM here or in another process
                    stop.set("SIGTERM")
                    break
                mine = None
                for r in range(world):  # every process walks the same stream and keeps every world-th sequence
                    seq = next(stream)
                    mine = seq if r == rank else mine
                n = len(mine)
                ids = torch.full((1, padded_length(n, cfg.max_length, attention)), pad_id, dtype=torch.long)
                ids[0, :n] = mine
                ids = ids.to(device)  # (1, T), T >= n
                with autocast:
                    parts = method.objective(model, ids, cfg, teacher_impl, n)
                loss = parts["loss"]
                local = torch.stack([parts[k].detach() for k in logged[:-1]] +
                                    [torch.tensor(float(n), device=device)])
                if world > 1:
                    dist.all_reduce(local)  # a NaN anywhere stops every process at the same point
                check_finite(local, logged, step + 1, micro + 1, last_saved)
                sums += local
                if engine is not None:
                    engine.backward(loss)  # scales by 1 / grad_accum itself
                    engine.step()  # steps the optimizer only at the accumulation boundary
                else:
                    (loss / cfg.grad_accum).backward()
            if stopping:  # preempted mid-step: drop its gradients; the checkpoint is the last finished step
                stream.load_state_dict(step_start_data)
                break
            if engine is not None:
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
            else:
                grad_norm = distributed.sync_and_clip(params, world, cfg.max_grad_norm)
                if math.isfinite(grad_norm):
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(f"non-finite gradient norm at step {step + 1}; last good checkpoint: "
                                         f"{last_saved or 'none (no checkpoint written yet)'}")
            step += 1
            seconds = time.perf_counter() - t0
            batches = cfg.grad_accum * world
            record = {"step": step, **{k: float(sums[i]) / batches for i, k in enumerate(logged[:-1])},
                      "lr": lr, "grad_norm": grad_norm, "tokens": int(sums[-1]),
                      "tokens_per_s": float(sums[-1]) / seconds, "seconds": seconds}
            state["history"].append(record)
            state["step"], state["tokens"], state["elapsed_s"] = step, state["tokens"] + record["tokens"], \
                state["elapsed_s"] + seconds
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in logged[:-1]}, tok_s=f"{record['tokens_per_s']:.0f}",
                            refresh=False)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                log(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                    console=False)
            if step == stop_after:
                stop.set(f"stop_after={stop_after}")
            stopping = distributed.any_process(bool(stop), world, device)
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                last_saved = checkpointing.save(ckpt_dir / f"step-{step:08d}", cfg, model, optimizer, scheduler,
                                                engine, stream.state_dict(), state, rank, world)
                log(f"checkpoint {last_saved}", console=False)
                if main_process:
                    write_json(out / "metrics.json", metrics_record(state, cfg, complete=step == cfg.max_steps))
    finally:
        bar.close()
        stop.restore()

    if step < cfg.max_steps:  # stopped: SIGTERM or stop_after
        if last_saved is None or last_saved.name != f"step-{step:08d}":
            last_saved = checkpointing.save(ckpt_dir / f"step-{step:08d}", cfg, model, optimizer, scheduler,
                                            engine, stream.state_dict(), state, rank, world)
        if main_process:
            write_json(out / "metrics.json", metrics_record(state, cfg, complete=False))
        log(f"stopped ({stop.reason}) after step {step}; checkpoint {last_saved}; rerun to resume")
        distributed.cleanup(own_group)
        return EXIT_PREEMPTED

    # ---- 7. outputs ---------------------------------------------------------------------------------------------
    distributed.gather_fp32_gates(model, engine, named)
    if main_process:
        method.save(model, out, base_model=cfg.model, revision=cfg.revision,
                    extra=gate_extra(cfg, step, state["tokens"]))
        write_json(out / "metrics.json", metrics_record(state, cfg, complete=True))
    log(f"done: {step} steps, {state['tokens']:,} tokens; {method.name} weights in {out}")
    distributed.cleanup(own_group)
    return 0


# ---- helpers, in the order the loop above uses them ------------------------------------------------------------

def check_config(cfg: TrainConfig) -> None:
    if cfg.memory_size <= 0:
        raise ValueError(f"--memory-size must be > 0, got {cfg.memory_size}")
    if cfg.max_length < cfg.memory_size:
        raise ValueError(f"--max-length ({cfg.max_length}) must be >= --memory-size ({cfg.memory_size}): "
                         "the capacity loss is zero on sequences no longer than the budget")
    for name in ("max_steps", "grad_accum", "save_every", "keep_checkpoints", "log_every", "logit_block"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or not 0 <= cfg.warmup_ratio < 1 or not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError("need --lr > 0, 0 <= --warmup-ratio < 1 and 0 <= --min-lr-ratio <= 1")
    if min(cfg.kl_weight, cfg.ntp_weight, cfg.capacity_weight, cfg.max_grad_norm) < 0:
        raise ValueError("loss weights and --max-grad-norm must be >= 0")
    if cfg.capacity_form not in CAPACITY_FORMS:
        raise ValueError(f"--capacity-form must be one of {CAPACITY_FORMS}, got {cfg.capacity_form!r}")
    if cfg.deepspeed and not Path(cfg.deepspeed).is_file():
        raise ValueError(f"DeepSpeed config not found: {cfg.deepspeed}")


class Log:
    """train.log (appended across resumes) on the main process; `console` lines also go to stderr."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, message: str, console: bool = True) -> None:
        if self.path is None:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if console:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)


class StopFlag:
    """Set by SIGTERM (installed on the main thread) or by `stop_after`; true once set."""

    def __init__(self):
        self.reason = None
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.set("SIGTERM"))
        except ValueError:  # not the main thread: no handler
            pass

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason

    def __bool__(self) -> bool:
        return self.reason is not None

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def padded_length(n: int, max_length: int, attention: str) -> int:
    """Flex attention is compiled per sequence length (past torch._dynamo's recompile limit it would run
    unfused, T x T), so its sequences are right-padded to a power of two >= 1024 (at most max_length): a
    handful of shapes. Padding after the last token changes nothing before it (causal attention), and the
    losses skip it. The reference backend runs every length as is."""
    if attention != "flex":
        return n
    return max(n, min(max_length, max(1024, 1 << (n - 1).bit_length())))


def check_finite(values: torch.Tensor, names: tuple[str, ...], step: int, micro: int, last_saved: Path | None) -> None:
    bad = [(name, float(values[i])) for i, name in enumerate(names) if not math.isfinite(float(values[i]))]
    if bad:
        name, value = bad[0]
        raise NonFiniteLossError(f"non-finite loss at step {step} (micro-batch {micro}): {name} = {value}; "
                                 f"last good checkpoint: {last_saved or 'none (no checkpoint written yet)'}")


def params_record(cfg, model, world, attention, dtype, n_params) -> dict:
    import transformers

    import trimkv

    return {**asdict(cfg), "world_size": world, "student_attention": f"trimkv_{attention}", "dtype": str(dtype),
            **METHODS[cfg.method].describe(model), "gate_tensors": n_params,
            "gate_parameters": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad),
            "versions": {"trimkv": trimkv.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def metrics_record(state: dict, cfg: TrainConfig, complete: bool) -> dict:
    history = state["history"]
    curves = {k: [h[k] for h in history] for k in (history[0] if history else {})}
    final = dict(history[-1]) if history else {}
    final.update(steps=state["step"], max_steps=cfg.max_steps, train_tokens=state["tokens"],
                 train_seconds=state["elapsed_s"], complete=complete)
    return {"final": final, "curves": curves}


if __name__ == "__main__":  # `python -m trimkv.train.trainer ...`, the same options as `python -m trimkv train`
    _parser = argparse.ArgumentParser(prog="python -m trimkv.train.trainer")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["train", *sys.argv[1:]])
    try:
        raise SystemExit(_args.func(_args))
    except ValueError as _e:
        print(f"error: {_e}", file=sys.stderr)
        raise SystemExit(2) from None
