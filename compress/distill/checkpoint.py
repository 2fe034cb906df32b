"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint directory `step-NNNNNNNN` holds the trained module's state
(`model.safetensors`), the optimizer's per-parameter state
(`optimizer.safetensors`) with its hyper-parameters, the scheduler state, the
step (which fixes the data position, see `distill.data`), the RNG state and
the curve so far (`state.json`, `rng.safetensors`). Nothing is unpickled on
resume. The newest complete directory wins; older ones beyond `keep` are
removed once a newer one is in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from compress.artifact import atomic_dir

PREFIX = "step-"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(root: Path, step: int, module: nn.Module, opt: torch.optim.Optimizer, scheduler,
                    state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; return its directory."""
    dest = root / f"{PREFIX}{step:08d}"
    tensors, opt_meta = _optimizer_tensors(opt)
    with atomic_dir(dest, force=True) as tmp:
        save_model(module, str(tmp / "model.safetensors"))  # handles tied (shared) tensors
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        payload = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), **state}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1) + "\n")
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (complete: atomic_dir renamed it into place), or None."""
    done = [p for p in sorted(root.glob(f"{PREFIX}*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, module: nn.Module, opt: torch.optim.Optimizer, scheduler) -> dict[str, Any]:
    """Restore module, optimizer, scheduler and RNG from `path`; return state.json's contents."""
    state = json.loads((path / "state.json").read_text())
    missing, unexpected = load_model(module, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model being trained "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    tensors = load_file(str(path / "optimizer.safetensors"))
    per: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        per.setdefault(int(idx), {})[name] = v
    for key, v in state["optimizer"]["scalars"].items():
        idx, _, name = key.partition(".")
        per.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": per, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    return state
