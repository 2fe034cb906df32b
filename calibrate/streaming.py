"""What the block walk needs of a lazily loaded model: its tensor store, found on the model, and heap trimming.

A model loaded with its weights left on disk (`compress.lazy`) carries its
store in the attribute `STORE_ATTR`. The walk only uses the store's two context
managers, `loaded(prefix, module)` (one decoder block in memory) and
`outside_blocks(model, path, on_demand=)` (embeddings, final norm, head), so
this package never imports the loader itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from typing import Any

from torch import nn

STORE_ATTR = "compress_tensor_store"  # where a lazily loaded model keeps its tensor store


def store_of(model: nn.Module) -> Any | None:
    """The model's tensor store when it was loaded lazily (a `compress.lazy.TensorStore`), else None."""
    return getattr(model, STORE_ATTR, None)


@contextlib.contextmanager
def outside_blocks(model: nn.Module, blocks_path: str, *, on_demand: bool = False) -> Iterator[None]:
    """The tensors outside the decoder blocks in memory while inside (a no-op for a model in memory); with
    `on_demand` each part is read only when first called."""
    store = store_of(model)
    if store is None:
        yield
        return
    with store.outside_blocks(model, blocks_path, on_demand=on_demand):
        yield


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


def trim_memory() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Freed tensors below glibc's (adaptive, up to 32 MiB) mmap threshold stay in
    the heap, and with a block's worth of them freed per block the process
    RSS would creep up over a long model; trimming after each block keeps the
    peak at one block.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
GLIBC_MAX_MMAP_THRESHOLD = 32 * 2**20  # where glibc's adaptive threshold stops growing (64-bit)


@contextlib.contextmanager
def large_allocations_mapped(threshold: int = 2**20) -> Iterator[None]:
    """Within the block, every allocation of `threshold` bytes or more gets its own memory mapping, returned to
    the OS when freed (glibc's M_MMAP_THRESHOLD; a no-op elsewhere).

    Training recomputes and frees tensors of a few MiB to a few tens of MiB all the time (activation
    checkpointing); below glibc's adaptive threshold they land in the heap, whose holes then hold about as
    much again as the live tensors (scale tuning on the reference model: peak RSS 3.67 -> 2.73 GB with this, for 30 % more time).
    Afterwards the threshold is left at glibc's adaptive maximum (setting it ends the adaptation for good).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        mallopt = None
    if mallopt is None or not mallopt(M_MMAP_THRESHOLD, threshold):
        yield
        return
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, GLIBC_MAX_MMAP_THRESHOLD)
        trim_memory()
