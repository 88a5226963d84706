"""Pretrain a tiny Qwen3-architecture model from scratch on the synthetic task (CPU, minutes).

The loop, top to bottom: every step draws a fresh batch from the train stream (the train split is a
prefix of it; validation/test fact assignments are never drawn), so a batch's accuracy *before* its
update is an unbiased held-out estimate; that drives the length curriculum (short sequences until the
answers are learned, then full length). Every `eval_every` steps: teacher-forced answer accuracy on
the validation split, a checkpoint, and an early stop once `target_accuracy` is reached at full length.
At the end: greedy generation with a full cache on validation, and the folder is a normal Hugging Face
model (`save_pretrained` + tokenizer) with `metrics.json` and the `task.json` it was trained on.

Recipe: 2 layers, width 128, 4 query / 2 KV heads of dim 32 (0.61M parameters), AdamW 3e-3, batch 32,
curriculum 64 -> 128 -> mixed lengths up to 256, early stop at 0.99. Measured on the default task
(seeds 0, 1, 2): stops after 150, 150, 200 steps with full-cache validation accuracy 0.999, 0.990,
0.9995. Time: ~0.14 s per 64-token step measured on 2 quiet cores, so an estimated 40-60 s of
training on an idle 2-core machine (measured 2-7 min on one shared with other jobs). What made it fast: the loss weighting
(`prompt_weight`; a plain LM loss took ~1000 steps) and the 64-token first stage.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from trimkv.synthetic.task import TaskConfig, cue, held_out_assignments, make_example, read_config, read_split

CHECKPOINT = "pretrain_checkpoint.pt"


@dataclass
class ModelShape:
    """The tiny base model (Qwen3 architecture)."""

    layers: int = 2
    hidden: int = 128
    intermediate: int = 512
    heads: int = 4  # query heads
    kv_heads: int = 2  # grouped-query attention, as in the real Qwen3 models
    head_dim: int = 32
    rope_theta: float = 10000.0


@dataclass
class PretrainConfig:
    steps: int = 1000  # upper bound; stops earlier at target_accuracy
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    curriculum: tuple[int, ...] = (64, 128)  # shorter lengths trained first; the task length comes last
    curriculum_accuracy: float = 0.9  # move on once recent batches reach this answer accuracy
    # Final stage: each batch's length uniform in [first curriculum length, task length]. A model that has
    # seen many context lengths copes better with a cache that holds fewer tokens than it saw.
    mix_lengths: bool = True
    # Loss = CE(answers + </s>) + CE(short-lived pairs after their cue) + prompt_weight * CE(other prompt
    # tokens), each a mean over its own tokens. Filler is unpredictable by design: weighted per token like the
    # rest it swamps the few answers (measured: ~150 steps answers-only, ~1000 as a plain LM); a small weight
    # still teaches the prompt's statistics, so the model is a sensible LM everywhere.
    prompt_weight: float = 0.1
    eval_every: int = 50
    eval_samples: int = 256  # validation samples for the teacher-forced accuracy
    target_accuracy: float = 0.99  # early stop once validation reaches it at full length (1.0: never)
    seed: int = 0
    shape: ModelShape = field(default_factory=ModelShape)

    def __post_init__(self):
        if self.prompt_weight < 0:
            raise ValueError(f"prompt_weight must be >= 0, got {self.prompt_weight}")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def build_model(tokenizer, shape: ModelShape, max_length: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=max(max_length, 512) * 4,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta}, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def encode(words_batch: list[list[str]], vocab: dict[str, int]) -> torch.Tensor:
    """Task words -> ids, (B, T). Same ids as `tokenizer(text)` (tested), without its per-call overhead."""
    return torch.tensor([[vocab[w] for w in words] for words in words_batch], dtype=torch.long)


def mixed_length(step: int, low: int, high: int, seed: int) -> int:
    """The length of batch `step` in the final stage: uniform in [low, high], a pure function of the step."""
    return int(np.random.default_rng([seed, step]).integers(low, high + 1))


def train_batch(task: TaskConfig, step: int, batch_size: int, vocab, exclude) -> torch.Tensor:
    """Batch `step` of the train stream at `task.length`: samples [step * B, (step + 1) * B)."""
    return encode([make_example(task, "train", step * batch_size + j, exclude)[1] for j in range(batch_size)], vocab)


def answer_slice(task: TaskConfig) -> slice:
    """Positions whose logits predict the K answers (teacher forcing)."""
    return slice(task.prompt_tokens - 1, task.prompt_tokens - 1 + task.keys)


def losses(logits: torch.Tensor, ids: torch.Tensor, task: TaskConfig, cue_ids: torch.Tensor,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean next-token CE over (answers + </s>, short-lived pairs after their cue, the other prompt tokens).

    logits (B, T, V), ids (B, T); the logit at position p predicts token p + 1.
    """
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    first_answer = task.prompt_tokens - 1
    prompt_ce = ce[:, :first_answer]
    copy = torch.isin(ids[:, :first_answer], cue_ids)  # (B, P): predicts the short-lived pair asked for
    copy_loss = prompt_ce[copy].mean() if bool(copy.any()) else prompt_ce.sum() * 0
    rest = ~copy
    return ce[:, first_answer:].mean(), copy_loss, prompt_ce[rest].mean()


def answer_accuracy(logits: torch.Tensor, ids: torch.Tensor, task: TaskConfig) -> float:
    """Teacher-forced accuracy over the answers: logits (B, T, V), ids (B, T)."""
    s = answer_slice(task)
    pred = logits[:, s].argmax(-1)
    gold = ids[:, s.start + 1:s.stop + 1]
    return float((pred == gold).float().mean())


@torch.no_grad()
def validation_accuracy(model, ids: torch.Tensor, task: TaskConfig, batch_size: int = 64) -> float:
    model.eval()
    hits = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        hits.append(answer_accuracy(model(chunk).logits, chunk, task) * len(chunk))
    model.train()
    return sum(hits) / len(ids)


@torch.no_grad()
def generation_accuracy(model, tokenizer, examples, batch_size: int = 64, progress: bool = False) -> float:
    """Greedy generation with the model's own (full) cache; accuracy over every answer of `examples`."""
    from tqdm.auto import tqdm

    model.eval()
    correct = total = 0
    for i in tqdm(range(0, len(examples), batch_size), desc="generate (full cache)", disable=not progress):
        chunk = examples[i:i + batch_size]
        # All prompts of a task have the same length: no padding needed.
        inputs = tokenizer([e.prompt for e in chunk], return_tensors="pt")
        keys = len(chunk[0].answers)
        out = model.generate(**inputs, max_new_tokens=keys + 1, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for e, text in zip(chunk, texts):
            got = text.split()
            correct += sum(a == b for a, b in zip(got, e.answers))
            total += len(e.answers)
    return correct / max(total, 1)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def pretrain(data_dir: Path, out: Path, cfg: PretrainConfig, resume: bool = True, progress: bool = True) -> dict:
    """Pretrain on the splits in `data_dir` (from `synthetic generate`) and save the model folder to `out`."""
    from tqdm.auto import tqdm

    from trimkv.synthetic.tokenizer import build_tokenizer

    data_dir, out = Path(data_dir), Path(out)
    task = read_config(data_dir)
    lengths = [n for n in cfg.curriculum if n < task.length] + [task.length]
    stages = [task.with_length(n) for n in lengths]  # raises a clear error for a too-short stage
    tokenizer = build_tokenizer(task)
    vocab = tokenizer.get_vocab()
    cue_ids = torch.tensor([vocab[cue(k)] for k in range(task.keys, task.keys + task.distractor_keys)])
    exclude = frozenset(held_out_assignments(data_dir))
    validation = read_split(data_dir, "validation")
    if not validation:
        raise ValueError(f"{data_dir}/validation.jsonl is empty: generate at least one validation sample")
    val_ids = torch.tensor([ids + [tokenizer.eos_token_id] for ids in
                            tokenizer([e.text for e in validation[:cfg.eval_samples]])["input_ids"]])

    torch.manual_seed(cfg.seed)
    model = build_model(tokenizer, cfg.shape, task.length)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    # State a killed run resumes from (the data of step s is a pure function of s and the stage).
    state = {"step": 0, "stage": 0, "elapsed_s": 0.0, "cpu_s": 0.0, "history": [], "evals": [], "recent": []}
    ckpt = out / CHECKPOINT
    if resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        if saved["config"] != asdict(cfg) or saved["task"] != task.to_json():
            raise ValueError(f"{ckpt} was written with other settings; delete it or pass --no-resume")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    out.mkdir(parents=True, exist_ok=True)

    def save_checkpoint():
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                    "config": asdict(cfg), "task": task.to_json()}, tmp)
        tmp.replace(ckpt)

    n_params = sum(p.numel() for p in model.parameters())
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="pretrain", disable=not progress)
    start = time.perf_counter() - state["elapsed_s"]
    cpu_start = time.process_time() - state["cpu_s"]
    done = False
    while state["step"] < cfg.steps and not done:
        step = state["step"]
        stage = stages[state["stage"]]
        if cfg.mix_lengths and state["stage"] == len(stages) - 1:
            stage = task.with_length(mixed_length(step, lengths[0], task.length, cfg.seed))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        ids = train_batch(stage, step, cfg.batch_size, vocab, exclude)
        logits = model(ids).logits
        answer_loss, copy_loss, prompt_loss = losses(logits, ids, stage, cue_ids)
        loss = answer_loss + copy_loss + cfg.prompt_weight * prompt_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        loss = loss.item()
        batch_acc = answer_accuracy(logits.detach(), ids, stage)  # measured before this batch's update
        state["recent"] = (state["recent"] + [batch_acc])[-10:]
        state["history"].append({"step": step, "length": stage.length, "loss": round(loss, 5),
                                 "answer_loss": round(answer_loss.item(), 5),
                                 "copy_loss": round(copy_loss.item(), 5), "prompt_loss": round(prompt_loss.item(), 5),
                                 "batch_accuracy": round(batch_acc, 4)})
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(len=stage.length, loss=f"{loss:.3f}", acc=f"{batch_acc:.2f}")

        last_stage = state["stage"] == len(stages) - 1
        if not last_stage and len(state["recent"]) == 10 and min(state["recent"][-5:]) >= cfg.curriculum_accuracy:
            state["stage"] += 1
            state["recent"] = []
            bar.write(f"step {state['step']}: answer accuracy {batch_acc:.3f} at length {stage.length}; "
                      f"length -> {stages[state['stage']].length}")
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            acc = validation_accuracy(model, val_ids, task)
            state["elapsed_s"] = time.perf_counter() - start
            state["cpu_s"] = time.process_time() - cpu_start
            state["evals"].append({"step": state["step"], "validation_accuracy": round(acc, 4),
                                   "elapsed_s": round(state["elapsed_s"], 1)})
            bar.write(f"step {state['step']}: validation answer accuracy {acc:.4f} (teacher-forced, T={task.length})"
                      f", {state['elapsed_s']:.0f}s")
            done = last_stage and acc >= cfg.target_accuracy
            save_checkpoint()
    bar.close()
    train_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start

    t0 = time.perf_counter()
    gen_acc = generation_accuracy(model, tokenizer, validation, progress=progress)
    eval_s = time.perf_counter() - t0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "task.json").write_text(json.dumps(task.to_json(), indent=2))
    metrics = {
        "task": task.to_json(),
        "pretrain": {k: v for k, v in asdict(cfg).items()},
        "parameters": n_params,
        "steps": state["step"],
        "stopped_early": state["step"] < cfg.steps,
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(cpu_s, 1),  # all threads; on an idle machine wall ~ cpu / threads
        "threads": torch.get_num_threads(),
        "final_loss": state["history"][-1]["loss"] if state["history"] else None,
        "validation_accuracy_teacher_forced": state["evals"][-1]["validation_accuracy"] if state["evals"] else None,
        "validation_accuracy_full_cache": round(gen_acc, 4),
        "validation_samples": len(validation),
        "validation_eval_seconds": round(eval_s, 1),
        "evals": state["evals"],
        "loss_curve": state["history"],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ckpt.unlink(missing_ok=True)  # the model folder is the result; the checkpoint only served resuming
    return metrics
