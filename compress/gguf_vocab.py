"""The tokenizer of a GGUF file, checked against the file's own vocabulary (and llama.cpp) before anything is
scored with it, and rebuilt where transformers reads it wrongly.

A GGUF carries its tokenizer as data: `tokenizer.ggml.model` ("llama": a
SentencePiece-style vocabulary whose merges are implied by the token scores;
"gpt2": byte-level BPE with explicit merges), the tokens, scores and types.
transformers turns that into a Hugging Face tokenizer, and for some
SentencePiece vocabularies gets it wrong (merges recovered in another order
than the scores give: "The quick brown fox" -> `The ▁qu ick ▁b ro wn ▁f ox`),
after which every perplexity is computed on the wrong tokens. So:

1. Sample texts are tokenized by transformers' tokenizer and by a reference:
   for a "llama" vocabulary, llama.cpp's SentencePiece algorithm written here
   from the file's tokens and scores (`spm_tokenize`); and by llama.cpp itself
   when llama-cpp-python is installed (any vocabulary type).
2. If they agree, the tokenizer is used as it is. If not, a "llama"
   vocabulary is rebuilt as a BPE tokenizer whose merges follow the scores
   (`spm_tokenizer`), checked again, and used with a warning; anything else is
   refused in one line: never score on wrong tokens.

llama.cpp's SentencePiece tokenization (llm_tokenizer_spm): a space before
the text (when `add_space_prefix`), spaces written as U+2581, the text split
into characters, then repeatedly the adjacent pair whose concatenation is the
highest-scoring token is merged (ties: the leftmost pair); a piece that is no
token is written as its UTF-8 bytes' `<0xXX>` tokens.
"""

from __future__ import annotations

import heapq
import logging
from pathlib import Path
from typing import Any

from eval.backends import tokenizer_adds_bos

log = logging.getLogger(__name__)

SPACE = "\u2581"
SAMPLES = (
    "The quick brown fox jumps over the lazy dog.",
    " Leading space, double  spaces and a tab\there.\nNew line: 1234567 + 89 = 1234656!",
    "Ünïcödé façade, naïve café; 東京 and emoji 🙂 end",
    "Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role",
)


def read_vocab(path: str | Path) -> dict[str, Any]:
    """The file's tokenizer fields: model type, tokens, scores, token types, add_space_prefix, merges."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def field(key: str, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    return {"model": field("tokenizer.ggml.model"), "tokens": field("tokenizer.ggml.tokens", []),
            "scores": field("tokenizer.ggml.scores"), "types": field("tokenizer.ggml.token_type"),
            "add_space_prefix": bool(field("tokenizer.ggml.add_space_prefix", True)),
            "merges": field("tokenizer.ggml.merges")}


def spm_tokenize(text: str, vocab: dict[str, Any]) -> list[int]:
    """llama.cpp's SentencePiece ("llama" vocabulary) tokenization of `text`, no BOS."""
    ids = vocab.setdefault("_ids", {t: i for i, t in enumerate(vocab["tokens"])})
    scores = vocab["scores"]
    text = (" " + text if vocab["add_space_prefix"] else text).replace(" ", SPACE)
    syms = list(text)
    if not syms:
        return []
    prev = list(range(-1, len(syms) - 1))
    nxt = list(range(1, len(syms) + 1))
    nxt[-1] = -1
    heap: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        merged = syms[left] + syms[right]
        if merged in ids:
            heapq.heappush(heap, (-float(scores[ids[merged]]), left, right, merged))

    for i in range(len(syms) - 1):
        push(i, i + 1)
    while heap:
        _, left, right, merged = heapq.heappop(heap)
        if syms[left] + syms[right] != merged or nxt[left] != right:  # stale: a side merged since
            continue
        syms[left], syms[right] = merged, ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        push(prev[left], left)
        push(left, nxt[left])
    out: list[int] = []
    i = 0
    while i >= 0:
        piece = syms[i]
        if piece in ids:
            out.append(ids[piece])
        else:  # byte fallback
            for b in piece.encode("utf-8"):
                out.append(ids.get(f"<0x{b:02X}>", ids.get("<unk>", 0)))
        i = nxt[i]
    return out


def spm_tokenizer(vocab: dict[str, Any], special: dict[str, Any], *, bos: bool = False):
    """A Hugging Face fast tokenizer computing `spm_tokenize`: BPE whose merges are every split of a token into
    two tokens, ranked by the merged token's score (llama.cpp's order), byte fallback, the space handling;
    with `bos`, BOS before every text by default (as the tokenizer it replaces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens, scores = vocab["tokens"], vocab["scores"]
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t in sorted(ids, key=lambda t: (-float(scores[ids[t]]), ids[t])):
        merges += [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
    bpe = models.BPE(vocab=ids, merges=merges, byte_fallback=True, fuse_unk=True,
                     unk_token="<unk>" if "<unk>" in ids else None)
    tk = Tokenizer(bpe)
    norm = [normalizers.Replace(" ", SPACE)]
    if vocab["add_space_prefix"]:
        norm.insert(0, normalizers.Prepend(SPACE))
    tk.normalizer = normalizers.Sequence(norm)
    tk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    *([decoders.Strip(" ", 1, 0)] if vocab["add_space_prefix"] else [])])
    if bos and special.get("bos_token") in ids:
        tk.post_processor = processors.TemplateProcessing(single=f"{special['bos_token']} $A",
                                                          special_tokens=[(special["bos_token"],
                                                                           ids[special["bos_token"]])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **special)
    control = [t for t, ty in zip(tokens, vocab["types"] or (), strict=False) if ty == 3]  # 3: CONTROL
    if control:
        tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    return tok


def _llama_cpp_tokenize(path: Path):
    """A function text -> llama.cpp's token ids (no BOS, no special parsing), or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    try:
        ll = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    except Exception as e:  # noqa: BLE001  (its loader raises ValueError/RuntimeError for files it cannot read)
        log.info("llama.cpp could not read the vocabulary of %s (%s): not compared with it", path, e)
        return None
    return lambda text: list(ll.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def first_difference(tok, reference, samples=SAMPLES) -> str | None:
    """The first sample on which `tok` and the reference tokenization differ, shown as tokens; None if none."""
    for text in samples:
        got, want = tok(text, add_special_tokens=False).input_ids, reference(text)
        if got != want:
            show = lambda ids: " ".join(tok.convert_ids_to_tokens(ids[:12]))  # noqa: E731
            return f"{text[:40]!r}: {show(got)} ... instead of {show(want)} ..."
    return None


def checked_tokenizer(path: str | Path, tok):
    """`tok` (transformers' reading of the GGUF at `path`) if it tokenizes as the file says, else the rebuilt
    SentencePiece tokenizer (warned), else a ValueError naming the difference."""
    path = Path(path)
    vocab = read_vocab(path)
    references = []
    if vocab["model"] == "llama" and vocab["scores"] is not None:
        references.append(("the file's SentencePiece scores", lambda text: spm_tokenize(text, vocab)))
    if (ll := _llama_cpp_tokenize(path)) is not None:
        references.append(("llama.cpp", ll))
    wrong = [(name, why) for name, ref in references if (why := first_difference(tok, ref)) is not None]
    if not wrong:
        return tok
    name, why = wrong[0]
    if vocab["model"] == "llama" and vocab["scores"] is not None:
        special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if getattr(tok, k, None) is not None}
        fixed = spm_tokenizer(vocab, special, bos=tokenizer_adds_bos(tok))
        fixed.chat_template = getattr(tok, "chat_template", None)
        still = [(n, w) for n, ref in references if (w := first_difference(fixed, ref)) is not None]
        if not still:
            log.warning("%s: transformers reads this file's tokenizer wrongly (%s, against %s); using a tokenizer "
                        "rebuilt from the file's vocabulary and scores", path, why, name)
            return fixed
        name, why = still[0]
    raise ValueError(f"{path}: the tokenizer transformers builds from this file does not tokenize as the file says "
                     f"({why}, against {name}); nothing is scored on wrong tokens: use the model's directory with "
                     "its tokenizer.json instead")
