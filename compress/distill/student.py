"""Students initialised from their teacher, and which student layer learns from which teacher layer.

A student of the teacher's family is the teacher with fewer decoder blocks
(kept evenly spaced, first and last included: the start of "every other
layer" students such as DistilBERT's) and a narrower MLP (channels kept by
weight magnitude, data-free, as in Minitron's width pruning without its
activation statistics). Structurally pruned models (`prune_layers`,
`prune_channels`, `prune_heads`) are students as they are. Every removal of
blocks records the survivors' original indices in the config
(`compress_layer_origin`), so hidden-state losses pair each student block
with the teacher block it came from; other students are paired by relative
depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calibrate.blocks import decoder_blocks
from compress.checks import check_fields
from compress.pipeline import PassReport
from compress.prune.layers import ORIGIN_KEY, remove_blocks
from compress.prune.structured import StructuredConfig, run_channels
from compress.registry import register_pass


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    layers: int | None = None  # decoder blocks to keep, evenly spaced (first and last kept); None: all
    mlp_ratio: float | None = None  # fraction of every block's MLP channels to remove (by weight magnitude)

    def __post_init__(self) -> None:
        check_fields(self, positive=("layers",), share=("mlp_ratio",))
        if self.layers is None and self.mlp_ratio is None:
            raise ValueError("a student needs layers or mlp_ratio (or both): it would be the teacher itself")


def evenly_spaced(n: int, k: int) -> list[int]:
    """k of range(n), evenly spaced, the first and the last included (k = 1: the last)."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} blocks")
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


@register_pass("student", StudentConfig, needs_calibration=True)
@torch.no_grad()
def run(model: nn.Module, cfg: StudentConfig, calib: torch.Tensor) -> PassReport:
    """Shrink the model into a student of its own family: fewer blocks and/or a narrower MLP."""
    before = sum(p.numel() for p in model.parameters())
    changes: dict[str, list[int]] = {}
    n = len(decoder_blocks(model)[1])
    if cfg.layers is not None:
        if cfg.layers >= n:
            raise ValueError(f"layers must be fewer than the model's {n} blocks, got {cfg.layers}")
        keep = evenly_spaced(n, cfg.layers)
        remove_blocks(model, [i for i in range(n) if i not in keep])
        changes["num_hidden_layers"] = [n, cfg.layers]
    if cfg.mlp_ratio is not None:
        # magnitude importance needs no statistics; one window is enough to find the MLP's Linears
        rep = run_channels(model, StructuredConfig(ratio=cfg.mlp_ratio, importance="magnitude", reconstruct=False),
                           calib[:1])
        changes.update(rep.config["config_changes"])
    return PassReport(name="student", config={"config_changes": changes,
                                              "layer_origin": getattr(model.config, ORIGIN_KEY, None)},
                      modules=0, metrics={"parameters_removed": float(before - sum(p.numel() for p in model.parameters()))})


def layer_pairs(student: nn.Module, teacher_layers: int, spec: str | None = None) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs for hidden-state losses.

    `spec` "S:T,S:T,..." overrides; else the student's recorded origin of its
    blocks; else relative depth, student block i -> teacher block
    round((i + 1) * T / S) - 1 (the last maps to the last).
    """
    n = len(decoder_blocks(student)[1])
    if spec:
        pairs = []
        for part in spec.split(","):
            s, sep, t = part.strip().partition(":")
            if not sep or not s.isdigit() or not t.isdigit():
                raise ValueError(f"layer map entries are STUDENT:TEACHER block indices, got {part.strip()!r}")
            if int(s) >= n or int(t) >= teacher_layers:
                raise ValueError(f"layer map {part.strip()!r}: the student has {n} blocks, the teacher "
                                 f"{teacher_layers}")
            pairs.append((int(s), int(t)))
        return pairs
    origin = getattr(getattr(student, "config", None), ORIGIN_KEY, None)
    if isinstance(origin, list) and len(origin) == n and all(0 <= o < teacher_layers for o in origin):
        return list(enumerate(origin))
    return [(i, round((i + 1) * teacher_layers / n) - 1) for i in range(n)]
