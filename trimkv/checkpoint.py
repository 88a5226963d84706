"""Save and load retention gates: our own format and the released upstream checkpoints.

Our format (a directory written by `save_gates`):
    trimkv_gates.safetensors   the gate tensors only, keyed by their parameter names in the model
    trimkv_config.json         format version, base model (+ revision), gate config, architecture, extra

Upstream format (e.g. ngocbh/TrimKV-Qwen3-4B-Math):
    config.json                the base model's HF config plus `base_model`, `retention_gate_*`,
                               `memory_size`, `buffer_size`, `trainable_params`
    trimkv_weights.pth         torch.save'd dict with the same gate keys as ours

`load_pretrained` validates a checkpoint (readable files, gate keys and shapes, base model
architecture from its config alone) before it loads any base model weights, so a bad checkpoint fails
in seconds with one line naming the file and the key or field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trimkv.gates import GateConfig, attach_gates, gate_parameters, gates, num_kv_heads

FORMAT_VERSION = 1
GATES_FILE = "trimkv_gates.safetensors"
CONFIG_FILE = "trimkv_config.json"
UPSTREAM_CONFIG_FILE = "config.json"
UPSTREAM_WEIGHTS_FILE = "trimkv_weights.pth"
GATE_KEY = "model.layers.{i}.self_attn.retention_gate.{name}"
ARCHITECTURE_FIELDS = ("model_type", "num_layers", "hidden_size", "num_kv_heads")
NOT_A_CHECKPOINT = "is not a gate checkpoint"
_CONFIG_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "trust_remote_code")


@dataclass
class Checkpoint:
    """A checkpoint read from disk and validated against its own config; not yet applied to a model."""

    path: Path
    format: str  # "trimkv" | "upstream" | "locret" (trimkv/locret.py: LocRet heads, gate_config a LocretConfig)
    #              | "seerattn_r" (trimkv/seer.py: SeerAttention-R AttnGates, gate_config a SeerConfig)
    architecture: dict[str, Any]  # ARCHITECTURE_FIELDS -> value
    gate_config: GateConfig
    base_model: str | None
    base_revision: str | None
    defaults: dict[str, Any]  # memory_size / buffer_size the gates were trained with, if known
    tensors: dict[str, torch.Tensor]

    @property
    def weights_file(self) -> Path:
        return self.path / (GATES_FILE if self.format == "trimkv" else UPSTREAM_WEIGHTS_FILE)


def save_gates(model: nn.Module, path: str | os.PathLike, base_model: str | None = None,
               revision: str | None = None, extra: dict | None = None) -> Path:
    """Write the model's gates to `path/trimkv_gates.safetensors` + `path/trimkv_config.json`.

    base_model defaults to `model.config._name_or_path`; `extra` (e.g. the memory_size used in
    training) is stored as is and must be JSON-serializable. Each file is written to a temp file and
    renamed into place, and the config (the marker of a finished save) is removed first and written
    last, so a killed save never leaves a directory that looks complete.
    """
    gates(model)  # clear error if no gates are attached
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model or model.config._name_or_path or None,
        "revision": revision,
        "gate_config": model.trimkv_gate_config.to_dict(),
        **model_architecture(model.config),
        "extra": extra or {},
    }
    return _write_checkpoint(path, GATES_FILE, CONFIG_FILE, gate_parameters(model), meta, "trimkv")


def _write_checkpoint(path: str | os.PathLike, tensors_file: str, config_file: str, tensors: dict[str, torch.Tensor],
                      meta: dict, tensor_format: str) -> Path:
    """The tensors, then the config: the config (the marker of a finished save) is removed first and written last,
    each file through a temp file renamed into place, so a killed save never looks complete."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    config_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    (path / config_file).unlink(missing_ok=True)
    _atomic_write(path / tensors_file, lambda tmp: save_file(tensors, tmp, metadata={"format": tensor_format}))
    _atomic_write(path / config_file, lambda tmp: Path(tmp).write_text(config_text))
    return path


def load_gates(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach gates to `model` (in place) with the checkpoint's GateConfig and load their weights.

    Reads either format. Raises a one-line ValueError if the checkpoint is unreadable or incomplete,
    or if `model` is not the architecture the gates were trained on.
    """
    return _apply(read_checkpoint(path), model)


def load_pretrained(path_or_hub_id: str | os.PathLike, revision: str | None = None, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, base_model: str | None = None,
                    **from_pretrained_kwargs) -> nn.Module:
    """Load base model + gates from a local directory or Hub repo, in our format or the upstream one.

    revision: the revision of the checkpoint repo (the base model's revision comes from the checkpoint).
    base_model: load this base model instead of the one the checkpoint names (e.g. a local copy).
    device: the model is moved there after loading; pass `device_map=` for direct placement.
    The model gets `trimkv_source` (path + revision of the checkpoint, its format, the base model and
    base_revision actually loaded) and `trimkv_defaults` (memory_size/buffer_size from training, when
    the checkpoint records them).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = read_checkpoint(_resolve(path_or_hub_id, revision))
    base_revision = ckpt.base_revision if base_model is None else None
    base_model = base_model or ckpt.base_model
    if not base_model:
        raise ValueError(f"trimkv: {ckpt.path} names no base model; pass base_model=")
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in _CONFIG_KWARGS}
    _check_architecture(ckpt, AutoConfig.from_pretrained(base_model, revision=base_revision, **hub_kwargs))
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(base_model, revision=base_revision, **from_pretrained_kwargs)
    if device is not None:
        model.to(device)
    _apply(ckpt, model)
    model.trimkv_source.update(path=str(path_or_hub_id), revision=revision, base_model=base_model,
                               base_revision=base_revision)
    return model


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory of either format and check its tensors against its own config."""
    from trimkv import locret, seer

    path = Path(path)
    if (path / locret.CONFIG_FILE).is_file():  # LocRet retaining heads (trimkv/locret.py)
        return locret.FORMAT.read(path)
    if (path / seer.CONFIG_FILE).is_file():  # SeerAttention-R AttnGates (trimkv/seer.py)
        return seer.FORMAT.read(path)
    if (path / CONFIG_FILE).is_file():
        ckpt = _read_ours(path)
    elif (path / UPSTREAM_CONFIG_FILE).is_file() and (path / UPSTREAM_WEIGHTS_FILE).is_file():
        ckpt = _read_upstream(path)
    else:
        raise ValueError(f"trimkv: {path} {NOT_A_CHECKPOINT}: expected {CONFIG_FILE} + {GATES_FILE}"
                         f" or {UPSTREAM_CONFIG_FILE} + {UPSTREAM_WEIGHTS_FILE}")
    _check_tensors(ckpt.tensors, _expected_shapes(ckpt.architecture, ckpt.gate_config), ckpt.weights_file)
    return ckpt


def model_architecture(config) -> dict[str, Any]:
    """The fields a gate checkpoint must agree on with its base model."""
    return {"model_type": config.model_type, "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "num_kv_heads": num_kv_heads(config)}


def _resolve(path_or_id: str | os.PathLike, revision: str | None) -> Path:
    """A local directory as is; anything else is a Hub repo id, downloaded (or taken from the HF cache)."""
    if Path(path_or_id).is_dir():
        return Path(path_or_id)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(path_or_id), revision=revision))


def _read_ours(path: Path) -> Checkpoint:
    cfg = _read_json(path / CONFIG_FILE)
    version = _field(cfg, "format_version", path / CONFIG_FILE)
    if version > FORMAT_VERSION:
        raise ValueError(f"trimkv: {path / CONFIG_FILE} has format_version {version}; "
                         f"this trimkv reads <= {FORMAT_VERSION}")
    try:
        gate_config = GateConfig(**_field(cfg, "gate_config", path / CONFIG_FILE))
    except TypeError as e:
        raise ValueError(f"trimkv: {path / CONFIG_FILE}: bad gate_config: {e}") from None
    from safetensors.torch import load_file

    tensors = _read_tensors(path / GATES_FILE, lambda f: load_file(f, device="cpu"))
    extra = cfg.get("extra") or {}
    return Checkpoint(path, "trimkv", {k: _field(cfg, k, path / CONFIG_FILE) for k in ARCHITECTURE_FIELDS},
                      gate_config, cfg.get("base_model"), cfg.get("revision"),
                      {k: extra[k] for k in ("memory_size", "buffer_size") if k in extra}, tensors)


def _read_upstream(path: Path) -> Checkpoint:
    file = path / UPSTREAM_CONFIG_FILE
    cfg = _read_json(file)
    kind = cfg.get("retention_gate", "rg")
    if kind != "rg":  # rg2/rg3 gates read other inputs or have other weights
        raise ValueError(f"trimkv: {file}: retention_gate {kind!r} is not supported (only 'rg')")
    architecture = {
        "model_type": _field(cfg, "model_type", file).removeprefix("trimkv_"),
        "num_layers": _field(cfg, "num_hidden_layers", file),
        "hidden_size": _field(cfg, "hidden_size", file),
        "num_kv_heads": cfg.get("num_key_value_heads") or _field(cfg, "num_attention_heads", file),
    }
    gate_config = GateConfig(  # upstream gates use the base model's hidden_act
        intermediate_size=_field(cfg, "retention_gate_intermediate_size", file),
        bias_init=_field(cfg, "retention_gate_bias_init", file),
        activation=cfg.get("hidden_act", "silu"))
    tensors = _read_tensors(path / UPSTREAM_WEIGHTS_FILE,
                            lambda f: torch.load(f, map_location="cpu", weights_only=True))
    defaults = {k: cfg[k] for k in ("memory_size", "buffer_size") if k in cfg}
    return Checkpoint(path, "upstream", architecture, gate_config, cfg.get("base_model"), None, defaults, tensors)


def _apply(ckpt: Checkpoint, model: nn.Module) -> nn.Module:
    """Check the architecture, attach gates, copy the checkpoint's tensors in, and record provenance."""
    if ckpt.format == "locret":
        from trimkv.locret import FORMAT

        return FORMAT.apply(ckpt, model)
    if ckpt.format == "seerattn_r":
        from trimkv.seer import FORMAT

        return FORMAT.apply(ckpt, model)
    return _load_into(ckpt, model, attach_gates, gate_parameters, ckpt.weights_file)


def _load_into(ckpt: Checkpoint, model: nn.Module, attach: Callable, parameters: Callable,
               weights_file: Path) -> nn.Module:
    """Check the architecture, attach the modules, copy the checkpoint's tensors in, record provenance."""
    _check_architecture(ckpt, model.config)
    attach(model, ckpt.gate_config)
    params = parameters(model)
    _check_tensors(ckpt.tensors, {k: tuple(p.shape) for k, p in params.items()}, weights_file)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(ckpt.tensors[key])
    model.trimkv_defaults = dict(ckpt.defaults)
    model.trimkv_source = {"path": str(ckpt.path), "revision": None, "format": ckpt.format,
                           "base_model": ckpt.base_model, "base_revision": ckpt.base_revision}
    return model


@dataclass(frozen=True)
class ModuleFormat:
    """The checkpoint of a learned baseline's modules on a frozen base model (LocRet's heads, SeerAttention-R's
    gates): `config_file` (the marker of a finished save, written last) + `tensors_file`, checked on read against
    the shapes its own config implies and on load against the model's parameters."""

    name: str  # Checkpoint.format and the "method" in the config file
    config_file: str
    tensors_file: str
    config_key: str  # the modules' config in the config file, also `model.trimkv_<config_key>`
    config_class: type
    architecture_fields: tuple[str, ...]  # what the shapes need beyond ARCHITECTURE_FIELDS
    expected_shapes: Callable[[dict, Any], dict[str, tuple[int, ...]]]  # (architecture, config) -> shapes
    attach: Callable[[nn.Module, Any], nn.Module]  # (model, config)
    parameters: Callable[[nn.Module], dict[str, torch.Tensor]]  # the modules' tensors by full parameter name

    def save(self, model: nn.Module, path: str | os.PathLike, architecture: dict[str, Any],
             base_model: str | None = None, revision: str | None = None, extra: dict | None = None) -> Path:
        """The contract of `save_gates`: base_model defaults to the model's `_name_or_path`, `extra` (e.g. the
        training run's memory_size, read back as the default budget) is stored as is, the config file is removed
        first and written last. architecture: the values of `architecture_fields`."""
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "base_model": base_model or model.config._name_or_path or None,
            "revision": revision,
            self.config_key: getattr(model, f"trimkv_{self.config_key}").to_dict(),
            **model_architecture(model.config),
            **architecture,
            "extra": extra or {},
        }
        return _write_checkpoint(path, self.tensors_file, self.config_file, self.parameters(model), meta,
                                 f"trimkv-{self.name}")

    def read(self, path: Path) -> Checkpoint:
        """The directory as a `Checkpoint` of this format, tensors checked against its own config."""
        from safetensors.torch import load_file

        file = path / self.config_file
        cfg = _read_json(file)
        version = _field(cfg, "format_version", file)
        if version > FORMAT_VERSION:
            raise ValueError(f"trimkv: {file} has format_version {version}; this trimkv reads <= {FORMAT_VERSION}")
        try:
            config = self.config_class(**_field(cfg, self.config_key, file))
        except TypeError as e:
            raise ValueError(f"trimkv: {file}: bad {self.config_key}: {e}") from None
        architecture = {k: _field(cfg, k, file) for k in (*ARCHITECTURE_FIELDS, *self.architecture_fields)}
        tensors = _read_tensors(path / self.tensors_file, lambda f: load_file(f, device="cpu"))
        _check_tensors(tensors, self.expected_shapes(architecture, config), path / self.tensors_file)
        extra = cfg.get("extra") or {}
        return Checkpoint(path, self.name, architecture, config, cfg.get("base_model"), cfg.get("revision"),
                          {k: extra[k] for k in ("memory_size", "buffer_size") if k in extra}, tensors)

    def apply(self, ckpt: Checkpoint, model: nn.Module) -> nn.Module:
        """Check the architecture, attach the modules, copy the checkpoint's tensors in, record provenance."""
        return _load_into(ckpt, model, self.attach, self.parameters, ckpt.path / self.tensors_file)


def _check_architecture(ckpt: Checkpoint, base_config) -> None:
    found = model_architecture(base_config)
    for key in ARCHITECTURE_FIELDS:
        if found[key] != ckpt.architecture[key]:
            raise ValueError(f"trimkv: base model does not match {ckpt.path}: {key} expected "
                             f"{ckpt.architecture[key]!r}, found {found[key]!r}")


def _expected_shapes(arch: dict[str, Any], gate_config: GateConfig) -> dict[str, tuple[int, ...]]:
    d, inner, heads = arch["hidden_size"], gate_config.intermediate_size, arch["num_kv_heads"]
    shapes = {"linear1.weight": (inner, d), "linear1.bias": (inner,),
              "linear2.weight": (heads, inner), "bias": (heads,)}
    return {GATE_KEY.format(i=i, name=n): s for i in range(arch["num_layers"]) for n, s in shapes.items()}


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], file: Path) -> None:
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    for problem, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"trimkv: {file}: {problem} key {min(keys, key=str)!r}{more}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise ValueError(f"trimkv: {file}: wrong shape for {key!r}: expected {tuple(shape)}, "
                             f"found {tuple(tensors[key].shape)}")


def _read_tensors(file: Path, reader: Callable[[str], Any]) -> dict[str, torch.Tensor]:
    try:
        tensors = reader(str(file))
    except Exception as e:  # noqa: BLE001 (truncated, garbage, missing: all mean the same to the user)
        raise ValueError(f"trimkv: cannot read {file}: {type(e).__name__}: {_one_line(e)}") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"trimkv: cannot read {file}: expected a dict of tensors, found {type(tensors).__name__}")
    return tensors


def _read_json(file: Path) -> dict:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"trimkv: cannot read {file}: {type(e).__name__}: {_one_line(e)}") from None
    if not isinstance(cfg, dict):
        raise ValueError(  # noqa: TRY004 (a bad file, not a bad argument)
            f"trimkv: cannot read {file}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def _field(cfg: dict, key: str, file: Path) -> Any:
    if key not in cfg:
        raise ValueError(f"trimkv: {file}: missing key {key!r}")
    return cfg[key]


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]  # library messages can span lines; ours stay one line


def _atomic_write(final: Path, write: Callable[[str], None]) -> None:
    """Write via a temp file in the same directory, then rename: `final` exists only when complete."""
    tmp = str(final.with_name(f".{final.name}.{os.getpid()}.tmp"))  # same dir: os.replace is atomic
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
