"""Checks at the boundary: numbers that must be finite, devices that must exist.

Every function raises `ValueError` with one line that names the offending
tensor, value or option, so the CLI prints it as-is and exits 1. They are
cheap (one pass over a tensor) and are called where data enters: while a
model, adapter or artifact loads, on calibration activations, on what a pass
produced, and on eval numbers before they are written.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

_RANGES = {"positive": (lambda v: v > 0, "positive"), "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "share": (lambda v: 0 < v < 1, "in (0, 1)")}


def check_fields(cfg: Any, *, choices: Mapping[str, Iterable] | None = None, **ranges: Iterable[str]) -> None:
    """Refuse the first field of config `cfg` outside its range, in one line naming it: `choices` maps fields to
    their valid values; fields named in `positive=` must be > 0, `fraction=` in [0, 1), `share=` in (0, 1)
    (NaN fails every range). A None value is not checked (an optional field left unset)."""
    for name, valid in (choices or {}).items():
        v = getattr(cfg, name)
        if v is not None and v not in valid:
            raise ValueError(f"{name} must be one of {', '.join(map(str, valid))}, got {v!r}")
    for kind, names in ranges.items():
        ok, says = _RANGES[kind]
        for name in names:
            v = getattr(cfg, name)
            if v is not None and not ok(v):
                raise ValueError(f"{name} must be {says}, got {v}")


def nonfinite_summary(t: torch.Tensor) -> str | None:
    """'3 NaN, 1 inf of 4096' when floating tensor `t` holds non-finite values, else None."""
    if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
        return None
    # fast path: NaN propagates through min/max and an inf is one of them; no boolean copy of a large tensor
    if bool(torch.isfinite(torch.stack(t.detach().aminmax())).all()):
        return None
    ok = torch.isfinite(t)
    nan = int(torch.isnan(t).sum())
    return f"{nan} NaN, {int((~ok).sum()) - nan} inf of {t.numel()} values"


def check_finite(name: str, t: torch.Tensor, *, what: str = "") -> None:
    """Refuse a floating tensor holding NaN or inf, naming it (`what` says whose it is: 'model X')."""
    bad = nonfinite_summary(t)
    if bad:
        _refuse(name, bad, what)


def _refuse(name: str, bad: str, what: str) -> None:
    owner = f"{what}: " if what else ""
    raise ValueError(f"{owner}tensor {name} has non-finite values ({bad}); NaN and inf cannot be compressed "
                     "or scored (a damaged checkpoint, or a diverged run)")


Named = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def first_nonfinite(tensors: Named) -> tuple[str, str] | None:
    """(name, `nonfinite_summary`) of the first named tensor holding NaN or inf (a state dict, or
    `named_parameters()`-style pairs); None when all are finite."""
    for name, t in tensors.items() if isinstance(tensors, Mapping) else tensors:
        bad = nonfinite_summary(t)
        if bad:
            return name, bad
    return None


def check_tensors(tensors: Named, *, what: str = "") -> None:
    """`check_finite` over named tensors: the first one holding NaN or inf is refused, naming it."""
    found = first_nonfinite(tensors)
    if found:
        _refuse(*found, what)


def check_module(module: torch.nn.Module, *, what: str = "") -> None:
    """Every materialised parameter and buffer of `module` is finite (meta tensors are skipped)."""
    check_tensors(module.state_dict(keep_vars=True), what=what)


def finite_number(value: Any, where: str) -> float:
    """A real, finite number; `where` names the option or field in the error."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def nonfinite_in(obj: Any, path: str = "") -> str | None:
    """The JSON-style path of the first non-finite float inside nested dicts/lists (None when all are finite)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "value")
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = nonfinite_in(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            found = nonfinite_in(v, f"{path}[{i}]")
            if found:
                return found
    return None


def check_device(device: str) -> torch.device:
    """A device string this torch build can run on; one clear line otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device name (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA GPU"
            raise ValueError(f"--device {device}: CUDA is not available here ({build}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: unsupported device type {dev.type!r} (use cpu, cuda or mps)")
    return dev


@contextlib.contextmanager
def about(name: str) -> Iterator[None]:
    """Prefix a ValueError raised inside with `name` (the module a pure tensor function was working on)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
