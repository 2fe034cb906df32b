"""Data files shipped with the package (see each folder's README for source and licence)."""

from __future__ import annotations

from pathlib import Path

from compress.files import read_jsonl, read_text_file

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


def read_source_text(source: str) -> str:
    """The raw text of a text source: "wikitext2" (the bundled validation split), a UTF-8 text file, or
    FILE.jsonl:FIELD (that field of every line; a line that is not a JSON object is refused as FILE:LINE)."""
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
