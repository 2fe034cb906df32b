"""Embedding fidelity of an encoder without a masked-LM head (a bare BertModel): how it is scored.

A bare encoder computes hidden states, not token probabilities, so neither
perplexity nor pseudo-perplexity applies; what its users take from it is a
sentence embedding, most often the attention-mask-weighted mean of the last
hidden states (mean pooling: Reimers and Gurevych, "Sentence-BERT", EMNLP 2019,
https://arxiv.org/abs/1908.10084). A compressed encoder is scored by the cosine
between its mean-pooled embedding of each evaluation window and the float
reference model's, averaged over the windows (metric `embedding_cosine`,
higher is better, 1 for a model that computes the reference's embeddings).
The windows are the perplexity protocol's (`eval.perplexity.text_windows`), each
framed by [CLS] / [SEP] as the masked-LM backend frames it; every position the
model sees is pooled, [CLS] and [SEP] included, as mean pooling does (its
attention mask covers them). The per-window cosines are the items the gate
compares pairwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.archs import UnsupportedModel, is_bare_encoder
from compress.models import load_model
from eval.backends import Request, TorchBackend, encoder_frame
from eval.perplexity import PerplexityConfig, resolve_bos, text_windows, window_protocol
from eval.results import weights_sha256
from eval.stats import mean_ci

METRIC = "embedding_cosine"
POOLING = "mean of the last hidden states over [CLS] + window + [SEP], attention-mask weighted"


@dataclass(frozen=True)
class Reference:
    """The float model whose embeddings the evaluated one should reproduce (`model` None: the evaluated model
    itself), and the identity recorded with the result (the sha256 goes into the protocol)."""

    model: nn.Module | None
    path: str
    sha256: str


def resolve_reference(lm, path: str | Path | None = None) -> Reference:
    """The reference of `lm` (a `LoadedModel`): `path` when given, else the model a compress artifact was made
    from (its provenance), else `lm` itself when it computes in float32. A reference that is missing, does not
    load, is not the recorded source, or does not match `lm` (tokenizer, hidden size) is refused in one line."""
    recorded = None
    if path is None and lm.provenance is None:
        if next(lm.model.parameters()).dtype == torch.float32:
            return Reference(None, lm.source, weights_sha256(lm))
        path = lm.source  # scored in a lower precision: against itself in float32
    if path is None:
        path, recorded = lm.provenance["source"]["path"], lm.provenance["source"]["sha256"]
    ref = _load_reference(path, given=recorded is None)
    sha = weights_sha256(ref)
    if recorded is not None and sha != recorded:
        raise UnsupportedModel(f"embedding reference {path}: not the model this artifact was made from (sha256 "
                               f"{sha[:12]}..., its compress.json records {recorded[:12]}...); pass --reference PATH "
                               "(the float model)")
    _check_compatible(lm, ref, path)
    return Reference(ref.model, str(path), sha)


def _load_reference(path: str | Path, *, given: bool):
    """The reference `LoadedModel` in float32; one line naming it when it cannot be had."""
    where = "" if given else " (the source recorded in the artifact's compress.json)"
    if not Path(path).exists():
        raise UnsupportedModel(f"embedding reference {path}{where} not found: embedding_cosine compares with the "
                               "float model; pass --reference PATH")
    try:
        return load_model(path)
    except ValueError as e:
        raise UnsupportedModel(f"embedding reference {path}{where} does not load: {e}") from None


def _check_compatible(lm, ref, path: str | Path) -> None:
    """The reference must embed the same tokens into the same space as the evaluated model."""
    if not is_bare_encoder(ref.model.config):
        raise UnsupportedModel(f"embedding reference {path} is a {type(ref.model).__name__}, not an encoder "
                               "without a head like the evaluated model")
    if ref.tokenizer.get_vocab() != lm.tokenizer.get_vocab() or (
            (ref.tokenizer.cls_token_id, ref.tokenizer.sep_token_id)
            != (lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id)):
        raise UnsupportedModel(f"embedding reference {path}: its tokenizer differs from the evaluated model's "
                               f"({len(ref.tokenizer)} vs {len(lm.tokenizer)} tokens, or other ids)")
    h_ref, h = ref.model.config.hidden_size, lm.model.config.hidden_size
    if h_ref != h:
        raise UnsupportedModel(f"embedding reference {path}: hidden size {h_ref}, the evaluated model's is {h}")


class EmbeddingBackend(TorchBackend):
    """A bare encoder in torch, scored against its reference by embedding cosine (`score_text`); token
    probabilities (perplexity, pseudo-perplexity, multiple choice) are refused."""

    metric = METRIC
    adds_bos = False  # [CLS] / [SEP] frame every window instead

    def __init__(self, model: nn.Module, tokenizer: Any, *, reference: Reference,
                 device: str | torch.device = "cpu", batch_size: int | None = None) -> None:
        super().__init__(model, tokenizer, device=device, batch_size=batch_size)
        self.reference = reference
        if reference.model is not None:
            reference.model.to(self.device).eval()
        # the window plus [CLS] and [SEP] must fit the position table
        self.max_positions = self.max_positions - 2 if self.max_positions else None

    def framed(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (B, L) -> (B, L') with the tokenizer's [CLS] before and [SEP] after each (those it has)."""
        tok = self.tokenizer
        pre, post = encoder_frame(tok)

        def edge(ids: list[int]) -> torch.Tensor:
            return torch.tensor(ids, dtype=windows.dtype).expand(windows.shape[0], -1)  # (B, 0 or 1)

        return torch.cat([edge(pre), windows, edge(post)], dim=1)

    @torch.inference_mode()
    def cosines(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (B, L) -> (B,) cosine of the evaluated and the reference model's pooled embeddings (float64)."""
        ids = self.framed(windows).to(self.device)  # (B, L')
        mask = torch.ones_like(ids)  # equal-length windows: no padding, every position pooled
        mine = mean_pooled(self.model, ids, mask)
        ref = mine if self.reference.model is None else mean_pooled(self.reference.model, ids, mask)
        # rounding can put the cosine of equal vectors a hair above 1
        return F.cosine_similarity(mine, ref, dim=-1).clamp(-1.0, 1.0).cpu()

    def score_text(self, text: str, cfg: PerplexityConfig, *, dataset: str,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
        return compute_embedding_cosine(self, text, cfg, dataset=dataset, progress=progress)

    def token_nll(self, ids: torch.Tensor, *, bos: int | None = None) -> torch.Tensor:
        raise UnsupportedModel(f"{type(self.model).__name__} has no masked-LM head: (pseudo-)perplexity needs its "
                               "token probabilities; a bare encoder is scored by embedding_cosine (--task "
                               "wikitext2 or text:PATH)")

    def loglikelihoods(self, requests: Sequence[Request],
                       progress: Callable[[int], None] | None = None) -> list[list[float]]:
        raise UnsupportedModel(f"multiple-choice tasks score continuations by their probabilities, and "
                               f"{type(self.model).__name__} is an encoder without a language-model head; score it "
                               "with --task wikitext2 or --task text:PATH (embedding_cosine)")


def mean_pooled(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids, mask (B, L) -> (B, H): the attention-mask-weighted mean of the last hidden states, in float64 (the
    cosine of two close embeddings is 1 minus a small number: float32 sums would blur it)."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.double()  # (B, L, H)
    weights = mask.unsqueeze(-1).double()  # (B, L, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def compute_embedding_cosine(backend: EmbeddingBackend, text: str, cfg: PerplexityConfig, *, dataset: str,
                             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Score `text`: mean embedding cosine to the reference with its 95 % interval, per-window records, protocol."""
    t0 = time.perf_counter()
    cfg = resolve_bos(backend, cfg)
    windows, available, bos = text_windows(backend, text, cfg, dataset=dataset)
    if bos is not None:
        raise ValueError("prepend_bos does not apply to an encoder (its [CLS] and [SEP] are always added)")
    n = windows.shape[0]
    cos = torch.empty(n, dtype=torch.float64)  # per window
    t_fwd = 0.0
    for i in range(0, n, cfg.batch_size):
        t = time.perf_counter()
        cos[i : i + cfg.batch_size] = backend.cosines(windows[i : i + cfg.batch_size])
        t_fwd += time.perf_counter() - t
        if progress:
            progress(dataset, min(i + cfg.batch_size, n), n)
    lo, hi = mean_ci(cos.numpy())
    value = float(cos.mean())
    ref = backend.reference
    return {
        "task": dataset,
        "metric": METRIC,
        "value": value,
        "ci95": [lo, hi],
        "embedding_cosine": value,
        "min_cosine": float(cos.min()),
        "tokens_scored": n * cfg.seq_len,
        "windows": n,
        "windows_available": available,
        "seconds": round(time.perf_counter() - t0, 2),
        "forward_seconds": round(t_fwd, 2),
        "backend": backend.name,
        "reference": {"path": ref.path, "sha256": ref.sha256, "itself": ref.model is None},
        "protocol": {**window_protocol(cfg, windows), "windows": "non-overlapping, every token of a window pooled",
                     "pooling": POOLING, "reference_sha256": ref.sha256},
        "items": [{"id": f"window {i}", "cosine": float(cos[i]), "tokens": cfg.seq_len} for i in range(n)],
    }
