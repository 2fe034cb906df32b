"""Perplexity under a pinned protocol (see DESIGN.md).

The text is read as one string, tokenized without special tokens, and cut into
non-overlapping `seq_len`-token windows; perplexity is exp(mean NLL) over every
predicted token of the first `windows` windows (each window's first token is
context only). The protocol travels with every result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from compress.data import wikitext2_path
from compress.registry import register_task


@dataclass(frozen=True, kw_only=True)
class PerplexityConfig:
    windows: int = 64  # first N windows; -1 = all
    seq_len: int = 1024  # tokens per window
    prepend_bos: bool = False  # BOS as unscored context before each window (off in the pinned protocol)
    batch_size: int = 1  # windows per forward pass

    def __post_init__(self) -> None:
        if self.windows == 0 or self.windows < -1:
            raise ValueError(f"windows must be positive or -1 (all), got {self.windows}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def compute_perplexity(backend, text: str, cfg: PerplexityConfig, *, dataset: str,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Score `text` with `backend`; return perplexity, token counts, timing and the protocol."""
    t0 = time.perf_counter()
    ids = torch.tensor(backend.encode(text), dtype=torch.int64)
    available = ids.numel() // cfg.seq_len
    if available == 0:
        raise ValueError(f"{dataset}: {ids.numel()} tokens is less than one window of {cfg.seq_len}")
    n = available if cfg.windows == -1 else min(cfg.windows, available)
    windows = ids[: n * cfg.seq_len].view(n, cfg.seq_len)  # (n, seq_len)
    bos = None
    if cfg.prepend_bos:
        bos = backend.bos_token_id
        if bos is None:
            raise ValueError("prepend_bos: the tokenizer has no BOS token")
    total, count = 0.0, 0
    for i in range(0, n, cfg.batch_size):
        nll = backend.token_nll(windows[i : i + cfg.batch_size], bos=bos)
        total += float(nll.sum())
        count += nll.numel()
        if progress:
            progress(dataset, min(i + cfg.batch_size, n), n)
    return {
        "task": dataset,
        "perplexity": math.exp(total / count),
        "mean_nll": total / count,
        "tokens_scored": count,
        "windows": n,
        "windows_available": available,
        "seconds": round(time.perf_counter() - t0, 2),
        "backend": backend.name,
        "protocol": {
            "text": "read as one string, tokenized without special tokens",
            "windows": "non-overlapping, first token of each window is context only",
            **{k: v for k, v in asdict(cfg).items() if k != "batch_size"},
            "requested_windows": cfg.windows,
        },
    }


@register_task("wikitext2")
def wikitext2(backend, cfg: PerplexityConfig = PerplexityConfig(), *, progress=None) -> dict[str, Any]:
    """WikiText-2 raw test split perplexity (DESIGN.md protocol)."""
    text = wikitext2_path("test").read_text(encoding="utf-8")
    return compute_perplexity(backend, text, cfg, dataset="wikitext2", progress=progress)


@register_task("text")
def text_file(backend, cfg: PerplexityConfig = PerplexityConfig(), *, path: str, progress=None) -> dict[str, Any]:
    """Perplexity of a user text file, or a JSONL field as `FILE.jsonl:FIELD` (`--task text:PATH`)."""
    from calibrate.data import read_text

    if not path:
        raise ValueError("task text needs a path: --task text:PATH")
    text = read_text(str(Path(path)) if ".jsonl:" not in path else path)
    return compute_perplexity(backend, text, cfg, dataset=f"text:{path}", progress=progress)
