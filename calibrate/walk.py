"""The one walk over decoder blocks that every calibrated pass plugs into.

The calibration windows run through the model once, up to the first decoder
block, whose inputs are captured (`capture_first_block_inputs`). Then each
block in turn is handed to the pass's `visit(block)`, which observes the
block's selected modules on the current inputs (statistics per input stage:
the modules fed the same tensor, e.g. q/k/v) and changes them; the changed
block then runs to produce the next block's inputs, so every block is
calibrated on what the already-compressed blocks before it produce. A lazily
loaded model has only the current block in memory (`blocks_in_turn`).

A pass never writes this loop; it says what it does to one block:

    def visit(block: Block) -> None:
        for stage, (hessian,) in block.stagewise(HessianCollector.of):
            ...  # rewrite block.modules[n] for n in stage

`Block.observe` collects statistics of several stages in one pass over the
unchanged block (AWQ, SmoothQuant, Wanda); `Block.stagewise` observes each
stage after the ones before it were rewritten ("true sequential": GPTQ,
SparseGPT, W8A8), and lets the replay keep what no longer changes
(`calibrate.replay`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from calibrate.blocks import (
    BlockInputs,
    blocks_in_turn,
    decoder_blocks,
    forward_batch,
    modules_by_block,
    run_block,
)
from calibrate.capture import capture_first_block_inputs
from calibrate.experts import count_routes
from calibrate.fold import Fold, find_producers
from calibrate.forward import resolve_forward_dtype
from calibrate.replay import BlockReplay
from calibrate.stats import HessianCollector
from calibrate.streaming import trim_memory

Progress = Callable[[str, int, int], None]  # (label, done, total)
Collectors = Callable[[nn.Module], tuple]  # a stage's first module -> its statistics collectors (`add_batch(x)`)


@dataclass
class Block:
    """One decoder block during the walk: what a pass's `visit` works on."""

    index: int
    prefix: str  # full name of the block plus ".", e.g. "model.layers.3."
    module: nn.Module
    modules: dict[str, nn.Module]  # the selected modules inside it, by their name inside the block
    inputs: BlockInputs  # the block's inputs on every calibration batch
    dtype: torch.dtype | None  # autocast dtype of the forwards (None: as the weights are)
    replay: BlockReplay
    ran: bool = False  # the block has produced the next block's inputs
    known_producers: dict[tuple, dict[str, str | None]] = field(default_factory=dict)  # shared by the walk

    def name(self, short: str) -> str:
        """'mlp.down_proj' -> 'model.layers.3.mlp.down_proj'."""
        return self.prefix + short

    @property
    def stages(self) -> list[list[str]]:
        """The selected modules grouped by the tensor they read, in execution order (Llama: [q, k, v], [o],
        [gate, up], [down]); modules that never ran on the calibration data come last, as one stage."""
        return self.replay.stages

    def observe(self, stages: list[list[str]], collectors: Collectors) -> dict[str, tuple]:
        """Statistics of the inputs of `stages`, in one pass over the block as it is now: the first module
        name of each stage -> `collectors(that module)`, fed with the stage's input on every batch (each
        forward ends once the last watched stage has its input)."""
        stats = {st[0]: collectors(self.current(st[0])) for st in stages}
        self.replay.observe({lead: self.current(lead) for lead in stats},
                            lambda n, x: [c.add_batch(x) for c in stats[n]])
        return stats

    def stagewise(self, collectors: Collectors, *, sequential: bool = True) -> Iterator[tuple[list[str], tuple]]:
        """Yield (stage, its statistics) in execution order; the caller rewrites the stage's modules before
        asking for the next one, which then sees their outputs (`sequential`). Without `sequential`, all
        statistics are collected at once, on the block as it was given."""
        for group in ([[st] for st in self.stages] if sequential else [self.stages]):
            stats = self.observe(group, collectors)
            for st in group:
                yield st, stats.pop(st[0])
                self.replay.freeze(st)  # final: later passes over the block may reuse what it computes
            trim_memory()  # the stage's statistics and the caller's temporaries, freed

    def hessians(self, *, sequential: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """`stagewise` with each stage's input Hessian (GPTQ, SparseGPT): yield (module, H) for every module of
        each stage in turn; the stage's last module gets the only reference to H, so it may free it early."""
        for stage, (collected,) in self.stagewise(HessianCollector.of, sequential=sequential):
            H = [collected.take()]
            for n in stage:
                yield n, H.pop() if n == stage[-1] else H[0]

    def producers(self) -> dict[str, Fold | None]:
        """Stage lead -> the block submodule that can absorb a per-channel scale of the stage's input, or None
        (`calibrate.fold.find_producers`). A fact of the block's structure: tested on the first block of a
        kind (class and stages), then reused for the blocks like it."""
        kind = (type(self.module), tuple(map(tuple, self.stages)))
        if kind not in self.known_producers:
            self.known_producers[kind] = find_producers(self.module, self.inputs, self.stages, self.modules)
        return self.known_producers[kind]

    def run(self, on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """Replace the inputs by the block's outputs, the next block's inputs, calling `on_batch(input,
        output)` on each batch when given. The walk runs the block after `visit` unless `visit` did."""
        self.replay.run(on_batch)
        self.ran = True

    def current(self, short: str) -> nn.Module:
        """The module now at `short` (a pass may have replaced the selected one)."""
        return self.module.get_submodule(short)


def walk(model: nn.Module, selected: dict[str, nn.Module], calib: torch.Tensor, visit: Callable[[Block], None], *,
         label: str, batch_size: int = 8, forward_dtype: str = "auto", progress: Progress | None = None,
         after: Callable[[nn.Module], None] | None = None, min_expert_tokens: int = 0) -> None:
    """Call `visit(block)` on every decoder block holding a selected module, in order, on calibration windows
    `calib` (samples, seq_len); each block then runs to feed the next, and `after(block module)` is called
    (before a lazily loaded block is written back and freed). Selected modules must lie inside the blocks.
    A block with mixture-of-experts layers first counts each expert's routed tokens; an expert routed fewer
    than `min_expert_tokens` is calibrated on all of the layer's tokens (`calibrate.experts`)."""
    path, blocks, per_block = modules_by_block(model, selected, label)
    dtype = resolve_forward_dtype(forward_dtype, next(iter(selected.values())).weight)
    inputs = capture_first_block_inputs(model, calib, batch_size=batch_size)
    known_producers: dict[tuple, dict[str, str | None]] = {}
    for b, module in blocks_in_turn(model, blocks):
        inputs.at(b)  # block b's own mask / RoPE arguments
        if per_block[b]:
            count_routes(module, functools.partial(forward_batch, module, inputs, dtype=dtype), len(inputs.hidden),
                         min_expert_tokens, f"{path}.{b}.")
            block = Block(b, f"{path}.{b}.", module, per_block[b], inputs, dtype,
                          BlockReplay(module, inputs, per_block[b], dtype=dtype), known_producers=known_producers)
            visit(block)
            if not block.ran:
                block.run()  # the processed block feeds the next one
        else:
            run_block(module, inputs, dtype=dtype)
        if after is not None:
            after(module)
        if progress:
            progress(label, b + 1, len(blocks))


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear inside the decoder blocks (structured pruning works on all of them)."""
    path, _ = decoder_blocks(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(f"{path}.")}
