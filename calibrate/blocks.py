"""Block-input capture and sequential block-by-block replay.

The calibration tokens run through the model once, up to the first decoder
block, whose inputs (hidden states plus keyword arguments such as the
attention mask and rotary embeddings) are captured. From then on each block is
processed in turn: a pass observes the block on its current inputs, changes
it, and the changed block's outputs become the next block's inputs, so every
block is calibrated on what the already-compressed blocks before it produce.

Where the blocks live is the only per-architecture fact, one row per family
in `BLOCK_PATHS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# attribute path of the decoder-block ModuleList, one row per architecture family
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the model's decoder blocks."""
    for path in BLOCK_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod):
            return path, mod
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}; known paths: {', '.join(BLOCK_PATHS)}")


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first block."""


@dataclass
class BlockInputs:
    """One entry per calibration batch: the block's hidden-state input and its other kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


def capture_first_block_inputs(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 8) -> BlockInputs:
    """Run `ids` (samples, seq_len) through the model up to block 0 and keep its inputs."""
    _, blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    got = BlockInputs([], [])

    def hook(module, args, kwargs):
        kw = dict(kwargs)
        hidden = kw.pop("hidden_states", None)
        if hidden is None:
            hidden, args = args[0], args[1:]
        if args:
            raise ValueError("decoder blocks called with extra positional arguments are not supported")
        for k in ("past_key_value", "past_key_values"):
            kw.pop(k, None)  # no KV cache while calibrating
        got.hidden.append(hidden.detach())
        got.kwargs.append(kw)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch_size):
                try:
                    model(input_ids=ids[i : i + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return got


def _first(out):
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every captured batch."""
    return [_first(block(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True)]


@torch.no_grad()
def observe_block(block: nn.Module, inputs: BlockInputs, modules: dict[str, nn.Module],
                  on_input: Callable[[str, torch.Tensor], None], *, stop_early: bool = False) -> None:
    """Run the block over all batches, calling on_input(name, x) with each watched module's input.

    With `stop_early`, each batch's forward ends as soon as every watched module
    has seen its input: observing the first modules of a block then costs
    almost nothing, instead of a full block forward.
    """
    seen: set[str] = set()

    def hook(mod, args, n):
        on_input(n, args[0])
        seen.add(n)
        if stop_early and len(seen) == len(modules):
            raise _Stop

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in modules.items()]
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True):
            seen.clear()
            try:
                block(h, **kw)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()


@torch.no_grad()
def input_stages(block: nn.Module, inputs: BlockInputs, modules: dict[str, nn.Module]) -> list[list[str]]:
    """Group `modules` of a block into stages in execution order; modules fed the same tensor share a stage.

    For a Llama block: [q, k, v], [o], [gate, up], [down]. Quantizing stage by
    stage ("true sequential") lets each stage see the error of the ones before.
    """
    order: list[tuple[str, torch.Tensor]] = []
    one = BlockInputs(inputs.hidden[:1], inputs.kwargs[:1])
    # keep the tensors alive so that `id` cannot be reused by a later, different input
    observe_block(block, one, modules, lambda n, x: order.append((n, x)))
    stages: list[list[str]] = []
    stage_of_input: dict[int, int] = {}  # id(input tensor) -> stage index
    seen: set[str] = set()
    for name, x in order:
        if name in seen:
            continue
        seen.add(name)
        if id(x) in stage_of_input:
            stages[stage_of_input[id(x)]].append(name)
        else:
            stage_of_input[id(x)] = len(stages)
            stages.append([name])
    missing = [n for n in modules if n not in seen]
    if missing:
        stages.append(missing)  # never called on calibration data: handled (dead) by the pass
    return stages
