"""Layer pruning: remove whole decoder blocks that change the hidden states least.

Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than
You Expect", 2024, https://arxiv.org/abs/2403.03853. A block's Block Influence
is BI = 1 - E_tokens[cos(x_in, x_out)], measured on calibration data in one
pass over the unpruned model; the blocks of lowest BI are removed. The
`loss` importance instead removes, one at a time, the block whose removal
raises the calibration loss least (greedy, one full forward per candidate:
slower, and aware of how removals interact).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calibrate.blocks import decoder_blocks
from calibrate.forward import ForwardOptions, resolve_forward_dtype
from calibrate.walk import Block, block_linears, walk
from compress import lazy
from compress.archs import require_lm_head
from compress.checks import check_fields
from compress.pipeline import PassReport, Progress
from compress.prune.sparsity import CONFIG_KEY, pruned_modules
from compress.registry import register_pass

log = logging.getLogger(__name__)

LAYER_IMPORTANCE = ("cosine", "loss")
ORIGIN_KEY = "compress_layer_origin"  # config.json key: original block index of every remaining block


@dataclass(frozen=True, kw_only=True)
class LayersConfig(ForwardOptions):
    ratio: float = 0.25  # fraction of the decoder blocks to remove (rounded to whole blocks)
    importance: str = "cosine"  # ShortGPT block influence, or "loss": greedy on the calibration loss
    loss_samples: int = 4  # calibration windows scored per candidate with importance: loss (each a full forward)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, share=("ratio",), positive=("loss_samples",), choices={"importance": LAYER_IMPORTANCE})


@torch.no_grad()
def block_influence(model: nn.Module, calib: torch.Tensor, *, batch_size: int = 8, forward_dtype: str = "auto",
                    progress: Progress | None = None) -> list[float]:
    """ShortGPT's BI of every decoder block: 1 - mean cosine similarity of its input and output hidden states.

    Block by block over the captured calibration inputs, so a lazily loaded
    model holds one block in memory; only one batch's input is copied at a time.
    """
    bi: list[float] = []

    def visit(block: Block) -> None:
        total = [0.0, 0]

        def cosine(before: torch.Tensor, after: torch.Tensor) -> None:
            cos = F.cosine_similarity(before.float(), after.float(), dim=-1)  # (batch, seq)
            total[0] += float(cos.sum())
            total[1] += cos.numel()

        block.run(cosine)
        bi.append(1.0 - total[0] / total[1])

    walk(model, block_linears(model), calib, visit, label="prune_layers", batch_size=batch_size,
         forward_dtype=forward_dtype, progress=progress)
    if len(bi) != len(decoder_blocks(model)[1]):
        raise ValueError("prune_layers: a decoder block without Linear layers has no block influence")
    return bi


@torch.no_grad()
def _calib_loss(model: nn.Module, ids: torch.Tensor, batch_size: int, dtype: torch.dtype | None) -> float:
    total, n = 0.0, 0
    device = model.get_input_embeddings().weight.device
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(input_ids=x, use_cache=False).logits
        total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        n += x[:, 1:].numel()
    return total / n


def _greedy_by_loss(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, n_drop: int, batch_size: int,
                    dtype: torch.dtype | None, progress: Progress | None) -> list[int]:
    """Indices removed one by one, each the block whose removal costs least calibration loss given the earlier ones."""
    kept, dropped = list(range(len(blocks))), []
    original = list(blocks)
    try:
        for step in range(n_drop):
            best, best_loss = None, float("inf")
            for j in kept:
                _set_blocks(model, [original[k] for k in kept if k != j])
                loss = _calib_loss(model, ids, batch_size, dtype)
                if loss < best_loss:
                    best, best_loss = j, loss
            kept.remove(best)
            dropped.append(best)
            log.info("prune_layers: removing block %d (calibration loss %.4f)", best, best_loss)
            if progress:
                progress("prune_layers", step + 1, n_drop)
    finally:
        _set_blocks(model, original)
    return dropped


def _set_blocks(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Make `blocks` the model's decoder blocks (a new ModuleList at the same path)."""
    parent, _, attr = decoder_blocks(model)[0].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList(blocks))


# block influence goes block by block; the loss importance needs whole-model forwards
@register_pass("prune_layers", LayersConfig, needs_calibration=True,
               streams_blocks=lambda cfg: cfg.importance == "cosine")
@torch.no_grad()
def run(model: nn.Module, cfg: LayersConfig, calib: torch.Tensor, *, progress: Progress | None = None) -> PassReport:
    """Remove the least important decoder blocks; the config's layer count (and per-layer lists) follow."""
    path, blocks = decoder_blocks(model)
    n = len(blocks)
    n_drop = round(cfg.ratio * n)
    if not 0 < n_drop < n:
        raise ValueError(f"ratio {cfg.ratio} of {n} blocks removes {n_drop}: choose a ratio in "
                         f"[{0.5 / n:.4f}, {1 - 0.5 / n:.4f})")
    scores = None
    if cfg.importance == "cosine":
        scores = block_influence(model, calib, batch_size=cfg.batch_size, forward_dtype=cfg.forward_dtype,
                                 progress=progress)
        dropped = sorted(range(n), key=lambda i: scores[i])[:n_drop]
    else:
        require_lm_head(model.config, "prune_layers --importance loss (the calibration loss)")
        dtype = resolve_forward_dtype(cfg.forward_dtype, next(model.parameters()))
        dropped = _greedy_by_loss(model, blocks, calib[:cfg.loss_samples], n_drop, cfg.batch_size, dtype, progress)
    before = sum(p.numel() for p in model.parameters())
    remove_blocks(model, dropped)
    log.info("prune_layers: removed blocks %s", sorted(dropped))
    return PassReport(name="prune_layers", modules=n_drop, config={
        "removed_blocks": sorted(dropped), **({"block_influence": [round(s, 6) for s in scores]} if scores else {}),
        "config_changes": {"num_hidden_layers": [n, n - n_drop]}},
        metrics={"parameters_removed": float(before - sum(p.numel() for p in model.parameters()))})


def remove_blocks(model: nn.Module, drop: list[int]) -> None:
    """Delete decoder blocks `drop` and renumber the rest: config, per-layer config lists, layer_idx, records."""
    path, blocks = decoder_blocks(model)
    n = len(blocks)
    kept = [i for i in range(n) if i not in set(drop)]
    _set_blocks(model, [blocks[i] for i in kept])
    store = lazy.store_of(model)
    if store is not None:  # a lazily loaded model: the stored tensors take the blocks' new names
        store.renumber(path, kept)
    for new, block in enumerate(decoder_blocks(model)[1]):
        for m in block.modules():  # the KV cache is indexed by layer_idx
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    config = model.config
    config.num_hidden_layers = len(kept)
    # which block of the original model each one is: distillation maps student to teacher layers by it
    origin = getattr(config, ORIGIN_KEY, None) or list(range(n))
    setattr(config, ORIGIN_KEY, [origin[i] for i in kept])
    for key, value in list(vars(config).items()):  # per-layer lists (layer_types, ...) keep the kept entries
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(config, key, [value[i] for i in kept])
    sparse = pruned_modules(model)
    if sparse:  # a sparsity record names blocks by index
        where = {old: new for new, old in enumerate(kept)}
        pat = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
        renamed = {}
        for name, label in sparse.items():
            m = pat.match(name)
            if m is None or int(m[1]) in where:
                renamed[pat.sub(lambda m: f"{path}.{where[int(m[1])]}.", name) if m else name] = label
        setattr(config, CONFIG_KEY, {"modules": renamed})
