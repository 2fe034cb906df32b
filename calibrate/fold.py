"""Where a per-input-channel scale can be folded, found by testing the block itself.

AWQ and SmoothQuant multiply the weights of the Linears that share an input by
a per-channel scale s and divide that input by s. Nothing extra runs at
inference when the division is folded into the module that *produces* the
input: a norm's weight (and bias), or the output rows of an earlier Linear
whose output reaches the stage through channel-wise positively homogeneous ops
only (SiLU(gate) * up -> down: fold into up; ReLU(fc1) -> fc2: fold into fc1;
attention is linear in V, so v -> o when their shapes agree).

Rather than a per-architecture table of such pairs, each candidate producer is
tested on real block inputs: its parameters are divided by a random positive
s, and the fold is accepted only if the stage's input becomes exactly x / s.
Nonlinear paths and residual adds are rejected by the same test, and so is a
producer something else reads too (a mixture-of-experts router, the other
experts): the whole fold, 1/s into the producer and s into the stage, must
leave the block's output unchanged. A norm whose
output is `(1 + weight) * x` (Gemma's RMSNorm) fails the plain division and is
tested again in that form: its weight w becomes (1 + w) / s - 1.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from calibrate.blocks import BlockInputs, _first, check_activations, observe_block

log = logging.getLogger(__name__)


class Fold(NamedTuple):
    """Where a stage's 1/s goes: the block submodule `name`, whose output channels are `offset + weight`
    times the rest (offset 0: a Linear or a plain norm; 1: a Gemma norm)."""

    name: str
    offset: float = 0.0


OFFSETS = (0.0, 1.0)  # the weight forms the fold test tries, in order: w, then (1 + w)


def channel_params(module: nn.Module) -> list[torch.Tensor] | None:
    """The tensors to divide by s (one entry per output channel) to scale `module`'s output by 1/s."""
    if isinstance(module, nn.Linear):
        return [module.weight] + ([module.bias] if module.bias is not None else [])
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and not list(module.children()):
        b = getattr(module, "bias", None)  # LayerNorm
        return [w] + ([b] if isinstance(b, torch.Tensor) and b.shape == w.shape else [])
    return None


@torch.no_grad()
def fold_into_producer(producer: nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """Scale `producer`'s output channels by 1/s (s of shape (channels,)); `offset` as in `Fold`."""
    for i, p in enumerate(channel_params(producer)):
        shape = (-1,) + (1,) * (p.dim() - 1)  # weight rows (out, in) or a vector (out,)
        if i == 0 and offset:  # the weight of a (offset + w) norm; a bias is divided as it is
            p.add_(offset).div_(s.to(p.dtype).reshape(shape)).sub_(offset)
        else:
            p.div_(s.to(p.dtype).reshape(shape))


def fold(block: nn.Module, producer: Fold, s: torch.Tensor) -> None:
    """Fold 1/s into `block`'s submodule `producer` (a `find_producers` result)."""
    fold_into_producer(block.get_submodule(producer.name), s, producer.offset)


@torch.no_grad()
def scale_consumer(linear: nn.Linear, s: torch.Tensor) -> None:
    """Scale a Linear's input columns by s: W (out, in) -> W diag(s)."""
    linear.weight.mul_(s.to(linear.weight.dtype))


def _run_order(block: nn.Module, inputs: BlockInputs) -> list[tuple[str, nn.Module]]:
    """Submodules of `block` that produce outputs, in the order they first run."""
    order: list[tuple[str, nn.Module]] = []
    handles = []
    for name, mod in block.named_modules():
        if name and channel_params(mod) is not None:
            handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: order.append((name, m)) if all(n != name for n, _ in order) else None))
    try:
        with torch.no_grad():
            block(inputs.hidden[0], **inputs.kwargs[0])
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def find_producers(block: nn.Module, inputs: BlockInputs, stages: list[list[str]],
                   modules: dict[str, nn.Module], *, rtol: float = 1e-3) -> dict[str, Fold | None]:
    """For each stage (keyed by its first module's name), the block submodule that can absorb 1/s, or None.

    Candidates are modules that run before the stage, produce as many channels
    as the stage reads, and hold per-channel parameters; the one closest to the
    stage that passes the fold test wins.
    """
    one = BlockInputs(inputs.hidden[:1], inputs.kwargs[:1])  # one calibration batch is enough to tell
    order = _run_order(block, one)
    names = [n for n, _ in order]
    result: dict[str, Fold | None] = {}
    gen = torch.Generator().manual_seed(0)
    y0 = None  # the block's output on the batch, computed when a stage first has a candidate producer
    for stage in stages:
        lead = stage[0]
        result[lead] = None
        if lead not in names:
            continue
        width = modules[lead].in_features
        before = [(n, m) for n, m in order[: names.index(lead)]
                  if n not in stage and _out_channels(m) == width]
        if not before:
            continue
        x0 = _stage_input(block, one, lead, modules[lead])
        if x0 is None:  # a mixture-of-experts expert the first batch routes no token to
            continue
        check_activations(x0, f"the input of {lead}")
        if y0 is None:
            y0 = _first(block(one.hidden[0], **one.kwargs[0]))
            check_activations(y0, "the block's output")
        for name, mod in reversed(before):  # closest producer first
            for offset in OFFSETS if not isinstance(mod, nn.Linear) else (0.0,):
                s = torch.rand(width, generator=gen) * 1.5 + 0.5  # (width,) in [0.5, 2)
                saved = [p.detach().clone() for p in channel_params(mod)] + [modules[n].weight.detach().clone()
                                                                             for n in stage]
                fold_into_producer(mod, s.to(saved[0].device), offset)
                try:
                    x1 = _stage_input(block, one, lead, modules[lead])
                    for n in stage:
                        scale_consumer(modules[n], s.to(saved[0].device))
                    y1 = _first(block(one.hidden[0], **one.kwargs[0]))  # the whole fold: the block computes the same
                finally:
                    for p, v in zip(channel_params(mod) + [modules[n].weight for n in stage], saved, strict=True):
                        p.copy_(v)
                if x1 is None or x1.shape != x0.shape:  # the producer feeds a router too: the routing changed
                    continue
                want = x0 / s.to(x0.device, x0.dtype)
                # the stage reads x / s, and nothing else reads the producer (a MoE router, another expert)
                if (torch.allclose(x1, want, rtol=rtol, atol=rtol * float(want.abs().max()))
                        and torch.allclose(y1, y0, rtol=rtol, atol=rtol * float(y0.abs().max()))):
                    result[lead] = Fold(name, offset)
                    break
            if result[lead] is not None:
                break
        log.debug("fold target of %s: %s", lead, result[lead])
    return result


def _out_channels(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    w = getattr(m, "weight", None)
    return w.shape[0] if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def _stage_input(block: nn.Module, inputs: BlockInputs, name: str, module: nn.Module) -> torch.Tensor | None:
    """The input of `module` on the first batch; None when it ran on no token (an expert nothing was routed to)."""
    got: list[torch.Tensor] = []
    observe_block(block, inputs, {name: module}, lambda n, x: got.append(x.detach().clone()), stop_early=True)
    return got[0] if got else None
