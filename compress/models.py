"""Load and save models: Hugging Face directories, GGUF files, compress artifacts, the reference model.

- A directory with `*.safetensors` loads through transformers. A directory
  with only pickled checkpoints (`*.bin`, `*.pt`) is refused unless
  `allow_pickle=True`, and then loads with `torch.load(weights_only=True)`.
- A `.gguf` file is dequantized by transformers (needs `gguf`).
- A directory written by `save_model` with quantized modules is rebuilt with
  `QuantLinear` modules and its packed tensors, exactly as saved.
- No path: the default reference model (see `compress.reference`).

Every weights file is checked before it is read (`compress.files`: a
truncated or foreign file is named) and every loaded tensor must be finite
(`compress.checks`): a NaN or inf is refused naming the tensor and the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrate.experts import Experts, fused_experts, unfuse_experts
from compress import artifact
from compress.archs import auto_model_class
from compress.checks import check_module, check_tensors
from compress.files import (
    brief,
    check_gguf,
    check_safetensors,
    check_weights_file,
    checkpoint_mismatch,
    gguf_tensor_types,
    load_model_config,
    load_safetensors,
    read_json_object,
)

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    source_files: list[Path] = field(default_factory=list)
    provenance: dict[str, Any] | None = None  # set when loaded from a compress artifact
    # the source's weights were themselves quantized (a GGUF of quantized blocks, dequantized as it loaded):
    # {"format": "gguf", "file": ..., "tensor_types": {"Q4_K": 120, "F32": 49, ...}}
    source_quantization: dict[str, Any] | None = None
    _sha256: str | None = None

    def source_sha256(self) -> str:
        """sha256 of the source weights (computed once, on demand)."""
        if self._sha256 is None:
            if self.provenance:
                self._sha256 = self.provenance["source"]["sha256"]
            else:
                self._sha256 = artifact.sha256_files(self.source_files)
        return self._sha256

    def source_record(self) -> dict[str, Any]:
        """What an artifact made from this model records as its source: path, sha256 and, for a source whose
        weights were already quantized, their types."""
        prev = self.provenance
        rec = {"path": prev["source"]["path"] if prev else self.source, "sha256": self.source_sha256()}
        if self.source_quantization:
            rec["quantized"] = self.source_quantization
        return rec


def load_model(path: str | Path | None = None, *, allow_pickle: bool = False,
               dtype: torch.dtype = torch.float32, lazy: bool = False) -> LoadedModel:
    """Load a model directory, `.gguf` file, compress artifact, or (None) the reference model.

    With `lazy`, a safetensors model directory is not read: its weights stay on
    disk until a block-wise pass asks for them (see `compress.lazy`). Other
    sources load fully.
    """
    if path is None:
        from compress.reference import reference_model_dir

        lm = load_model(reference_model_dir(), dtype=dtype, lazy=lazy)
        src = json.loads((Path(lm.source) / "compress-source.json").read_text())
        lm._sha256 = src["sha256"]
        lm.source = src["name"]
        lm.source_quantization = quantized_gguf(src["gguf"], src.get("gguf_tensor_types", {}))
        return lm
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"model path not found: {p}")
    if p.is_file():
        if p.suffix == ".gguf":
            return _load_gguf(p, dtype)
        raise ValueError(f"{p}: expected a model directory or a .gguf file")
    if (found := gguf_file(p)) is not None:  # a GGUF artifact directory
        return _load_gguf(found, dtype)
    if (p / "model.onnx").is_file() and not any(p.glob("*.safetensors")):
        raise ValueError(f"{p} is an ONNX model: score it with `compress eval {p}` (ONNX Runtime); "
                         "torch cannot load it")
    prov = artifact.read_provenance(p)
    if prov and prov.get("quantization"):
        return _load_artifact(p, prov, dtype)
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        pickled = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if not pickled:
            raise ValueError(f"{p}: no *.safetensors or checkpoint files found")
        if not allow_pickle:
            raise ValueError(
                f"{p}: only pickled checkpoints ({pickled[0].name}); pickle can run code on load, "
                "so it is refused unless you pass --allow-pickle (then loaded with weights_only=True)")
        weights = pickled

    _check_index(p)
    if lazy and weights[0].suffix == ".safetensors":
        from compress.lazy import load_lazy

        model = load_lazy(p, weights, dtype)  # its config first: transformers 5's tokenizer loading reads it too
        if model is not None:
            return LoadedModel(model, load_tokenizer(p), str(p), weights, prov)

    for f in weights:  # a damaged file is named here, not guessed at by transformers ("a TF 2.0 checkpoint?")
        check_weights_file(f)
    config = load_model_config(p)
    model, info = auto_model_class(config).from_pretrained(
        p, config=config, dtype=dtype, use_safetensors=not allow_pickle or weights[0].suffix == ".safetensors",
        weights_only=True, output_loading_info=True, ignore_mismatched_sizes=True)  # reported: refused below
    missing = sorted(set(info["missing_keys"]) | {k for k, *_ in info["mismatched_keys"]})
    if missing:  # transformers would run them with freshly initialised (random) weights
        raise checkpoint_mismatch(p, missing)
    check_module(model, what=f"model {p}")
    unfuse_experts(model)  # one Linear per expert projection: what every pass works on
    tok = load_tokenizer(p)
    model.eval()
    return LoadedModel(model, tok, str(p), weights, prov)


def _check_index(p: Path) -> None:
    """A sharded checkpoint's index (`*.index.json`) must be JSON and name only shards that exist."""
    for index in sorted(p.glob("*.index.json")):
        data = read_json_object(index, what="checkpoint index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: damaged checkpoint index (no 'weight_map' of tensor name -> shard file)")
        missing = sorted({f for f in weight_map.values() if not (p / f).is_file()})
        if missing:
            raise ValueError(f"{index}: names shard {missing[0]}" + (f" (and {len(missing) - 1} more)" if
                             len(missing) > 1 else "") + ", which is not in the directory (an incomplete download?)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def load_tokenizer(p: Path):
    """The tokenizer saved in model directory `p`; a clear error when there is none or it cannot load."""
    from transformers import AutoTokenizer

    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{p}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); every command needs the "
                         "model's tokenizer: save it into the directory (tokenizer.save_pretrained)")
    for name in TOKENIZER_JSON:  # a truncated file is named, not reported as the tokenizers library's parse error
        if (p / name).is_file():
            read_json_object(p / name, what="tokenizer file")
    try:
        return AutoTokenizer.from_pretrained(p)
    # the `tokenizers` library reports a malformed tokenizer.json as a bare Exception ("missing field ...")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{p}: the tokenizer does not load ({brief(e)})") from None


def gguf_file(path: str | Path) -> Path | None:
    """The .gguf file `path` names: a .gguf file, or a directory (a GGUF artifact) holding exactly one; else None."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not any(p.glob("*.safetensors")):
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def _load_gguf(p: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.gguf_vocab import checked_tokenizer
    from compress.reference import as_float_model

    check_gguf(p)
    log.info("dequantizing %s with transformers", p)
    model = as_float_model(AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype))
    check_module(model, what=f"model {p}")
    tok = checked_tokenizer(p, AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name))
    model.eval()
    return LoadedModel(model, tok, str(p), [p], source_quantization=quantized_gguf(p.name, gguf_tensor_types(p)))


FLOAT_GGUF_TYPES = ("F32", "F16", "BF16", "F64")


def quantized_gguf(name: str, types: dict[str, int]) -> dict[str, Any] | None:
    """The `source_quantization` record of a GGUF whose tensors have `types` (None if all are float)."""
    if not any(t not in FLOAT_GGUF_TYPES for t in types):
        return None
    return {"format": "gguf", "file": name, "tensor_types": dict(sorted(types.items()))}


def _load_artifact(p: Path, prov: dict[str, Any], dtype: torch.dtype) -> LoadedModel:
    """Rebuild a quantized model: float skeleton, QuantLinear where recorded, saved tensors."""
    from transformers.initialization import no_init_weights

    import compress.quantize.qembedding  # noqa: F401  (the built-in packed kinds register when defined)
    import compress.quantize.qlinear  # noqa: F401
    import compress.quantize.w8a8linear  # noqa: F401
    from compress.pipeline import RECIPE_ATTR
    from compress.quantize.packed import from_layout
    from compress.quantize.qembedding import link_tied_heads
    from compress.targets import set_submodule

    files = sorted(p.glob("*.safetensors"))
    for f in files:  # before any work: a damaged file is named first
        check_safetensors(f)
    config = load_model_config(p)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours to interpret, not transformers'
    with no_init_weights():
        model = auto_model_class(config).from_config(config, dtype=dtype)
    unfuse_experts(model, copy_weights=False)  # saved per expert, as every pass sees them
    for name, info in prov["quantization"]["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{p}: quantized module {name} is not in the model") from None
        try:
            new = from_layout(info, dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{p}: quantized module {name} has a layout this version cannot build ({e})") from None
        set_submodule(model, name, new)
        del old
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_safetensors(f))
    check_tensors(state, what=f"model {p}")  # packed integer codes are skipped; scales and floats are not
    state = renamed_as_transformers_loads(model, state, p)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    link_tied_heads(model)  # an output layer over the quantized embedding's matrix
    tied = set(model.all_tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{p}: tensors do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    setattr(model, RECIPE_ATTR, list(prov.get("recipe", [])))  # how it was quantized: LoRA merging re-does it
    tok = load_tokenizer(p)
    return LoadedModel(model, tok, str(p), files, prov, source_quantization=prov["source"].get("quantized"))


def renamed_as_transformers_loads(model: nn.Module, state: dict[str, torch.Tensor],
                                   p: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's names: transformers 5 saves some architectures under their
    original checkpoint names (GPT-NeoX's `embed_out` for `lm_head`) and renames them as it loads."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    transforms = get_model_conversion_mapping(model, add_legacy=False)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if fused_experts(model) or len(renamings) != len(transforms) and not any(isinstance(m, Experts)
                                                                             for m in model.modules()):
        raise ValueError(f"{p}: transformers converts the tensors of {model.config.model_type} checkpoints as they "
                         "load (fused experts in a layout compress does not split); a packed artifact of it "
                         "cannot be rebuilt")
    return {apply_renamings(k, renamings): v for k, v in state.items()} if renamings else state


def quantized_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """name -> layout of every packed module in `model` (what the loader needs to rebuild it)."""
    from compress.quantize.packed import PackedLinear

    return {name: m.layout() for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def save_model(lm: LoadedModel, out: str | Path, *, recipe: list[dict[str, Any]] | None = None,
               reports: list[Any] = (), force: bool = False,
               config_extra: dict[str, Any] | None = None) -> Path:
    """Write `lm` as a Hugging Face directory (safetensors) plus `compress.json`, atomically.

    `recipe` is the list of steps applied since `lm` was loaded; it is appended
    to the provenance of an artifact that was itself produced by compress.
    Quantized models get a compressed-tensors style `quantization_config` in
    config.json; `config_extra` keys are merged into config.json as well.
    """
    modules = quantized_modules(lm.model)
    prev = lm.provenance
    full_recipe = (prev.get("recipe", []) if prev else []) + list(recipe or [])
    prov = artifact.provenance(
        source=lm.source_record(),
        recipe=full_recipe,
        reports=[r.to_dict() if hasattr(r, "to_dict") else r for r in reports],
        quantization={"format": "pack-quantized", "modules": modules} if modules else None,
        previous=prev,
    )
    if modules:
        from compress.quantize.ctconfig import quantization_config

        floats = [n for n, m in lm.model.named_modules() if isinstance(m, nn.Linear)]
        config_extra = {**(config_extra or {}), "quantization_config": quantization_config(modules, floats)}
    from compress.lazy import store_of

    store = store_of(lm.model)
    with artifact.atomic_dir(out, force=force) as tmp:
        if store is None:
            lm.model.save_pretrained(tmp)
        else:  # weights on disk: stream them tensor by tensor
            lm.model.config.save_pretrained(tmp)
            if getattr(lm.model, "generation_config", None) is not None:
                lm.model.generation_config.save_pretrained(tmp)
            store.save(tmp)
        lm.tokenizer.save_pretrained(tmp)
        if config_extra:
            cfg_path = tmp / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.update(config_extra)
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        artifact.write_json_atomic(tmp / artifact.PROVENANCE_FILE, prov)
    return Path(out)
