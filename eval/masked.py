"""Pseudo-perplexity of a masked language model (BERT, RoBERTa): how an encoder is scored.

Salazar, Liang, Nguyen, Kirchhoff, "Masked Language Model Scoring", ACL 2020,
https://arxiv.org/abs/1910.14659. Each token of a window is masked in turn and
scored by the model given every other token of the window; the pseudo-log-
likelihood is the sum of those log-probabilities and pseudo-perplexity is
exp(-PLL / tokens). It is not comparable with a causal model's perplexity
(hence its own metric name), but an encoder and its compressed artifacts are
compared on it exactly as decoders are on perplexity: same windows, the same
per-window records for the gate's paired test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from eval.backends import Request, TorchBackend, encoder_frame

ROWS_BYTES = 256 << 20  # logits of the masked copies computed per forward: at most this many bytes


class MaskedScoring:
    """Pseudo-log-likelihood scoring over any runtime: `token_nll` is the NLL of each token with it masked and the
    window's other tokens visible, the tokenizer's [CLS] / [SEP] around the window as unscored context. A backend
    supplies `tokenizer`, `device`, `max_positions` and `_mlm_logits(batch)` ((n, L') ids -> (n, L', vocab)
    logits); `_masked_init(vocab)` checks it."""

    metric = "pseudo_perplexity"
    adds_bos = False  # [CLS] / [SEP] frame every window instead
    tokenizer: Any
    device: torch.device
    max_positions: int | None

    def _masked_init(self, vocab: int) -> None:
        if self.tokenizer.mask_token_id is None:
            raise ValueError("pseudo-perplexity masks each token in turn: the tokenizer has no mask token")
        self.vocab = vocab
        # the window plus [CLS] and [SEP] must fit the position table
        self.max_positions = self.max_positions - 2 if self.max_positions else None

    @torch.inference_mode()
    def token_nll(self, ids: torch.Tensor, *, bos: int | None = None) -> torch.Tensor:
        """ids (B, L) -> NLL (B, L-1) of ids[:, 1:], each given the rest of its window (float64); like a causal
        model's, the first token is context only (so the windows score the same tokens)."""
        if bos is not None:
            raise ValueError("prepend_bos does not apply to a masked LM (its [CLS] and [SEP] are always added)")
        tok = self.tokenizer
        pre, post = encoder_frame(tok)
        B, L = ids.shape
        out = torch.empty(B, L - 1, dtype=torch.float64)
        chunk = max(1, ROWS_BYTES // (4 * (L + len(pre) + len(post)) * self.vocab))
        for b in range(B):
            row = torch.tensor(pre + ids[b].tolist() + post, device=self.device)  # (L',)
            for s in range(1, L, chunk):
                pos = torch.arange(s, min(s + chunk, L), device=self.device)  # window positions to score
                batch = row.repeat(len(pos), 1)  # (n, L'): one copy per scored position, that position masked
                batch[torch.arange(len(pos)), pos + len(pre)] = tok.mask_token_id
                picked = self._mlm_logits(batch)[torch.arange(len(pos)), pos + len(pre)].float()  # (n, V)
                out[b, s - 1 : s - 1 + len(pos)] = F.cross_entropy(picked, ids[b, pos].to(self.device),
                                                                    reduction="none").double().cpu()
        return out

    def loglikelihoods(self, requests: Sequence[Request],
                       progress: Callable[[int], None] | None = None) -> list[list[float]]:
        raise ValueError("multiple-choice tasks score continuations left to right, which a masked LM does not "
                         "do; score an encoder with --task wikitext2 (pseudo-perplexity) or --task text:PATH")


class MaskedLMBackend(MaskedScoring, TorchBackend):
    """A masked-LM encoder in torch."""

    name = "torch"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._masked_init(self.model.get_output_embeddings().weight.shape[0])

    def _mlm_logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch).logits
