"""Run a recipe's passes, in order, over a model."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compress.recipe import Recipe

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (label, done, total)


@dataclass(frozen=True)
class PassReport:
    """What one pass did: which modules, how long, and its error metrics."""

    name: str
    config: dict[str, Any]
    seconds: float = 0.0
    modules: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply(model: nn.Module, recipe: Recipe, calib: Any = None, *,
          progress: Progress | None = None) -> list[PassReport]:
    """Apply every step of `recipe` to `model` in place; return one report per step.

    `calib` is the calibration data for passes that need it (see `calibrate`);
    a calibrated pass without it raises ValueError before anything changes.
    """
    for step in recipe.steps:
        if step.spec.needs_calibration and calib is None:
            raise ValueError(f"pass {step.name!r} needs calibration data; pass `calib`")
    reports = []
    for i, step in enumerate(recipe.steps):
        log.info("step %d/%d: %s", i + 1, len(recipe.steps), step.name)
        t0 = time.perf_counter()
        run = step.spec.run
        # `progress` is optional in the pass contract: plugins may take only (model, cfg, calib).
        extra = {"progress": progress} if "progress" in inspect.signature(run).parameters else {}
        report = run(model, step.config, calib, **extra)
        report = dataclasses.replace(report, seconds=round(time.perf_counter() - t0, 3))
        reports.append(report)
    return reports
