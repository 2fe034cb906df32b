"""Calibration sources: token windows drawn from the bundled WikiText-2 validation split or a user file.

Windows are contiguous `seq_len`-token slices of the tokenized text at random
offsets chosen by `seed`, the sampling GPTQ and AWQ use for C4/WikiText.
Calibration never reads the test split, which is reserved for evaluation.
A user file that is not UTF-8, or a JSONL line that is not a JSON object, is
refused as FILE:LINE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from compress.data import wikitext2_path
from compress.files import read_jsonl, read_text_file


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    source: str = "wikitext2"  # "wikitext2" (validation split), a .txt file, or FILE.jsonl:FIELD
    samples: int = 128  # number of windows
    seq_len: int = 512  # tokens per window
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError("calibration needs samples >= 1 and seq_len >= 2")


def read_text(source: str) -> str:
    """The raw text of a calibration source."""
    if source == "wikitext2":
        return wikitext2_path("validation").read_text(encoding="utf-8")
    path, _, field = source.partition(".jsonl:")
    if field:
        p = Path(path + ".jsonl")
        if not p.is_file():
            raise ValueError(f"calibration file not found: {p}")
        rows = []
        for line, row in read_jsonl(p):  # a line that is not a JSON object is refused as FILE:LINE
            if field not in row:
                raise ValueError(f"{p}:{line}: no field {field!r} (fields: {', '.join(row)})")
            if not isinstance(row[field], str):
                raise ValueError(f"{p}:{line}: field {field!r} is a {type(row[field]).__name__}, not text")
            rows.append(row[field])
        return "\n\n".join(rows)
    p = Path(source)
    if not p.is_file():
        raise ValueError(f"calibration source not found: {source!r} (use 'wikitext2', a text file or FILE.jsonl:FIELD)")
    return read_text_file(p)


def load_calibration(tokenizer, cfg: CalibConfig, *, text: str | None = None) -> torch.Tensor:
    """(samples, seq_len) int64 token windows; `text` is `read_text(cfg.source)` when already read."""
    if text is None:
        text = read_text(cfg.source)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() <= cfg.seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens; need more than seq_len={cfg.seq_len}")
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seq_len, (cfg.samples,), generator=g)
    return torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])
