"""Low-memory models: weights stay on disk until a pass works on them.

`load_lazy` builds the model skeleton with no weights (parameters on the
`meta` device) and a `TensorStore` that knows, for every tensor name, which
safetensors file holds its current value. A block-wise pass materialises one
decoder block at a time (`loaded`), changes it, and on the way out the block's
tensors are written to a spill file, if anything changed, and freed. Saving
streams the tensors one at a time into `model.safetensors` (shards past 5 GB).
Peak memory is one block plus the calibration activations, not the model.

Every file is checked when the store opens (framing, and every tensor finite,
read one slice at a time), and what a pass produced is checked before it is
spilled. Spill files live in a `compress.spill.SpillDir`, swept after a kill -9.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from calibrate.streaming import STORE_ATTR, store_of, trim_memory  # noqa: F401  (re-exported)
from compress.archs import auto_model_class
from compress.checks import first_nonfinite
from compress.files import (
    check_safetensors,
    checkpoint_mismatch,
    load_model_config,
    safetensors_header,
)
from compress.spill import SpillDir
from compress.tensorfile import DTYPES, nbytes, scan_finite, write_streamed

log = logging.getLogger(__name__)



class TensorStore:
    """tensor name -> safetensors file with its current value; spill files live in a private temp dir."""

    def __init__(self, model: nn.Module, files: list[Path], *, tied: set[str] = frozenset(),
                 spill_root: str | Path | None = None, what: str = "") -> None:
        self.model = model
        self.tied = set(tied)  # names that alias another tensor (a tied lm_head): never loaded or written
        # model tensor name -> (file, name inside the file): they differ once blocks are renumbered
        self.where: dict[str, tuple[Path, str]] = {}
        for f in files:
            check_safetensors(f)
        for f in files:
            for k in scan_finite(Path(f), what=what or f"model {Path(f).parent}"):
                self.where[k] = (Path(f), k)
        self._tmp = SpillDir(spill_root)
        self._spills = 0
        self._loaded: dict[str, dict[str, tuple[int, int]]] = {}  # prefix -> {name: (id, version)}

    @property
    def spill_dir(self) -> Path:
        return self._tmp.path

    def close(self) -> None:
        self._tmp.cleanup()

    def _own(self, prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's persistent tensors by local name, without tied aliases."""
        return {n: t for n, t in module.state_dict(keep_vars=True).items()
                if (f"{prefix}.{n}" if prefix else n) not in self.tied}

    def load(self, prefix: str, module: nn.Module) -> None:
        """Give `module` (the submodule named `prefix`) its tensors from disk."""
        current = self._own(prefix, module)
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in current:
            key = f"{prefix}.{name}" if prefix else name
            if key not in self.where:
                raise ValueError(f"tensor {key} is not in the checkpoint")
            f, stored = self.where[key]
            by_file.setdefault(f, []).append((name, stored))
        state = {}
        for f, names in by_file.items():
            with safe_open(f, "pt") as h:
                for name, stored in names:
                    t = h.get_tensor(stored)
                    want = current[name]
                    if t.is_floating_point() and want.is_floating_point():
                        t = t.to(want.dtype)
                    state[name] = t
        module.load_state_dict(state, strict=False, assign=True)
        self._loaded[prefix] = {n: (id(t), t._version) for n, t in self._own(prefix, module).items()}

    def release(self, prefix: str, module: nn.Module, *, keep: bool = True) -> None:
        """Free `module`'s tensors, first writing them to a spill file if the pass changed them.

        A changed tensor holding NaN or inf is refused (nothing is spilled). With
        `keep=False` (the pass failed) the tensors are only freed.
        """
        state = self._own(prefix, module)
        before = self._loaded.pop(prefix, None)
        now = {n: (id(t), t._version) for n, t in state.items()}
        if now != before and keep:
            full = {(f"{prefix}.{n}" if prefix else n): t.detach().contiguous() for n, t in state.items()}
            # what changed (the rest was checked when the store opened)
            found = first_nonfinite((k, full[k]) for k, n in zip(full, state, strict=True)
                                    if before is None or before.get(n) != now[n])
            if found:
                _free(module)
                raise ValueError(f"a compression step produced non-finite values in tensor {found[0]} ({found[1]}); "
                                 "nothing was written (try another method or settings, or report it)")
            self._spills += 1
            f = self.spill_dir / f"{self._spills:06d}.safetensors"
            save_file(full, str(f))
            stale = [k for k in self.where if k.startswith(f"{prefix}.") and k not in full]
            for k in stale:  # e.g. a Linear's `weight` replaced by a QuantLinear's packed tensors
                del self.where[k]
            self.where.update({k: (f, k) for k in full})
        _free(module)
        trim_memory()

    @contextlib.contextmanager
    def loaded(self, prefix: str, module: nn.Module) -> Iterator[nn.Module]:
        self.load(prefix, module)
        try:
            yield module
        except BaseException:
            self.release(prefix, module, keep=False)  # the pass failed: its half-done tensors are not kept
            raise
        self.release(prefix, module)

    def renumber(self, path: str, kept: list[int]) -> None:
        """Blocks `path.{kept[i]}` become `path.{i}`; the others' tensors are forgotten (layer pruning).

        Only the names change: every tensor stays in the file it is in.
        """
        if self._loaded:
            raise RuntimeError(f"cannot renumber blocks while {sorted(self._loaded)} are loaded")
        new_index = {old: new for new, old in enumerate(kept)}
        head = f"{path}."
        where = {}
        for k, v in self.where.items():
            if not k.startswith(head):
                where[k] = v
                continue
            index, _, rest = k[len(head):].partition(".")
            if index.isdigit() and int(index) not in new_index:
                continue  # a removed block
            where[f"{head}{new_index[int(index)]}.{rest}" if index.isdigit() else k] = v
        self.where = where

    def save(self, out: Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write every tensor into `out` as `model.safetensors` (or shards plus an index, past
        `max_shard_bytes`, as Hugging Face does), streaming one tensor at a time.

        Floating tensors are cast to the model's dtype, as a full save would write them.
        """
        meta = self.model.state_dict(keep_vars=True)
        entries = []  # (key, torch dtype, shape) in model order: blocks stay contiguous
        for k in [k for k in meta if k in self.where] + sorted(k for k in self.where if k not in meta):
            f, stored = self.where[k]
            with safe_open(f, "pt") as h:
                sl = h.get_slice(stored)
                dtype, shape = DTYPES[sl.get_dtype()], list(sl.get_shape())
            if k in meta and dtype.is_floating_point and meta[k].dtype.is_floating_point:
                dtype = meta[k].dtype
            entries.append((k, dtype, shape))
        shards: list[list[tuple[str, torch.dtype, list[int]]]] = [[]]
        size = 0
        for e in entries:
            n = nbytes(e[1], e[2])
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += n
        if len(shards) == 1:
            write_streamed(out / "model.safetensors", shards[0], self.where)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_streamed(out / name, shard, self.where)
            weight_map.update(dict.fromkeys((k for k, _, _ in shard), name))
        total = sum(nbytes(d, sh) for _, d, sh in entries)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

    @contextlib.contextmanager
    def outside_blocks(self, model: nn.Module, blocks_path: str, *, on_demand: bool = False) -> Iterator[None]:
        """Materialise the tensors that live outside the decoder blocks (embeddings, final norm, head).

        With `on_demand` each part is read from disk only when it is first called
        (a forward up to the first block then loads the embeddings, not the head).
        """
        store = self
        parts = [(p, m) for p, m in _outside(model, blocks_path) if store._own(p, m)]
        loaded: list[str] = []

        def load(prefix: str, mod: nn.Module) -> None:
            store.load(prefix, mod)
            loaded.append(prefix)
            _tie(model)

        handles = []
        for prefix, mod in parts:
            if on_demand:
                handles.append(mod.register_forward_pre_hook(
                    lambda m, args, prefix=prefix: None if prefix in loaded else load(prefix, m)))
            else:
                load(prefix, mod)
        ok = False
        try:
            yield
            ok = True
        finally:
            for h in handles:
                h.remove()
            for prefix in loaded:  # a failed pass: free, keep nothing (and do not mask its error)
                store.release(prefix, model.get_submodule(prefix), keep=ok)  # a pass may have replaced the module
            _tie(model)  # a tied head pointed at the freed embedding: point it at the meta one


def _free(module: nn.Module) -> None:
    """Replace every parameter and persistent buffer by a meta tensor (computed buffers stay)."""
    for mod in module.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for n, b in list(mod._buffers.items()):
            if b is not None and n not in mod._non_persistent_buffers_set:
                mod._buffers[n] = torch.empty_like(b, device="meta")


def _outside(model: nn.Module, blocks_path: str) -> list[tuple[str, nn.Module]]:
    """Smallest set of submodules covering every tensor not under `blocks_path` (with their names)."""
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if full == blocks_path:
                continue
            if blocks_path.startswith(full + "."):
                walk(full, child)
            elif list(child.state_dict(keep_vars=True)):
                found.append((full, child))
        if list(mod._parameters) or any(n not in mod._non_persistent_buffers_set for n in mod._buffers):
            raise ValueError(f"{prefix or 'the model'} holds tensors directly; lazy loading cannot split it")

    walk("", model)
    return found


def _tie(model: nn.Module) -> None:
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def load_lazy(path: Path, files: list[Path], dtype: torch.dtype) -> nn.Module | None:
    """The model at `path` with every weight left on disk (see `store_of(model)`); None for a model whose
    checkpoint transformers converts as it loads (renamed keys, per-expert tensors fused: GPT-NeoX, MoE),
    which the caller loads whole."""
    from accelerate import init_empty_weights
    from transformers.conversion_mapping import get_model_conversion_mapping

    config = load_model_config(path)
    with init_empty_weights(include_buffers=False):  # buffers such as rotary inv_freq are computed, keep them
        model = auto_model_class(config).from_config(config, dtype=dtype)
    if get_model_conversion_mapping(model, add_legacy=False):
        log.warning("%s: %s checkpoints are converted as they load; loading it whole instead of streaming it",
                    path, config.model_type)
        return None
    tied = set(model.all_tied_weights_keys)  # target -> source of the weights the config ties
    store = TensorStore(model, files, tied=tied, spill_root=os.environ.get("COMPRESS_SPILL_DIR"),
                        what=f"model {path}")
    shapes = {k: v["shape"] for f in files for k, v in safetensors_header(f).items()}
    wrong = sorted(k for k, t in model.state_dict().items()
                   if k not in tied and (k not in store.where or list(t.shape) != shapes.get(store.where[k][1])))
    if wrong:  # found now, not by the block that would load them
        store.close()
        raise checkpoint_mismatch(path, wrong)
    setattr(model, STORE_ATTR, store)
    model.eval()
    return model
