"""The GGUF tokenizer fields of a model's (GPT-2 style byte-level BPE) tokenizer (see `export.gguf`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.models import LoadedModel

PRE_TOKENIZERS = {"bytelevel-regex": "gpt-2"}
# a Split by one of these regexes, then byte-level without its own regex -> llama.cpp's pre-tokenizer name
SPLIT_REGEXES = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "qwen2",
}


def tokenizer_fields(lm: LoadedModel, n_vocab: int, tmp: Path) -> dict[str, Any]:
    """Token list, types, merges, special ids and the pre-tokenizer, from the model's fast tokenizer."""
    import gguf

    tok = lm.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ValueError("GGUF export needs a fast (tokenizer.json) tokenizer")
    tok.save_pretrained(tmp)
    spec = json.loads((tmp / "tokenizer.json").read_text())
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers; this one is "
                         f"{spec.get('model', {}).get('type')!r}")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    n_tok = len(tok)
    if n_tok > n_vocab:
        raise ValueError(f"the tokenizer has {n_tok} tokens but the embedding only {n_vocab} rows")
    special = set(tok.all_special_ids)
    added = {i for i in tok.get_added_vocab().values()}
    tokens, types = [], []
    for i, t in enumerate(tok.convert_ids_to_tokens(list(range(n_tok)))):
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    for i in range(n_tok, n_vocab):  # embedding rows beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = gguf.SpecialVocab(tmp, load_merges=True).merges
    if not merges:
        raise ValueError("GGUF export: the tokenizer has no BPE merges")
    from eval.backends import tokenizer_adds_bos

    gen = getattr(lm.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(lm.model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        eos = tok.eos_token_id
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges, "bos": tok.bos_token_id,
            "eos": eos, "unk": tok.unk_token_id, "pad": tok.pad_token_id, "add_bos": tokenizer_adds_bos(tok),
            "chat_template": getattr(tok, "chat_template", None)}


def _pre_tokenizer(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json (those we can identify), else refuse."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return PRE_TOKENIZERS["bytelevel-regex"]
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert") and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space")):
        name = SPLIT_REGEXES.get(parts[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise ValueError(f"GGUF export: cannot name llama.cpp's pre-tokenizer for {json.dumps(pre)[:200]}; "
                     "supported: byte-level with GPT-2's regex, Qwen2's split")
