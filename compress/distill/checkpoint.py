"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint directory `step-NNNNNNNN` holds the trained module's state
(`model.safetensors`), the optimizer's per-parameter state
(`optimizer.safetensors`) with its hyper-parameters, the scheduler state, the
step (which fixes the data position, see `distill.data`), the RNG state and
the curve so far (`state.json`, `rng.safetensors`). Nothing is unpickled on
resume. The newest complete directory wins; older ones beyond `keep` are
removed once a newer one is in place. A damaged checkpoint (a state.json
that is not the JSON written here, a truncated tensor file) is refused naming
the file, before anything is restored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import nn

from compress.artifact import atomic_dir
from compress.checks import check_tensors
from compress.files import load_safetensors, load_safetensors_into, read_json_object

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


STATE_KEYS = {"step": int, "optimizer": dict, "scheduler": dict, "fingerprint": dict, "curve": list, "evals": list}


def read_state(path: Path) -> dict[str, Any]:
    """state.json of checkpoint `path`, checked to be what `save_checkpoint` writes."""
    f = path / "state.json"
    state = read_json_object(f, what="checkpoint state")
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"{f}: damaged checkpoint state ({key!r} is missing or not a {kind.__name__})")
    opt = state["optimizer"]
    if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("scalars"), dict):
        raise ValueError(f"{f}: damaged checkpoint state (optimizer needs param_groups and scalars)")
    if not all(k.partition(".")[0].isdigit() for k in opt["scalars"]):
        raise ValueError(f"{f}: damaged checkpoint state (optimizer scalars are not keyed PARAM.NAME)")
    return state


def load_checkpoint(path: Path, module: nn.Module, opt: torch.optim.Optimizer, scheduler) -> dict[str, Any]:
    """Restore module, optimizer, scheduler and RNG from `path`; return state.json's contents.

    Every file is checked (JSON, safetensors framing, finite tensors) before the first thing is restored.
    """
    f = path / "state.json"
    state = read_state(path)
    files = {name: path / f"{name}.safetensors" for name in ("model", "optimizer", "rng")}
    for file in files.values():
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is incomplete: no {file.name}")
    # each file's framing is checked as it loads (load_safetensors*), the model's before the module is touched
    tensors = load_safetensors(files["optimizer"])
    rng = load_safetensors(files["rng"])
    check_tensors(tensors, what=f"checkpoint {files['optimizer']}")
    if not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise ValueError(f"{files['rng']}: damaged checkpoint state (no uint8 'torch' generator state)")
    if not all(k.partition(".")[0].isdigit() for k in tensors):
        raise ValueError(f"{files['optimizer']}: damaged checkpoint state (tensors are not keyed PARAM.NAME)")
    missing, unexpected = load_safetensors_into(module, files["model"])
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model being trained "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    check_tensors(module.state_dict(), what=f"checkpoint {files['model']}")
    per: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        per.setdefault(int(idx), {})[name] = v
    for key, v in state["optimizer"]["scalars"].items():
        idx, _, name = key.partition(".")
        per.setdefault(int(idx), {})[name] = v
    try:
        opt.load_state_dict({"state": per, "param_groups": state["optimizer"]["param_groups"]})
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(rng["torch"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{f}: damaged checkpoint state (it does not restore: {type(e).__name__}: {e})") from None
    return state
