"""Safetensors files read and written slice by slice, so that no whole tensor (an embedding) is in memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from compress.checks import check_finite, nonfinite_summary

CHUNK_BYTES = 64 * 2**20  # streamed save and the finite scan: at most this much of one tensor in memory

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}

def scan_finite(path: Path, *, what: str = "") -> list[str]:
    """The tensor names of safetensors file `path`, after checking every floating tensor is finite.

    Tensors are read in slices (`_row_slices`), so memory stays at one slice.
    """
    with safe_open(path, "pt") as h:
        names = list(h.keys())
        shapes = {k: (h.get_slice(k).get_dtype(), list(h.get_slice(k).get_shape())) for k in names}
    for k in names:
        dname, shape = shapes[k]
        dtype = DTYPES.get(dname)
        if dtype is None or not dtype.is_floating_point:
            continue  # only floats can hold NaN or inf (and 8-bit float formats are not scanned)
        for t in row_slices(path, k, dtype, shape):
            if nonfinite_summary(t):
                with safe_open(path, "pt") as h:  # the whole tensor, for the count in the message
                    check_finite(k, h.get_tensor(k), what=what)
            del t
    return names


def row_slices(path: Path, stored: str, dtype: torch.dtype, shape: list[int]) -> Iterator[torch.Tensor]:
    """Tensor `stored` of file `path` in slices of rows of at most CHUNK_BYTES (sized as `dtype`), so a large
    embedding never sits in memory whole; the file is reopened for each slice (the mapped pages go with it)."""
    rows = shape[0] if shape else 1
    step = max(1, rows * CHUNK_BYTES // max(nbytes(dtype, shape), 1))
    for a in range(0, rows, step):
        yield _read_rows(path, stored, a, step if shape else None)  # no reference kept here while it is used


def _read_rows(path: Path, stored: str, start: int, count: int | None) -> torch.Tensor:
    """Rows start..start+count of tensor `stored` (count None: the whole tensor, a scalar)."""
    with safe_open(path, "pt") as h:
        return h.get_tensor(stored) if count is None else h.get_slice(stored)[start : start + count]


def nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def write_streamed(path: Path, entries: list[tuple[str, torch.dtype, list[int]]],
                   where: dict[str, tuple[Path, str]]) -> None:
    """A safetensors file of `entries` (name, dtype, shape), each read slice by slice from `where[name]`
    (file, stored name): 8-byte header length, JSON header, raw data; never a whole tensor in memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k, dtype, shape in entries:
        n = nbytes(dtype, shape)
        header[k] = {"dtype": _NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k, dtype, shape in entries:
            for t in row_slices(*where[k], dtype, shape):
                t = t.to(dtype).contiguous()
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t
