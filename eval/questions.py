"""Multiple-choice question files: the bundled MMLU CSVs, and JSONL or CSV files in the documented schema
(see `eval.multiple_choice`). A malformed row is refused as FILE:LINE."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.data import mmlu_dir
from compress.files import read_jsonl, read_text_file

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Question:
    id: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int


def read_mmlu(split: str, subject: str) -> list[Question]:
    f = mmlu_dir() / split / f"{subject}_{split}.csv"
    out = []
    with open(f, encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if len(row) != 6 or row[5] not in "ABCD" or not row[5]:
                raise ValueError(f"{f}: row {i + 1} is not question,A,B,C,D,answer")
            out.append(Question(f"{subject}/{i}", subject, row[0], tuple(row[1:5]), "ABCD".index(row[5])))
    return out


def mmlu_subjects() -> list[str]:
    return sorted(p.name[: -len("_test.csv")] for p in (mmlu_dir() / "test").glob("*_test.csv"))


def _from_record(rec: dict[str, Any], i: int, where: str) -> Question:
    """Question `i` (0-based, its default id) of a file; `where` is FILE:LINE for the errors."""
    q = rec.get("question", rec.get("prompt"))
    choices = rec.get("choices")
    ans = rec.get("answer", rec.get("answer_idx"))
    if not isinstance(q, str) or not isinstance(choices, list) or len(choices) < 2 or ans is None:
        raise ValueError(f"{where}: item {i + 1} needs 'question' (text), 'choices' (a list of >= 2) and 'answer'")
    if isinstance(ans, bool) or not isinstance(ans, int | str):
        raise ValueError(f"{where}: item {i + 1}: answer {ans!r} is neither an index nor a choice letter")
    if isinstance(ans, str) and not ans.isdigit():
        if ans not in LETTERS[: len(choices)]:
            raise ValueError(f"{where}: item {i + 1}: answer {ans!r} is not one of the choice letters")
        ans = LETTERS.index(ans)
    ans = int(ans)
    if not 0 <= ans < len(choices):
        raise ValueError(f"{where}: item {i + 1}: answer index {ans} is out of range for {len(choices)} choices")
    return Question(str(rec.get("id", i)), str(rec.get("subject", "")), q, tuple(map(str, choices)), ans)


def _read_csv(p: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) of each row of a question CSV; a header without the needed columns, or a row with
    another number of fields than the header, is refused as FILE:LINE."""
    rows = csv.reader(io.StringIO(read_text_file(p, universal_newlines=False), newline=""))
    header = next(rows, None)
    if header is None:
        return []
    header = [h.strip() for h in header]
    if "question" not in header or "answer" not in header or not {"A", "B"} <= set(header):
        raise ValueError(f"{p}:1: the header has columns {', '.join(header)}; a question CSV needs question, "
                         "A, B (C, ... optional) and answer")
    out = []
    for row in rows:
        line = rows.line_num
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{p}:{line}: {len(row)} fields, the header has {len(header)} "
                             f"({', '.join(header)}); an unquoted comma in a question?")
        r = dict(zip(header, row, strict=True))
        out.append((line, {**r, "choices": [r[k] for k in LETTERS if r.get(k) not in (None, "")]}))
    return out


def read_questions(path: str | Path) -> list[Question]:
    """Questions of a JSONL or CSV file in the documented schema (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"multiple-choice file not found: {p}")
    if p.suffix == ".jsonl":
        recs = list(read_jsonl(p))  # a line that is not UTF-8 JSON, or not an object, is refused as FILE:LINE
    elif p.suffix == ".csv":
        recs = _read_csv(p)
    else:
        raise ValueError(f"{p}: expected a .jsonl or .csv file")
    if not recs:
        raise ValueError(f"{p}: no questions")
    return [_from_record(r, i, f"{p}:{line}") for i, (line, r) in enumerate(recs)]
