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

from calibrate.experts import routing_report
from compress.recipe import Recipe

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (label, done, total)
RECIPE_ATTR = "compress_recipe"  # on a model: the steps (dicts) that made it, from its artifact and this run


def recipe_history(model: nn.Module) -> list[dict[str, Any]]:
    """The recipe steps applied to `model` so far: its artifact's recorded ones, then those `apply` ran."""
    return list(getattr(model, RECIPE_ATTR, None) or [])


@dataclass(frozen=True)
class PassReport:
    """What one pass did: which modules, how long, and its error metrics. `config` holds what the pass
    decided or measured beyond its settings; `apply` adds the step's settings (and calibration_tokens)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
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
        if step.spec.needs_calibration is True and calib is None:
            raise ValueError(f"pass {step.name!r} needs calibration data; pass `calib`")
    reports = []
    for i, step in enumerate(recipe.steps):
        calibrated = step.spec.calibrates(step.config, model)
        if calib is None and calibrated:  # one that needs it only sometimes
            raise ValueError(f"pass {step.name!r} needs calibration data here; pass `calib`")
        log.info("step %d/%d: %s", i + 1, len(recipe.steps), step.name)
        t0 = time.perf_counter()
        run = step.spec.run
        # `progress` is optional in the pass contract: plugins may take only (model, cfg, calib).
        extra = {"progress": progress} if "progress" in inspect.signature(run).parameters else {}
        report = run(model, step.config, calib, **extra)
        _check_produced(model, f"step {i + 1} ({step.name})")
        untie_quantized_head(model)
        recorded = step.to_dict()
        setattr(model, RECIPE_ATTR, [*recipe_history(model), recorded])
        settings = {k: v for k, v in recorded.items() if k != "pass"}
        if calibrated:
            settings["calibration_tokens"] = int(calib.numel())
            settings |= routing_report(model, getattr(step.config, "min_expert_tokens", 0))
        report = dataclasses.replace(report, config={**settings, **report.config},
                                     seconds=round(time.perf_counter() - t0, 3))
        reports.append(report)
    return reports


def _check_produced(model: nn.Module, step: str) -> None:
    """A pass must not leave NaN or inf in the model (weights, scales, norms); name the first tensor that has it.

    Tensors still on disk (meta here) are checked by the lazy store as they are written back.
    """
    from compress.checks import first_nonfinite

    found = first_nonfinite(model.state_dict(keep_vars=True))
    if found:
        raise ValueError(f"{step} produced non-finite values in {found[0]} ({found[1]}); nothing was written")


def untie_quantized_head(model: nn.Module) -> None:
    """A quantized output layer no longer shares the float embedding's weight: mark the model untied.

    Without this, a tied config would make transformers point the head back at
    the embedding on save and load, and the packed head would be lost. For a
    lazily loaded model the head's packed tensors are recorded in its store.
    """
    from compress.lazy import store_of
    from compress.quantize.packed import PackedLinear

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    cfg = getattr(model, "config", None)
    if not isinstance(head, PackedLinear) or not getattr(cfg, "tie_word_embeddings", False):
        return
    cfg.tie_word_embeddings = False
    head._parameters.pop("weight", None)  # a float alias tie_weights() may have hung on the module
    store = store_of(model)
    if store is not None:
        name = next(n for n, m in model.named_modules() if m is head)
        store.tied = {t for t in store.tied if not t.startswith(f"{name}.")}
        store.release(name, head)  # writes the packed tensors to a spill file the save streams from
