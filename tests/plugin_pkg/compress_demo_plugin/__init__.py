"""Scale weights: multiply every selected Linear's weight by a constant (a test plugin)."""

from dataclasses import dataclass

import torch
from torch import nn

from compress import targets as tg
from compress.hookspecs import hookimpl
from compress.pipeline import PassReport


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    factor: float = 2.0  # multiplier applied to each weight
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)


def run(model, cfg: ScaleConfig, calib=None) -> PassReport:
    mods = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    with torch.no_grad():
        for m in mods.values():
            m.weight.mul_(cfg.factor)
    return PassReport(name="scale_weights", config={"factor": cfg.factor}, modules=len(mods))


@hookimpl
def register_passes(register):
    from compress.registry import PassSpec

    register(PassSpec("scale_weights", ScaleConfig, run))
