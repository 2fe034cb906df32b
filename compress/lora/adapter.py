"""Read a PEFT LoRA adapter directory into per-module factors, checked against a base model.

A PEFT adapter is `adapter_config.json` plus `adapter_model.safetensors`
(older ones: `adapter_model.bin`, a pickle, read only with the explicit
opt-in). Tensor names are the PeftModel's: `base_model.model.<module>.lora_A.weight`
(r, in), `...lora_B.weight` (out, r), DoRA's `...lora_magnitude_vector` (out,),
and whole tensors the adapter replaces (`modules_to_save`, trained biases)
under their base names. The scale of a module is alpha / r, or alpha / sqrt(r)
with rsLoRA, where `rank_pattern` / `alpha_pattern` override r and alpha for
the modules whose name ends with a pattern (PEFT's rule).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$")
_UNSUPPORTED = re.compile(r"\.(lora_embedding_[AB]|lora_[A-Z]\w*|lora_\w+)(\.|$)")


@dataclass(frozen=True)
class LoraFactors:
    """One adapted Linear: delta W = scale * B @ A; DoRA adds the per-row magnitude."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    magnitude: torch.Tensor | None = None  # (out,) DoRA only

    def delta(self) -> torch.Tensor:
        """scale * B @ A in float32, (out, in)."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass(frozen=True)
class Adapter:
    path: Path
    modules: dict[str, LoraFactors]  # base module name -> factors
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name -> new value
    base_model: str | None = None  # what the adapter says it was trained on (informational)

    @property
    def dora(self) -> bool:
        return any(f.magnitude is not None for f in self.modules.values())


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's rule: the first pattern that the module name ends with (after a dot) wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(st)
    binary = path / "adapter_model.bin"
    if binary.is_file():
        if not allow_pickle:
            raise ValueError(f"{binary} is a pickle; pass --allow-pickle (allow_pickle: true) if you trust it, "
                             "or convert the adapter to safetensors")
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: no adapter_model.safetensors (or adapter_model.bin) in the adapter directory")


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Parse a PEFT LoRA adapter directory (config and weights); no base model needed yet."""
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise ValueError(f"{path}: peft_type {kind!r} is not supported; only LoRA (and DoRA) adapters merge")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, int | float):
        raise ValueError(f"{cfg_file}: needs a positive integer 'r' and a numeric 'lora_alpha'")
    rslora = bool(cfg.get("use_rslora", False))
    if cfg.get("fan_in_fan_out", False):  # GPT-2 style Conv1D weights stored (in, out)
        raise ValueError(f"{path}: fan_in_fan_out adapters (Conv1D bases such as GPT-2) are not supported")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, t in _read_tensors(path, allow_pickle).items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".base_layer.", ".")  # a trained bias of an adapted Linear (bias: lora_only / all)
        m = _LORA.match(name)
        if m:
            parts.setdefault(m["module"], {})[m["kind"]] = t
        elif _UNSUPPORTED.search(name):
            raise ValueError(f"{path}: tensor {key} is a LoRA variant this merge does not support "
                             "(embedding and convolution LoRA are not merged)")
        else:
            replaced[name] = t
    modules = {}
    for name, p in sorted(parts.items()):
        if "lora_A" not in p or "lora_B" not in p:
            raise ValueError(f"{path}: module {name} has {sorted(p)} but needs both lora_A and lora_B")
        A, B = p["lora_A"], p["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{path}: module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                             "are not (r, in) and (out, r)")
        rank = _pattern_value(name, cfg.get("rank_pattern"), r)
        a = _pattern_value(name, cfg.get("alpha_pattern"), alpha)
        if rank != A.shape[0]:
            raise ValueError(f"{path}: module {name} has rank {A.shape[0]} but the config says {rank}")
        scale = a / math.sqrt(rank) if rslora else a / rank
        mag = p.get("lora_magnitude_vector")
        modules[name] = LoraFactors(A, B, float(scale), None if mag is None else mag.reshape(-1))
    if not modules and not replaced:
        raise ValueError(f"{path}: the adapter holds no tensors")
    return Adapter(path, modules, replaced, cfg.get("base_model_name_or_path"))


def check_against(adapter: Adapter, model: nn.Module) -> None:
    """Refuse an adapter whose modules or shapes are not the model's, naming the first mismatch."""
    from compress.quantize.qlinear import QuantLinear
    from compress.quantize.w8a8linear import W8A8Linear

    for name, f in adapter.modules.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter {adapter.path}: target module {name} is not in the model") from None
        if isinstance(mod, W8A8Linear):
            raise ValueError(f"adapter {adapter.path}: module {name} is W8A8 (int8 activations); merging into "
                             "W8A8 artifacts is not supported: merge into the float model, then quantize")
        if not isinstance(mod, nn.Linear | QuantLinear):
            raise ValueError(f"adapter {adapter.path}: module {name} is a {type(mod).__name__}, not a Linear")
        out, n_in = mod.out_features, mod.in_features
        if f.A.shape[1] != n_in or f.B.shape[0] != out:
            raise ValueError(f"adapter {adapter.path}: module {name} is ({out}, {n_in}) in the model but the "
                             f"adapter's B @ A is ({f.B.shape[0]}, {f.A.shape[1]}): trained on another base?")
        if f.magnitude is not None and f.magnitude.numel() != out:
            raise ValueError(f"adapter {adapter.path}: module {name}: DoRA magnitude has {f.magnitude.numel()} "
                             f"entries for {out} outputs")
    state = model.state_dict(keep_vars=True)
    for name, t in adapter.replaced.items():
        if name not in state:
            raise ValueError(f"adapter {adapter.path}: tensor {name} replaces nothing in the model")
        if tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(f"adapter {adapter.path}: tensor {name} is {tuple(t.shape)} but the model's is "
                             f"{tuple(state[name].shape)}")
