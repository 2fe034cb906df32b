"""Multiple-choice tasks: MMLU (original CSV layout), ARC-Easy, and your own JSONL/CSV questions.

Two ways to score a question, both by log-likelihood:

- `letter` (MMLU's standard prompt, as lm-evaluation-harness's `mmlu`): the
  question and its lettered options, then "Answer:"; the model's choice is the
  letter (" A" .. " D") with the highest log-probability. One forward pass per
  question.
- `cloze` ("Question: ...\\nAnswer:" then each answer text, as lm-evaluation-
  harness's `mmlu_continuation` / `arc_easy`): the choice is the answer text
  with the highest log-likelihood per UTF-8 byte (`acc_norm`); the
  unnormalised choice (`acc`) is reported too. Small models that sit at chance
  with letters often score well above it this way.

Contexts are tokenized as one string and each continuation as the tokens that
`context + continuation` adds, as lm-evaluation-harness does; like it, a
prompt starts with the BOS token when the tokenizer adds one by default
(SmolLM2's does; `prepend_bos` overrides). k-shot prompts
take the first k questions of the few-shot pool (MMLU: the subject's dev file),
each followed by its answer, separated by blank lines; every question of a
subject shares that prefix, which the backend computes once.

Your own tasks (`--task mc:FILE.jsonl` or `.csv`): one question per line/row
with `question`, `choices` (JSONL: a list; CSV: columns `A`, `B`, ... in order)
and `answer` (0-based index or letter), optional `id` and `subject`. Task
types beyond these register like any task (`register_tasks` plugin hook).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from compress.checks import check_fields
from compress.data import arc_easy_path
from compress.registry import register_task
from eval.backends import Request, generic_loglikelihoods
from eval.questions import LETTERS, Question, mmlu_subjects, read_mmlu, read_questions  # noqa: F401
from eval.stats import wilson_ci

SCORINGS = ("letter", "cloze")


@dataclass(frozen=True, kw_only=True)
class MCConfig:
    scoring: Literal["letter", "cloze"] = "letter"  # compare answer letters, or answer texts (arc_easy's default)
    shots: int = 0  # few-shot examples before each question (MMLU: from the subject's dev file, at most 5)
    subjects: tuple[str, ...] = ()  # MMLU subjects to score; empty: all 57
    limit: int | None = None  # first N questions of each subject (of the file for other tasks)
    # BOS before each prompt; None: when the tokenizer adds one by default (as lm-evaluation-harness does)
    prepend_bos: bool | None = None

    def __post_init__(self) -> None:
        check_fields(self, positive=("limit",), choices={"scoring": SCORINGS})
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")


def _letter_text(q: Question) -> str:
    opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return f"{q.question.strip()}{opts}\nAnswer:"


def _cloze_text(q: Question) -> str:
    return f"Question: {q.question.strip()}\nAnswer:"


def _continuations(q: Question, scoring: str) -> list[str]:
    return [f" {LETTERS[i]}" for i in range(len(q.choices))] if scoring == "letter" else [f" {c}" for c in q.choices]


def build_prompt(q: Question, shots: list[Question], scoring: str, header: str) -> tuple[str, str]:
    """(shared prefix, full context) of a question: header, k solved examples, then the question."""
    body = _letter_text if scoring == "letter" else _cloze_text
    prefix = header + "".join(body(s) + _continuations(s, scoring)[s.answer] + "\n\n" for s in shots)
    return prefix, prefix + body(q)


def score(backend, questions: list[Question], pools: dict[str, list[Question]], headers: dict[str, str],
          cfg: MCConfig, *, task: str, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Score questions (each subject with its few-shot pool and header); accuracy, interval, per-item records."""
    t0 = time.perf_counter()
    bos_id = getattr(backend, "bos_token_id", None)
    use_bos = cfg.prepend_bos if cfg.prepend_bos is not None else bool(getattr(backend, "adds_bos", False))
    if use_bos and bos_id is None:
        raise ValueError(f"{task}: prepend_bos: the tokenizer has no BOS token")
    bos = [bos_id] if use_bos else []
    requests, texts = [], []
    for q in questions:
        pool = pools.get(q.subject, [])
        if len(pool) < cfg.shots:
            raise ValueError(f"{task}: {cfg.shots}-shot needs {cfg.shots} examples for {q.subject!r}, "
                             f"the pool has {len(pool)}")
        prefix, context = build_prompt(q, pool[: cfg.shots], cfg.scoring, headers.get(q.subject, ""))
        conts = _continuations(q, cfg.scoring)
        ctx = backend.encode(context)
        # each continuation is what tokenizing context + continuation adds to the context's tokens
        cont_ids = []
        for c in conts:
            whole = backend.encode(context + c)
            if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
                raise ValueError(f"{task}: {q.id}: continuation {c!r} does not tokenize after the context")
            cont_ids.append(tuple(whole[len(ctx):]))
        shared = _shared_len(bos + backend.encode(prefix), bos + ctx) if prefix or bos else 0
        requests.append(Request(tuple(bos + ctx), tuple(cont_ids), group=q.subject, shared=shared))
        texts.append(conts)
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress(task, done[0], len(requests))

    scorer = getattr(backend, "loglikelihoods", None)
    lls = scorer(requests, step) if scorer else generic_loglikelihoods(backend, requests, step)
    items, per_subject = [], defaultdict(list)
    for q, ll, conts in zip(questions, lls, texts, strict=True):
        raw = max(range(len(ll)), key=ll.__getitem__)
        norm = max(range(len(ll)), key=lambda i: ll[i] / max(len(conts[i].encode("utf-8")), 1))
        choice = raw if cfg.scoring == "letter" else norm
        items.append({"id": q.id, "subject": q.subject, "answer": q.answer, "choice": choice,
                      "correct": choice == q.answer, "choice_unnormalised": raw, "logprobs": ll})
        per_subject[q.subject].append(choice == q.answer)
    n = len(items)
    correct = sum(it["correct"] for it in items)
    lo, hi = wilson_ci(correct, n)
    subjects = {s: sum(v) / len(v) for s, v in sorted(per_subject.items())}
    return {
        "task": task,
        "metric": "accuracy",
        "value": correct / n,
        "ci95": [lo, hi],
        "accuracy": correct / n,
        "accuracy_macro": sum(subjects.values()) / len(subjects),
        "accuracy_unnormalised": sum(it["choice_unnormalised"] == it["answer"] for it in items) / n,
        "questions": n,
        "per_subject": subjects,
        "seconds": round(time.perf_counter() - t0, 2),
        "backend": backend.name,
        "protocol": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                     "prepend_bos": use_bos,
                     "prompt": ("question, lettered options, 'Answer:'; choice = best letter" if cfg.scoring == "letter"
                                else "'Question: ...\\nAnswer:'; choice = best log-likelihood per UTF-8 byte"),
                     "questions": n},
        "items": items,
    }


def _shared_len(prefix_ids: list[int], ctx: list[int]) -> int:
    """Tokens the context shares with its prefix's own tokenization (BPE may merge across the boundary)."""
    n = 0
    for a, b in zip(prefix_ids, ctx, strict=False):
        if a != b:
            break
        n += 1
    return min(n, len(ctx) - 1)  # at least one token of the context stays per request


@register_task("mmlu", config=MCConfig)
def mmlu(backend, cfg: MCConfig = MCConfig(), *, progress=None) -> dict[str, Any]:
    """MMLU (57 subjects, test split; dev as the few-shot pool), letter or cloze scoring."""
    known = mmlu_subjects()
    subjects = list(cfg.subjects) or known
    bad = [s for s in subjects if s not in known]
    if bad:
        raise ValueError(f"unknown MMLU subject(s) {', '.join(bad)}; known: {', '.join(known)}")
    if cfg.shots > 5:
        raise ValueError(f"MMLU's dev pool has 5 questions per subject; shots must be <= 5, got {cfg.shots}")
    questions, pools, headers = [], {}, {}
    for s in subjects:
        questions += read_mmlu("test", s)[: cfg.limit]
        pools[s] = read_mmlu("dev", s)
        what = "multiple choice questions (with answers)" if cfg.scoring == "letter" else "questions (with answers)"
        headers[s] = f"The following are {what} about {s.replace('_', ' ')}.\n\n"
    r = score(backend, questions, pools, headers, cfg, task="mmlu", progress=progress)
    r["protocol"]["data"] = "Hendrycks MMLU CSVs (test; dev few-shot pool), bundled"
    return r


# --- ARC-Easy and user files ----------------------------------------------------------------

@register_task("arc_easy", config=MCConfig)
def arc_easy(backend, cfg: MCConfig = MCConfig(scoring="cloze"), *, progress=None) -> dict[str, Any]:
    """ARC-Easy test (2,376 questions); cloze scoring as lm-evaluation-harness does it, or letters."""
    return _file_task(backend, arc_easy_path(), cfg, "arc_easy", progress)


@register_task("mc", config=MCConfig, check=lambda path: read_questions(_need_path(path)))
def user_mc(backend, cfg: MCConfig = MCConfig(), *, path: str = "", progress=None) -> dict[str, Any]:
    """Your multiple-choice questions: `--task mc:FILE.jsonl` (or .csv), schema in eval.multiple_choice."""
    return _file_task(backend, Path(_need_path(path)), cfg, f"mc:{path}", progress)


def _need_path(path: str) -> str:
    if not path:
        raise ValueError("task mc needs a file: --task mc:FILE.jsonl")
    return path


def _file_task(backend, path: Path, cfg: MCConfig, task: str, progress) -> dict[str, Any]:
    if cfg.subjects:
        raise ValueError(f"{task}: --subjects applies to MMLU only")
    qs = read_questions(path)
    if cfg.shots >= len(qs):
        raise ValueError(f"{task}: {cfg.shots}-shot leaves no question to score ({len(qs)} in the file)")
    # k-shot: the file's first k questions are the examples for every question, and are not scored
    shots, qs = qs[: cfg.shots], qs[cfg.shots:]
    pools = {s: shots for s in {q.subject for q in qs}}
    r = score(backend, qs[: cfg.limit], pools, {}, cfg, task=task, progress=progress)
    r["protocol"]["data"] = str(path.name)
    return r
