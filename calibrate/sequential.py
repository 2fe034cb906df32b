"""Layer-wise solving from input Hessians, block after block (GPTQ, SparseGPT).

Both GPTQ (quantization) and SparseGPT (pruning) rewrite each Linear W from
the Hessian H = 2 X^T X of its inputs X, so that XW^T changes as little as
possible. This module runs that loop once for both: capture the first block's
inputs, then for each decoder block collect the Hessian of every stage
(modules fed the same tensor, e.g. q/k/v) on the inputs the already-processed
blocks produce, let the solver rewrite the stage's modules, and feed the block's
outputs to the next block. With `true_sequential` each stage's Hessian is
collected after the stages before it in the block were rewritten.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from calibrate.blocks import (
    blocks_in_turn,
    capture_first_block_inputs,
    modules_by_block,
    run_block,
)
from calibrate.replay import BlockReplay
from calibrate.stats import HessianCollector
from compress.lazy import trim_memory

# solve(full name, name inside the block, module, take_hessian): rewrite the module from its Hessian.
# take_hessian() returns the stage's (in, in) Hessian; for the stage's last module it hands over the only
# reference, so a solver that calls it inline in its own call can free the matrix as soon as it is done.
Solver = Callable[[str, str, nn.Module, Callable[[], torch.Tensor]], None]


def inverse_cholesky_(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """In place: the upper Cholesky factor of (H + damp I)^-1, whose row j holds column j's update coefficients.

    `H` (in, in) must be the caller's own float copy (a 5632-wide down_proj
    Hessian is 121 MiB, so no second one is made); damp is `dampening` times
    the mean of diag(H).
    """
    if not bool(torch.isfinite(H).all()):
        raise ValueError("the calibration Hessian has non-finite values: the layer's inputs overflow float32 "
                         "on the calibration data")
    H.diagonal().add_(dampening * torch.mean(torch.diag(H)))
    try:
        torch.linalg.cholesky(H, out=H)
        torch.cholesky_inverse(H, out=H)
        return torch.linalg.cholesky(H, upper=True, out=H)
    except torch.linalg.LinAlgError:
        raise ValueError(f"the calibration Hessian is not positive definite even with dampening {dampening:g} "
                         "(inputs of extreme range); raise dampening") from None


@torch.no_grad()
def solve_blocks(model: nn.Module, selected: dict[str, nn.Module], calib: torch.Tensor, solve: Solver, *,
                 label: str, batch_size: int = 8, dtype: torch.dtype | None = None, true_sequential: bool = True,
                 block_done: Callable[[nn.Module], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
    """Run `solve` on every selected Linear (all inside the decoder blocks), block by block.

    `calib` is (samples, seq_len) token ids; forwards run under autocast to
    `dtype` when given (Hessians stay float32). `block_done(block)` is called
    after a block's outputs were computed for the next one, before it is
    released (a lazily loaded model writes it back then).
    """
    path, blocks, per_block = modules_by_block(model, selected, label)
    inputs = capture_first_block_inputs(model, calib, batch_size=batch_size)
    for b, block in blocks_in_turn(model, blocks):
        mods = per_block[b]
        if not mods:
            run_block(block, inputs, dtype=dtype)
            continue
        replay = BlockReplay(block, inputs, mods, dtype=dtype)
        stages = replay.stages  # modules in one stage read the same tensor, so they share one Hessian
        for group in ([[st] for st in stages] if true_sequential else [stages]):
            hs = {st[0]: HessianCollector(mods[st[0]].in_features, device=mods[st[0]].weight.device) for st in group}
            replay.observe({lead: mods[lead] for lead in hs}, lambda n, x, hs=hs: hs[n].add_batch(x))
            for st in group:
                hessian = [hs.pop(st[0]).hessian]  # the collector's sum is freed here
                for n in st:
                    solve(f"{path}.{b}.{n}", n, mods[n], hessian.pop if n == st[-1] else lambda h=hessian: h[0])
                replay.freeze(st)
            trim_memory()  # the stage's Hessians and solver temporaries, freed: keep the heap from creeping
        replay.run()  # the processed block feeds the next one
        if block_done is not None:
            block_done(block)
        if progress:
            progress(label, b + 1, len(blocks))
