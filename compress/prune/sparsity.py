"""What the unstructured and N:M pruning passes share: the sparsity target, exact masks, the record.

A pass scores every weight (magnitude, Wanda's |W| x ||X||, SparseGPT's OBS
saliency) and `prune_mask` turns scores into a mask with an exact count: the
requested fraction of each row or layer (rounded to whole weights), or N
non-zeros in every M consecutive weights along the input dimension (2:4 is
what sparse tensor cores run). Pruned modules are recorded in the model's
config (`compress_sparsity`, saved in config.json), so a later quantization
pass keeps their zeros.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.forward import ForwardOptions
from compress.pipeline import PassReport
from compress.targets import Selection

CONFIG_KEY = "compress_sparsity"  # config.json: {"modules": {name: "N:M" or fraction}}
SCOPES = ("row", "layer")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"N:M" -> (N, M): at most N non-zeros in every M consecutive input weights, 0 < N < M."""
    m = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise ValueError(f"pattern must be 'N:M' with 0 < N < M (N non-zeros kept in every M), e.g. '2:4'; "
                         f"got {pattern!r}")
    return int(m[1]), int(m[2])


@dataclass(frozen=True, kw_only=True)
class SparsityConfig(Selection):
    """Fields every unstructured / N:M pruning pass shares."""

    sparsity: float | None = None  # fraction of each layer's weights set to zero; default 0.5 without `pattern`
    pattern: str | None = None  # "N:M", e.g. "2:4": N non-zeros in every M consecutive input weights

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                                 f"({1 - n / m:g} of the weights); give one of them")

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern is not None else None

    @property
    def fraction(self) -> float:
        """The fraction of weights each targeted layer loses."""
        if self.pattern is not None:
            n, m = self.n_m
            return 1 - n / m
        return 0.5 if self.sparsity is None else self.sparsity

    @property
    def label(self) -> str | float:
        """What the record says of a module: the pattern, or the fraction."""
        return self.pattern if self.pattern is not None else self.fraction


def prune_mask(scores: torch.Tensor, fraction: float, n_m: tuple[int, int] | None = None, *,
               scope: str = "row") -> torch.Tensor:
    """Bool mask (True = prune) of the lowest `scores` (out, in), with an exact count.

    N:M: in every M consecutive inputs of a row, the M - N lowest. Otherwise
    round(fraction * in) per row (`scope="row"`), or round(fraction * out * in)
    over the whole matrix (`scope="layer"`). Ties are broken by position, so
    the count never depends on the values.
    """
    out, n = scores.shape
    mask = torch.zeros(out, n, dtype=torch.bool, device=scores.device)
    if n_m is not None:
        keep, m = n_m
        if n % m:
            raise ValueError(f"an N:M pattern needs the input size to be a multiple of M; {n} is not one of {m}")
        groups = scores.reshape(out, n // m, m)  # (out, in // M, M)
        low = torch.topk(groups, m - keep, dim=-1, largest=False).indices
        return mask.reshape(out, n // m, m).scatter_(-1, low, True).reshape(out, n)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope == "row":
        k = round(fraction * n)
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
        return mask
    k = round(fraction * out * n)
    if k:
        mask.view(-1)[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
    return mask


def pruned_modules(model: nn.Module) -> dict[str, str | float]:
    """name -> pattern or fraction of every module a pruning pass left sparse (from the model's config)."""
    rec = getattr(getattr(model, "config", None), CONFIG_KEY, None) or {}
    return dict(rec.get("modules", {}))


def record_pruned(model: nn.Module, names: list[str], label: str | float) -> None:
    """Add `names` to the model's sparsity record (kept in config.json when the model is saved)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    mods = pruned_modules(model)
    mods.update(dict.fromkeys(names, label))
    setattr(config, CONFIG_KEY, {"modules": mods})


def check_n_m(weight: torch.Tensor, n_m: tuple[int, int]) -> bool:
    """True when every M consecutive input weights of every row hold at most N non-zeros."""
    keep, m = n_m
    out, n = weight.shape
    return bool(((weight != 0).reshape(out, n // m, m).sum(-1) <= keep).all())


@dataclass(frozen=True, kw_only=True)
class CalibratedSparsityConfig(ForwardOptions, SparsityConfig):
    """Fields of the pruning passes that run calibration data through the blocks (Wanda, SparseGPT)."""


def sparsity_report(name: str, cfg: SparsityConfig, zeros: dict[str, tuple[int, int]], *,
                    metrics: dict[str, float] | None = None) -> PassReport:
    """The PassReport of a pruning pass from name -> (zero weights, weights) of every pruned module."""
    total = sum(n for _, n in zeros.values())
    per_module = {k: round(z / n, 6) for k, (z, n) in zeros.items()}
    return PassReport(name=name, modules=len(zeros), config={"sparsity": cfg.fraction, "zeros_per_module": per_module},
                      metrics={"sparsity": sum(z for z, _ in zeros.values()) / max(total, 1), "weights": float(total),
                               **(metrics or {})})


def count_zeros(weight: torch.Tensor) -> tuple[int, int]:
    return int((weight == 0).sum()), weight.numel()
