"""Data files shipped with the package (see each folder's README for source and licence)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent


def wikitext2_path(split: str) -> Path:
    """WikiText-2 raw: 'test' (evaluation) or 'validation' (calibration)."""
    files = {"test": "wiki.test.raw", "validation": "wiki.valid.raw"}
    if split not in files:
        raise ValueError(f"wikitext2 split must be one of {', '.join(files)}, got {split!r}")
    return _HERE / "wikitext-2-raw" / files[split]


def mmlu_dir() -> Path:
    """MMLU in the original layout: dev/<subject>_dev.csv, test/<subject>_test.csv."""
    return _HERE / "mmlu"


def arc_easy_path() -> Path:
    """ARC-Easy test questions (JSONL: id, prompt, choices, answer_idx)."""
    return _HERE / "arc_easy" / "arc_easy_test.jsonl"
