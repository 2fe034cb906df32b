"""Perplexity under a pinned protocol (see DESIGN.md).

The text is read as one string, tokenized without special tokens, and cut into
non-overlapping `seq_len`-token windows; perplexity is exp(mean NLL) over every
predicted token of the first `windows` windows (each window's first token is
context only). The protocol travels with every result.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.data import wikitext2_path
from compress.registry import register_task
from eval.stats import perplexity_ci


@dataclass(frozen=True, kw_only=True)
class PerplexityConfig:
    windows: int = 64  # first N windows; -1 = all
    seq_len: int = 1024  # tokens per window
    # BOS as unscored context before each window; None: as the tokenizer does by default (resolved and recorded
    # in the protocol: the reference model's tokenizer adds none, so its pinned protocol scores without)
    prepend_bos: bool | None = None
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
    """Score `text` with `backend`: perplexity with its 95 % interval, per-window records, timing, protocol.

    Besides token perplexity, word and byte perplexity and bits per byte are
    reported as lm-evaluation-harness defines them (exp of the summed NLL over
    the number of words / UTF-8 bytes), counting the words and bytes of the
    text that the scored tokens decode to.
    """
    t0 = time.perf_counter()
    cfg = resolve_bos(backend, cfg)
    windows, available, bos = text_windows(backend, text, cfg, dataset=dataset)
    n = windows.shape[0]
    t_fwd = 0.0
    nll = torch.empty(n, dtype=torch.float64)  # summed NLL per window
    for i in range(0, n, cfg.batch_size):
        t = time.perf_counter()
        nll[i : i + cfg.batch_size] = backend.token_nll(windows[i : i + cfg.batch_size], bos=bos).sum(1)
        t_fwd += time.perf_counter() - t
        if progress:
            progress(dataset, min(i + cfg.batch_size, n), n)
    per_window = cfg.seq_len - 1
    count = n * per_window
    total = float(nll.sum())
    scored = [backend.decode(w[1:].tolist()) for w in windows]  # the text each window's scored tokens spell
    words = sum(len(t.split()) for t in scored)
    n_bytes = sum(len(t.encode("utf-8")) for t in scored)
    lo, hi = perplexity_ci(nll.numpy(), np.full(n, per_window))
    return {
        "task": dataset,
        "metric": getattr(backend, "metric", "perplexity"),  # a masked LM: pseudo-perplexity (eval.masked)
        "value": math.exp(total / count),
        "ci95": [lo, hi],
        "perplexity": math.exp(total / count),
        "mean_nll": total / count,
        "word_perplexity": _exp(total / words) if words else None,
        "byte_perplexity": _exp(total / n_bytes) if n_bytes else None,
        "bits_per_byte": total / n_bytes / math.log(2) if n_bytes else None,
        "tokens_scored": count,
        "words_scored": words,
        "bytes_scored": n_bytes,
        "windows": n,
        "windows_available": available,
        "seconds": round(time.perf_counter() - t0, 2),
        "forward_seconds": round(t_fwd, 2),
        "backend": backend.name,
        "protocol": window_protocol(cfg, windows),
        "items": [{"id": f"window {i}", "nll": float(nll[i]), "tokens": per_window} for i in range(n)],
    }


def text_windows(backend, text: str, cfg: PerplexityConfig, *, dataset: str
                 ) -> tuple[torch.Tensor, int, int | None]:
    """The protocol's windows of `text`: (windows (n, seq_len), windows available, BOS id or None). Every metric
    scored on a text (perplexity, pseudo-perplexity, embedding fidelity) reads these, so their items match."""
    cfg = resolve_bos(backend, cfg)
    limit = getattr(backend, "max_positions", None)
    if limit and cfg.seq_len + bool(cfg.prepend_bos) > limit:
        # past its position table a model either fails (learned positions) or silently extrapolates (RoPE)
        raise ValueError(f"{dataset}: windows of {cfg.seq_len} tokens{' plus BOS' if cfg.prepend_bos else ''} exceed "
                         f"the model's {limit} positions (max_position_embeddings); use --seq-len "
                         f"{limit - bool(cfg.prepend_bos)} or less")
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
    return windows, available, bos


def resolve_bos(backend, cfg: PerplexityConfig) -> PerplexityConfig:
    """`cfg` with prepend_bos decided: as given, else the tokenizer's default (a model trained always to see BOS
    is scored with it, as lm-evaluation-harness and multiple choice do; scoring it without can multiply its
    perplexity severalfold)."""
    if cfg.prepend_bos is not None:
        return cfg
    return replace(cfg, prepend_bos=bool(getattr(backend, "adds_bos", False)))


def window_protocol(cfg: PerplexityConfig, windows: torch.Tensor) -> dict[str, Any]:
    """How the windows were cut, and a hash of their tokens: results are compared only under one protocol
    (`cfg.prepend_bos` resolved: the protocol records whether BOS was prepended, never "the default")."""
    if cfg.prepend_bos is None:
        raise ValueError("window_protocol: prepend_bos must be resolved first (resolve_bos)")
    return {
        "text": "read as one string, tokenized without special tokens",
        "windows": "non-overlapping, first token of each window is context only",
        **{k: v for k, v in asdict(cfg).items() if k != "batch_size"},
        "requested_windows": cfg.windows,
        "tokens_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
    }


def score_text(backend, text: str, cfg: PerplexityConfig, *, dataset: str,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """A text task's result: perplexity, or what the backend scores a text by instead (`backend.score_text`: an
    encoder without a language-model head has no token probabilities, eval.embedding)."""
    own = getattr(backend, "score_text", None)
    if own is not None:
        return own(text, cfg, dataset=dataset, progress=progress)
    return compute_perplexity(backend, text, cfg, dataset=dataset, progress=progress)


def _exp(x: float) -> float | None:
    """exp(x), or None where it overflows a float (kept out of the JSON as a number)."""
    try:
        return math.exp(x)
    except OverflowError:
        return None


@register_task("wikitext2", config=PerplexityConfig)
def wikitext2(backend, cfg: PerplexityConfig = PerplexityConfig(), *, progress=None) -> dict[str, Any]:
    """WikiText-2 raw test split perplexity (DESIGN.md protocol)."""
    text = wikitext2_path("test").read_text(encoding="utf-8")
    return score_text(backend, text, cfg, dataset="wikitext2", progress=progress)


def _read_text_task(path: str) -> str:
    from compress.data import read_source_text

    if not path:
        raise ValueError("task text needs a path: --task text:PATH")
    text = read_source_text(str(Path(path)) if ".jsonl:" not in path else path)
    if not text.strip():
        raise ValueError(f"task text:{path}: the text is empty")
    return text


@register_task("text", config=PerplexityConfig, check=_read_text_task)
def text_file(backend, cfg: PerplexityConfig = PerplexityConfig(), *, path: str, progress=None) -> dict[str, Any]:
    """Perplexity of a user text file, or a JSONL field as `FILE.jsonl:FIELD` (`--task text:PATH`)."""
    text = _read_text_task(path)
    return score_text(backend, text, cfg, dataset=f"text:{path}", progress=progress)
