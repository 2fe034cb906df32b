"""Training text for distillation: tokenized once, packed into fixed-length sequences, read in a seeded order.

The order is a function of (seed, step) only: step s takes the global batch
at positions [s * B, (s + 1) * B) of the concatenation of per-epoch seeded
permutations. Resuming at step s therefore needs nothing but s, and any
number of processes reads the same global batch (each its own slice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.data import read_source_text


@dataclass(frozen=True)
class PackedText:
    """(n, seq_len) int64 training sequences and (m, seq_len) held-out ones, cut from one token stream."""

    train: torch.Tensor
    heldout: torch.Tensor
    tokens: int  # tokens in the source text

    def batch_indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Indices into `train` of global batch `step` (batch_size of them)."""
        n = self.train.shape[0]
        start = step * batch_size
        out = []
        while len(out) < batch_size:
            epoch, pos = divmod(start + len(out), n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            out.extend(perm[pos : pos + batch_size - len(out)].tolist())
        return torch.tensor(out, dtype=torch.long)


def pack_text(tokenizer, source: str, *, seq_len: int, heldout: int) -> PackedText:
    """Tokenize `source` (see `compress.data.read_source_text`) and cut it into non-overlapping sequences.

    The last `heldout` sequences are held out (for the periodic perplexity)
    and never trained on; the remainder after the last full sequence is
    dropped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(read_source_text(source), add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n < heldout + 1:
        raise ValueError(f"{source}: {ids.numel()} tokens make {n} sequences of {seq_len}; need more than "
                         f"{heldout} (held out) to train on")
    seqs = ids[: n * seq_len].view(n, seq_len)  # (n, seq_len)
    return PackedText(train=seqs[: n - heldout].clone(), heldout=seqs[n - heldout :].clone(), tokens=ids.numel())
