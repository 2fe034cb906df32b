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

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from calibrate import streaming

# attribute path of the decoder-block ModuleList, one row per architecture family
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "bert.encoder.layer",  # BERT (masked LM)
    "roberta.encoder.layer",  # RoBERTa
    "encoder.layer",  # a bare BERT / RoBERTa encoder (BertModel: no masked-LM head around it)
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


def modules_by_block(model: nn.Module, selected: dict[str, nn.Module], pass_name: str
                     ) -> tuple[str, nn.ModuleList, list[dict[str, nn.Module]]]:
    """The blocks' path, the decoder blocks and, for each, its selected modules keyed by their name inside it.

    Block-wise passes calibrate only what lives inside a decoder block; a selected
    module outside (an embedding projection, lm_head) is an error naming it.
    """
    path, blocks = decoder_blocks(model)
    if not selected:
        kinds = sorted({type(m).__name__ for m in blocks[0].modules() if not list(m.children())})
        raise ValueError(f"{pass_name.partition(':')[0]} found no nn.Linear to work on in the decoder blocks of "
                         f"{type(model).__name__} (their layers: {', '.join(kinds)})")
    outside = [n for n in selected if not n.startswith(f"{path}.")]
    if outside:
        raise ValueError(f"{pass_name.partition(':')[0]} works inside the decoder blocks ({path}); "
                         f"add these to ignore: {', '.join(outside[:5])}")
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    for n, m in selected.items():
        b, rest = _split(path, n)
        per_block[b][rest] = m
    return path, blocks, per_block


def _split(path: str, name: str) -> tuple[int, str]:
    """'model.layers.3.mlp.up_proj' -> (3, 'mlp.up_proj') for blocks at `path`."""
    b, _, rest = name[len(path) + 1:].partition(".")
    return int(b), rest


def modules_in_turn(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for each of `modules`, its tensors in memory while the caller works on it.

    Lazily loaded: the modules outside the decoder blocks first, then those of
    one block after another, each block loaded once (`blocks_in_turn`).
    """
    if streaming.store_of(model) is None:
        yield from modules.items()
        return
    path, blocks = decoder_blocks(model)
    inside: dict[int, list[str]] = {}
    outside = []
    for n in modules:
        if n.startswith(f"{path}."):
            inside.setdefault(_split(path, n)[0], []).append(n)
        else:
            outside.append(n)
    if outside:
        with streaming.outside_blocks(model, path):
            yield from [(n, model.get_submodule(n)) for n in outside]
    for b, _ in blocks_in_turn(model, blocks):
        if b in inside:
            yield from [(n, model.get_submodule(n)) for n in inside[b]]


@contextlib.contextmanager
def forwards_replaced(blocks: nn.ModuleList, forward_of: Callable[[int, nn.Module], Callable]) -> Iterator[None]:
    """Within the block, block j runs `forward_of(j, block)` instead of its forward; an instance-level forward a
    block had (a wrapper, e.g. accelerate's hook) is put back afterwards."""
    own = [blk.__dict__.get("forward") for blk in blocks]
    try:
        for j, blk in enumerate(blocks):
            blk.forward = forward_of(j, blk)
        yield
    finally:
        for blk, fwd in zip(blocks, own, strict=True):
            if fwd is None:
                blk.__dict__.pop("forward", None)
            else:
                blk.forward = fwd


class _Stop(Exception):
    """Raised to end a forward pass early (capture, observation)."""


@dataclass
class BlockInputs:
    """One entry per calibration batch: the current block's hidden-state input and its other kwargs.

    `by_block[b]` holds block b's kwargs per batch: a model may pass each block what its layer type
    needs (Gemma 2/3: a sliding-window or a full causal mask, local or global RoPE); `at(b)` makes
    them current as the walk reaches block b.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    by_block: list[list[dict]] | None = None

    def at(self, b: int) -> None:
        if self.by_block is not None:
            self.kwargs = self.by_block[b]


def batches(ids: torch.Tensor, batch_size: int) -> int:
    """How many calibration batches `capture_first_block_inputs` makes of `ids` (samples, seq_len)."""
    return max(1, -(-ids.shape[0] // batch_size))


def _first(out):
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, *, dtype: torch.dtype | None = None) -> None:
    """Replace each captured batch's hidden states by the block's output (in place: one copy in memory).

    With `dtype` the forward runs under autocast to it; outputs keep the dtype of the inputs.
    """
    for i in range(len(inputs.hidden)):
        _replace(inputs.hidden, i, _first(forward_batch(block, inputs, i, dtype)))


def check_activations(x: torch.Tensor, where: str) -> None:
    """Calibration statistics of NaN/inf activations would be garbage in every later block: refuse them."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"calibration: {where} has non-finite values (NaN or inf): the model's activations "
                         "overflow on the calibration text (in float32 the float model itself fails here)")


def _replace(hidden: list[torch.Tensor], i: int, out: torch.Tensor) -> None:
    """hidden[i] = out, in the dtype of hidden[i], written into its memory where the shape allows.

    Writing in place keeps the long-lived batches where they are: fresh
    copies would land past the freed ones and grow the heap by one copy of
    the activations per block (glibc keeps such holes instead of returning
    them).
    """
    check_activations(out, f"a decoder block's output (calibration batch {i})")
    h = hidden[i]
    if out.shape == h.shape and not h.requires_grad:
        h.copy_(out)
    else:
        hidden[i] = out.detach().to(h.dtype)


def blocks_in_turn(model: nn.Module, blocks: nn.ModuleList) -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, block) in order; a lazily loaded model has only the yielded block in memory.

    The block's tensors are read from disk before it is yielded and, once the
    caller asks for the next one, written back (if changed) and freed.
    """
    store = streaming.store_of(model)
    path, _ = decoder_blocks(model)
    for b, block in enumerate(blocks):
        if store is None:
            yield b, block
            streaming.trim_memory()  # the block's freed temporaries (the store trims after releasing a block)
            continue
        with store.loaded(f"{path}.{b}", block):
            yield b, block


@torch.no_grad()
def observe_block(block: nn.Module, inputs: BlockInputs, modules: dict[str, nn.Module],
                  on_input: Callable[[str, torch.Tensor], None], *, stop_early: bool = False,
                  dtype: torch.dtype | None = None) -> None:
    """Run the block over all batches, calling on_input(name, x) with each watched module's input.

    With `stop_early`, each batch's forward ends as soon as every watched module
    has seen its input: observing the first modules of a block then costs
    almost nothing, instead of a full block forward. With `dtype` the forwards
    run under autocast to it.
    """
    _watching(modules, on_input, stop_early, len(inputs.hidden), lambda i: forward_batch(block, inputs, i, dtype))


def forward_batch(block: nn.Module, inputs: BlockInputs, i: int, dtype: torch.dtype | None = None):
    """The block's output on captured batch i (its own kwargs), under autocast to `dtype` when given."""
    with _autocast(inputs.hidden[i].device, dtype):
        return block(inputs.hidden[i], **inputs.kwargs[i])


def _watching(watched: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None], stop_early: bool,
              n_batches: int, forward: Callable[[int], object]) -> None:
    """Call forward(i) for every batch with pre-hooks on the watched modules (see `observe_block`)."""
    seen: set[str] = set()

    def hook(mod, args, n):
        if args[0].numel():  # (an expert the router sent no token to runs on an empty batch)
            on_input(n, args[0])
        seen.add(n)
        if stop_early and len(seen) == len(watched):
            raise _Stop

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in watched.items()]
    try:
        for i in range(n_batches):
            seen.clear()
            try:
                forward(i)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _stages(order: list[tuple[str, torch.Tensor]], modules: dict[str, nn.Module]) -> list[list[str]]:
    """Group module names by the input tensor they were called with, in first-call order."""
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
