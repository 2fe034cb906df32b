"""Scoring backends: every backend turns token sequences into per-token negative log-likelihoods.

Tasks (perplexity, multiple choice) talk only to this interface, so a torch
model in memory, a saved compressed artifact (loaded into torch) and, later,
an ONNX Runtime session or a GGUF file are scored the same way.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Backend(Protocol):
    name: str

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens."""

    def decode(self, ids: list[int]) -> str:
        """The text of token ids."""

    def token_nll(self, ids: torch.Tensor, *, bos: int | None = None) -> torch.Tensor:
        """ids (B, L) -> NLL (B, L-1) of ids[:, 1:] given their prefixes (float64).

        With `bos`, that token is prepended as unscored context.
        """


class TorchBackend:
    """A PyTorch causal LM (float or with QuantLinear modules) on one device."""

    name = "torch"

    def __init__(self, model: nn.Module, tokenizer: Any, *, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._cache: dict[str, list[int]] = {}

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        key = hashlib.sha1(text.encode()).hexdigest()
        if key not in self._cache:
            self._cache[key] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._cache[key]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @torch.inference_mode()
    def token_nll(self, ids: torch.Tensor, *, bos: int | None = None) -> torch.Tensor:
        ids = ids.to(self.device)
        inp = ids
        if bos is not None:
            inp = torch.cat([torch.full_like(ids[:, :1], bos), ids], dim=1)
        logits = self.model(input_ids=inp, use_cache=False).logits  # (B, L[+1], V)
        if bos is not None:
            logits = logits[:, 1:]
        logits = logits[:, :-1].float()  # predictions of ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return nll.view(ids.shape[0], -1).double().cpu()
