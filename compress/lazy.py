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
spilled. Spill files live in a `compress-spill-*` directory that its store
holds an exclusive lock on for its lifetime; a store that opens sweeps the
directories of stores whose process died (kill -9 leaves no `finally`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from calibrate.streaming import STORE_ATTR, store_of, trim_memory  # noqa: F401  (re-exported)
from compress.checks import check_finite, first_nonfinite, nonfinite_summary
from compress.files import check_safetensors, load_model_config

try:
    import fcntl
except ImportError:  # not POSIX: spill directories are not locked, nor swept
    fcntl = None

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20  # streamed save and the finite scan: at most this much of one tensor in memory
SPILL_PREFIX = "compress-spill-"
LOCK_FILE = "owner.lock"


class SpillDir:
    """A private temp directory, locked (flock) by its owner for its lifetime, removed on close or exit.

    It is made under a hidden name, locked, then renamed to `compress-spill-*`, so
    every directory with that name has a lock file: one whose lock can be taken
    belongs to a dead process (the kernel drops flocks with their process) and
    `sweep` removes it.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        root = Path(root if root is not None else tempfile.gettempdir())
        sweep(root)
        staging = Path(tempfile.mkdtemp(prefix=f".{SPILL_PREFIX}new-", dir=root))
        self._fd: int | None = None
        if fcntl is not None:
            self._fd = os.open(staging / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.path = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=root))
        os.replace(staging, self.path)  # onto the empty directory just made: the name is ours, atomically
        self._finalizer = weakref.finalize(self, _remove_spill, self.path, self._fd)

    def cleanup(self) -> None:
        self._finalizer()


def _remove_spill(path: Path, fd: int | None) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None:
        os.close(fd)  # releases the lock, after the files are gone


def sweep(root: str | Path) -> list[Path]:
    """Remove the `compress-spill-*` directories under `root` whose owner died; return them."""
    if fcntl is None:
        return []
    removed = []
    for d in Path(root).glob(f"{SPILL_PREFIX}*"):
        try:
            fd = os.open(d / LOCK_FILE, os.O_RDWR)
        except OSError:  # no lock file (not ours, or already being removed): leave it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its store is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            log.info("removed %s, left behind by a process that died", d)
        finally:
            os.close(fd)
    return removed


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
                dtype, shape = _DTYPES[sl.get_dtype()], list(sl.get_shape())
            if k in meta and dtype.is_floating_point and meta[k].dtype.is_floating_point:
                dtype = meta[k].dtype
            entries.append((k, dtype, shape))
        shards: list[list[tuple[str, torch.dtype, list[int]]]] = [[]]
        size = 0
        for e in entries:
            nbytes = _nbytes(e[1], e[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += nbytes
        if len(shards) == 1:
            self._write(out / "model.safetensors", shards[0])
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            self._write(out / name, shard)
            weight_map.update(dict.fromkeys((k for k, _, _ in shard), name))
        total = sum(_nbytes(d, sh) for _, d, sh in entries)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

    def _write(self, path: Path, entries: list[tuple[str, torch.dtype, list[int]]]) -> None:
        """A safetensors file written tensor by tensor: 8-byte header length, JSON header, raw data."""
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for k, dtype, shape in entries:
            n = _nbytes(dtype, shape)
            header[k] = {"dtype": _NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for k, dtype, shape in entries:
                for t in _row_slices(*self.where[k], dtype, shape):
                    t = t.to(dtype).contiguous()
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    del t

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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}

def scan_finite(path: Path, *, what: str = "") -> list[str]:
    """The tensor names of safetensors file `path`, after checking every floating tensor is finite.

    Tensors are read in slices (`_row_slices`), so memory stays at one slice.
    """
    with safe_open(path, "pt") as h:
        names = list(h.keys())
        shapes = {k: (h.get_slice(k).get_dtype(), list(h.get_slice(k).get_shape())) for k in names}
    for k in names:
        dname, shape = shapes[k]
        dtype = _DTYPES.get(dname)
        if dtype is None or not dtype.is_floating_point:
            continue  # only floats can hold NaN or inf (and 8-bit float formats are not scanned)
        for t in _row_slices(path, k, dtype, shape):
            if nonfinite_summary(t):
                with safe_open(path, "pt") as h:  # the whole tensor, for the count in the message
                    check_finite(k, h.get_tensor(k), what=what)
            del t
    return names


def _row_slices(path: Path, stored: str, dtype: torch.dtype, shape: list[int]) -> Iterator[torch.Tensor]:
    """Tensor `stored` of file `path` in slices of rows of at most CHUNK_BYTES (sized as `dtype`), so a large
    embedding never sits in memory whole; the file is reopened for each slice (the mapped pages go with it)."""
    rows = shape[0] if shape else 1
    step = max(1, rows * CHUNK_BYTES // max(_nbytes(dtype, shape), 1))
    for a in range(0, rows, step):
        yield _read_rows(path, stored, a, step if shape else None)  # no reference kept here while it is used


def _read_rows(path: Path, stored: str, start: int, count: int | None) -> torch.Tensor:
    """Rows start..start+count of tensor `stored` (count None: the whole tensor, a scalar)."""
    with safe_open(path, "pt") as h:
        return h.get_tensor(stored) if count is None else h.get_slice(stored)[start : start + count]


def _nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


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


def load_lazy(path: Path, files: list[Path], dtype: torch.dtype) -> nn.Module:
    """The model at `path` with every weight left on disk; see `store_of(model)`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_model_config(path)
    with init_empty_weights(include_buffers=False):  # buffers such as rotary inv_freq are computed, keep them
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if getattr(config, "tie_word_embeddings", False) else set()
    store = TensorStore(model, files, tied=tied, spill_root=os.environ.get("COMPRESS_SPILL_DIR"),
                        what=f"model {path}")
    expected = set(model.state_dict())
    missing = sorted(expected - set(store.where) - tied)
    if missing:
        store.close()
        raise ValueError(f"{path}: checkpoint names do not match the model (missing {missing[:3]})")
    setattr(model, STORE_ATTR, store)
    model.eval()
    return model
