import json
import random

import pytest

from eval.backends import Request, TorchBackend, generic_loglikelihoods
from eval.multiple_choice import (
    MCConfig,
    Question,
    build_prompt,
    mmlu,
    read_questions,
    score,
    user_mc,
)


def _requests(vocab, seed=0):
    rnd = random.Random(seed)
    prefix = [rnd.randrange(vocab) for _ in range(7)]
    reqs = []
    for i in range(9):
        shared = prefix if i % 3 else []  # some requests share a prefix, some do not
        n = rnd.choice([3, 5, 5])  # equal lengths batch together
        ctx = tuple(shared + [rnd.randrange(vocab) for _ in range(n)])
        single = i % 2 == 0
        conts = tuple(tuple(rnd.randrange(vocab) for _ in range(1 if single else rnd.randint(1, 4)))
                      for _ in range(4))
        reqs.append(Request(ctx, conts, group="p" if shared else "", shared=len(shared)))
    return reqs


def test_cached_batched_scoring_equals_one_sequence_at_a_time(make_tiny, tiny_tokenizer, arch):
    backend = TorchBackend(make_tiny(arch), tiny_tokenizer, batch_size=4)
    reqs = _requests(len(tiny_tokenizer))
    seen = []
    fast = backend.loglikelihoods(reqs, seen.append)
    slow = generic_loglikelihoods(backend, reqs)
    assert sum(seen) == len(reqs)
    for f, s in zip(fast, slow, strict=True):
        assert f == pytest.approx(s, rel=1e-4, abs=1e-4)


class _Oracle:
    """Letter scoring: the right letter gets the highest log-probability; cloze: the longest text wins raw."""

    name = "oracle"

    def __init__(self, answers):
        self.answers = answers

    def encode(self, text):
        return list(text.encode())

    def loglikelihoods(self, requests, progress=None):
        out = []
        for r, a in zip(requests, self.answers, strict=True):
            out.append([(-1.0 if i == a else -5.0) * len(c) for i, c in enumerate(r.continuations)])
        return out


def test_choices_accuracy_and_records():
    qs = [Question(f"q{i}", "s", f"What is {i}?", ("a", "bb", "ccc", "dddd"), i % 4) for i in range(8)]
    answers = [q.answer if i < 6 else (q.answer + 1) % 4 for i, q in enumerate(qs)]
    r = score(_Oracle(answers), qs, {}, {}, MCConfig(scoring="letter"), task="t")
    assert r["metric"] == "accuracy" and r["value"] == pytest.approx(6 / 8) and r["questions"] == 8
    assert [it["correct"] for it in r["items"]] == [True] * 6 + [False] * 2
    assert r["ci95"][0] < 0.75 < r["ci95"][1] and r["per_subject"] == {"s": 0.75}
    # cloze: per-byte normalisation picks the oracle's answer; raw sums favour short texts here
    r = score(_Oracle(answers), qs, {}, {}, MCConfig(scoring="cloze"), task="t")
    assert r["value"] == pytest.approx(6 / 8)


def test_prompts_follow_the_standard_layout():
    q = Question("x", "anatomy", " What is it? ", ("one", "two", "three", "four"), 2)
    shot = Question("d", "anatomy", "Shot?", ("a", "b", "c", "d"), 1)
    prefix, ctx = build_prompt(q, [shot], "letter", "The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert ctx == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                   "Shot?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                   "What is it?\nA. one\nB. two\nC. three\nD. four\nAnswer:")
    assert ctx.startswith(prefix) and prefix.endswith("Answer: B\n\n")
    _, cloze = build_prompt(q, [shot], "cloze", "")
    assert cloze == "Question: Shot?\nAnswer: b\n\nQuestion: What is it?\nAnswer:"


@pytest.mark.parametrize("scoring,shots", [("letter", 0), ("letter", 2), ("cloze", 1)])
def test_mmlu_on_a_tiny_model(make_tiny, tiny_tokenizer, scoring, shots):
    backend = TorchBackend(make_tiny("llama"), tiny_tokenizer)
    cfg = MCConfig(scoring=scoring, shots=shots, subjects=("anatomy", "virology"), limit=3)
    r = mmlu(backend, cfg)
    assert r["questions"] == 6 and set(r["per_subject"]) == {"anatomy", "virology"}
    assert [it["id"] for it in r["items"]][:3] == ["anatomy/0", "anatomy/1", "anatomy/2"]
    assert all(len(it["logprobs"]) == 4 and max(it["logprobs"]) < 0 for it in r["items"])
    assert r["protocol"]["shots"] == shots and r["protocol"]["scoring"] == scoring
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        mmlu(backend, MCConfig(subjects=("astrology",)))


def test_user_files_schema_and_errors(tmp_path, make_tiny, tiny_tokenizer):
    rows = [{"id": "a", "question": "Sky colour?", "choices": ["blue", "green"], "answer": 0},
            {"question": "Two plus two?", "choices": ["three", "four", "five"], "answer": "B"}]
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    qs = read_questions(f)
    assert [q.answer for q in qs] == [0, 1] and qs[1].id == "1" and len(qs[1].choices) == 3
    c = tmp_path / "q.csv"
    c.write_text("question,A,B,C,answer\nSky colour?,blue,green,,A\n")
    assert read_questions(c)[0].choices == ("blue", "green")
    r = user_mc(TorchBackend(make_tiny("opt"), tiny_tokenizer), MCConfig(scoring="cloze"), path=str(f))
    assert r["questions"] == 2 and r["task"] == f"mc:{f}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["x", "y"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match="out of range"):
        read_questions(bad)
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="needs 'question'"):
        read_questions(bad)
    with pytest.raises(ValueError, match="not found"):
        read_questions(tmp_path / "none.jsonl")


def test_config_validation():
    with pytest.raises(ValueError, match="scoring"):
        MCConfig(scoring="guess")
    with pytest.raises(ValueError, match="shots"):
        MCConfig(shots=-1)
    with pytest.raises(ValueError, match="limit"):
        MCConfig(limit=0)


def test_bos_follows_the_tokenizer_default_unless_set(make_tiny, tiny_tokenizer):
    """As lm-evaluation-harness: a prompt starts with BOS when the tokenizer adds one by default."""

    class Recording(TorchBackend):
        def loglikelihoods(self, requests, progress=None):
            self.seen = requests
            return super().loglikelihoods(requests, progress)

    backend = Recording(make_tiny("llama"), tiny_tokenizer)
    bos = tiny_tokenizer.bos_token_id
    cfg = MCConfig(subjects=("anatomy",), limit=2)
    assert not backend.adds_bos  # this tokenizer has no post-processor
    r = mmlu(backend, cfg)
    assert r["protocol"]["prepend_bos"] is False and all(q.context[0] != bos for q in backend.seen)
    r2 = mmlu(backend, MCConfig(subjects=("anatomy",), limit=2, prepend_bos=True))
    assert r2["protocol"]["prepend_bos"] is True and all(q.context[0] == bos for q in backend.seen)
    assert r2["items"][0]["logprobs"] != r["items"][0]["logprobs"]
    type(backend).adds_bos = property(lambda self: True)  # a tokenizer such as SmolLM2's
    assert mmlu(backend, cfg)["protocol"]["prepend_bos"] is True and backend.seen[0].context[0] == bos
