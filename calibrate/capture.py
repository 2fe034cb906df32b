"""Capturing what the decoder blocks are called with: block 0's hidden states and every block's arguments."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from calibrate import streaming
from calibrate.blocks import (
    BlockInputs,
    _Stop,
    check_activations,
    decoder_blocks,
    forwards_replaced,
)


def _named_call(sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(hidden states, every other argument by name) of a block call, positional arguments named by the
    block's signature (GPT-2's model passes the mask positionally)."""
    bound = sig.bind(*args, **kwargs).arguments
    named: dict = {}
    for name, value in bound.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError("decoder blocks called with unnamed extra positional arguments are not supported")
        else:
            named[name] = value
    first = next(iter(sig.parameters))
    return named.pop(first), named


def _share_equal(kw: dict, earlier: list[dict]) -> None:
    """Point kw's tensors at equal tensors of `earlier` calls (a 4-D causal mask is 2 MiB per batch of 8 x 512)."""
    for k, v in kw.items():
        for prev in earlier:
            p = prev.get(k)
            if p is v or (isinstance(v, torch.Tensor) and isinstance(p, torch.Tensor) and p.shape == v.shape
                          and p.dtype == v.dtype and p.device == v.device and torch.equal(p, v)):
                kw[k] = p
                break


def capture_first_block_inputs(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 8) -> BlockInputs:
    """Run `ids` (samples, seq_len) through the model and keep block 0's inputs and every block's kwargs.

    Each block is replaced, for this forward only, by a stand-in that records its arguments and hands its
    input on unchanged; the last one ends the forward. No block computes anything.
    """
    path, blocks = decoder_blocks(model)
    got = BlockInputs([], [], [[] for _ in blocks])
    sigs = [inspect.signature(blk.forward) for blk in blocks]

    def stand_in(j: int):
        def forward(*args, **kwargs):
            hidden, kw = _named_call(sigs[j], args, kwargs)
            for k in ("cache", "past_key_value", "past_key_values"):
                kw.pop(k, None)  # no KV cache while calibrating
            calls = got.by_block[j]
            _share_equal(kw, ([calls[-1]] if calls else []) + ([got.by_block[j - 1][-1]] if j else []))
            if j == 0:
                check_activations(hidden, f"the input of the first decoder block (calibration batch "
                                          f"{len(got.hidden)})")
                got.hidden.append(hidden.detach())
            calls.append(kw)
            if j == len(blocks) - 1:
                raise _Stop
            return hidden
        return forward

    with forwards_replaced(blocks, lambda j, blk: stand_in(j)), torch.no_grad(), \
            streaming.outside_blocks(model, path, on_demand=True):
        device = model.get_input_embeddings().weight.device
        if device.type == "meta":  # lazily loaded, read on first call: the store loads onto the CPU
            device = torch.device("cpu")
        for i in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    streaming.trim_memory()  # the embedding forwards' temporaries
    got.at(0)
    return got
