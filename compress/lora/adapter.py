"""Read a PEFT LoRA adapter directory into per-module factors, checked against a base model.

A PEFT adapter is `adapter_config.json` plus `adapter_model.safetensors`
(older ones: `adapter_model.bin`, a pickle, read only with the explicit
opt-in). Tensor names are the PeftModel's: `base_model.model.<module>.lora_A.weight`
(r, in), `...lora_B.weight` (out, r), DoRA's `...lora_magnitude_vector` (out,),
and whole tensors the adapter replaces (`modules_to_save`, trained biases)
under their base names. The scale of a module is alpha / r, or alpha / sqrt(r)
with rsLoRA, where `rank_pattern` / `alpha_pattern` override r and alpha for
the modules whose name ends with a pattern (PEFT's rule).

The files are checked as they are read (`compress.files`), every tensor must
be finite, and the modules the tensors adapt must be the ones the config's
`target_modules` selects (PEFT would silently drop the others on load).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checks import check_tensors
from compress.files import load_pickled, load_safetensors, read_json_object

log = logging.getLogger(__name__)

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


def _targeted(cfg: dict[str, Any], name: str) -> bool:
    """Whether PEFT's config selects module `name`: target_modules (a string is a regex full match, a list
    matches a name equal to or ending with `.entry`, "all-linear" anything), less exclude_modules, restricted
    to layers_to_transform (the index after layers_pattern, or the first numbered segment)."""
    exclude = cfg.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, name) if isinstance(exclude, str)
                    else any(name == e or name.endswith(f".{e}") for e in exclude)):
        return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = cfg.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    found = None
    for pattern in patterns or [None]:  # the first numbered segment, not an expert index further in
        found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." if pattern else r".*?\.[^.]*\.(?P<idx>\d+)\.",
                         name)
        if found:
            break
    if found is None:
        return False
    index = int(found["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _check_targets(path: Path, cfg: dict[str, Any], modules: list[str]) -> None:
    """Refuse tensors for modules the config's target_modules does not select, or a target_modules that
    selects none of the adapted modules: PEFT would load such an adapter differently from this merge."""
    if cfg.get("target_parameters"):  # PEFT's LoRA on bare parameters: transformers 5's fused MoE experts, routers
        raise ValueError(f"{path}: the adapter adapts parameters, not modules (target_parameters "
                         f"{cfg['target_parameters']!r}: LoRA on fused mixture-of-experts experts or a router), "
                         "which merge-lora does not merge yet; train the adapter with target_modules only")
    targets = cfg.get("target_modules")
    if targets is None:
        return  # PEFT's per-architecture default: nothing to compare with
    if not isinstance(targets, str | list) or (isinstance(targets, list)
                                               and not all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{path / 'adapter_config.json'}: target_modules must be a string or a list of names, "
                         f"got {targets!r}")
    try:
        stray = [m for m in modules if not _targeted(cfg, m)]
    except re.error as e:
        raise ValueError(f"{path / 'adapter_config.json'}: target_modules or exclude_modules is not a valid "
                         f"regular expression ({e})") from None
    if stray or not modules:
        if stray:
            more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
            detail = f"{stray[0]}{more} has LoRA tensors but is not selected"
        else:
            detail = "there are no LoRA tensors for what it selects"
        held = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in modules})) or "nothing"
        raise ValueError(f"{path}: adapter_config.json's target_modules {targets!r} disagree with the adapter's "
                         f"tensors: {detail} (the tensors adapt {held}); a hand-edited config or weights from "
                         "another adapter?")


def _read_tensors(path: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the weights file, its tensors), checked: framing, and every tensor finite."""
    st = path / "adapter_model.safetensors"
    binary = path / "adapter_model.bin"
    if st.is_file():
        f, tensors = st, load_safetensors(st)
    elif binary.is_file():
        if not allow_pickle:
            raise ValueError(f"{binary} is a pickle; pass --allow-pickle (allow_pickle: true) if you trust it, "
                             "or convert the adapter to safetensors")
        f, tensors = binary, load_pickled(binary)
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{binary}: not a state dict of tensors")
    else:
        raise ValueError(f"{path}: no adapter_model.safetensors (or adapter_model.bin) in the adapter directory")
    check_tensors(tensors, what=f"adapter {f}")
    return f, tensors


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Parse a PEFT LoRA adapter directory (config and weights); no base model needed yet."""
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    cfg = read_json_object(cfg_file, what="adapter config")
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
    _, tensors = _read_tensors(path, allow_pickle)
    for key, t in tensors.items():
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
    if parts or replaced:
        _check_targets(path, cfg, sorted(parts))
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
    from compress.quantize.qembedding import QuantEmbedding
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
        if not isinstance(mod, nn.Linear | QuantLinear) or isinstance(mod, QuantEmbedding):
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


def check_combination(adapters: list[Adapter]) -> None:
    if len(adapters) > 1 and any(a.dora for a in adapters):
        raise ValueError("DoRA adapters rescale whole rows and do not add up: merge a DoRA adapter on its own")
    seen: dict[str, str] = {}
    for a in adapters:
        for name in a.replaced:
            if name in seen:
                raise ValueError(f"adapters {seen[name]} and {a.path} both replace {name}: merge them separately")
            seen[name] = str(a.path)


def drop_sparsity_record(model: nn.Module, names: list[str]) -> None:
    """A dense LoRA delta fills a pruned module's zeros: it is no longer sparse, so it leaves the record."""
    from compress.prune.sparsity import CONFIG_KEY, pruned_modules

    sparse = pruned_modules(model)
    densified = sorted(set(sparse) & set(names))
    if densified:
        log.warning("lora_merge: merging dense deltas into %d pruned modules (%s, ...) removes their sparsity",
                    len(densified), densified[0])
        setattr(model.config, CONFIG_KEY, {"modules": {k: v for k, v in sparse.items() if k not in densified}})


def replace_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Give tensor `name` the adapter's value; a tied one (an output head sharing the embedding) is untied first,
    since the adapter trained a copy of it (PEFT's modules_to_save) and the other user keeps the base value."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    t = getattr(owner, attr)
    shared = [n for n, p in model.named_parameters(remove_duplicate=False) if p is t and n != name]
    if shared:
        setattr(owner, attr, nn.Parameter(value.detach().to(t.dtype).clone(), requires_grad=t.requires_grad))
        get_head = getattr(model, "get_output_embeddings", None)
        if get_head is not None and get_head() is owner and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # saved and loaded as two tensors from now on
        log.info("lora_merge: %s was tied to %s; untied to take the adapter's value", name, shared[0])
        return
    with torch.no_grad():
        t.copy_(value.to(t.dtype))
