"""A GGUF's SentencePiece tokenizer is checked against the file's own vocabulary and scores (llama.cpp's
algorithm, and llama.cpp itself when installed) and rebuilt where transformers reads it wrongly."""

from __future__ import annotations

import logging

import pytest

gguf = pytest.importorskip("gguf")

from compress.gguf_vocab import checked_tokenizer, read_vocab, spm_tokenize  # noqa: E402

LETTERS = list("abcdefghijklmnopqrstuvwxyz.,'")


def write_spm_gguf(path, arch: str, merged: list[tuple[str, float]], *, add_space_prefix: bool = True):
    """A GGUF holding only a SentencePiece vocabulary: control tokens, the 256 byte tokens, single characters
    and `merged` pieces with their scores, in the order given (a file's order need not be its scores')."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", *LETTERS]
    types = [2, 3, 3] + [6] * 256 + [1] * (1 + len(LETTERS))  # unknown, control, byte, normal
    scores = [0.0] * 3 + [0.0] * 256 + [-1000.0 - i for i in range(1 + len(LETTERS))]
    for t, s in merged:
        tokens.append(t)
        types.append(1)
        scores.append(s)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_block_count(1)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(add_space_prefix)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for f in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        f()
    w.close()
    return path


# pieces listed in an order their scores do not follow: read in file order (as transformers reads Gemma
# vocabularies) "quick" becomes "qu" + "ick" ("ck" merges first), by the scores "qui" + "ck" ("qu", then "qui")
MERGED = [("ck", -9.0), ("ic", -8.0), ("ick", -7.0), ("qu", -6.0), ("qui", -2.0), ("\u2581q", -5.0),
          ("\u2581quick", -1.0), ("ro", -4.0), ("wn", -3.5), ("own", -3.0), ("row", -2.5), ("\u2581b", -2.4)]


def _hf_reading(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_spm_reference_follows_the_scores(tmp_path):
    vocab = read_vocab(write_spm_gguf(tmp_path / "v.gguf", "llama", MERGED))
    toks = vocab["tokens"]
    # worked by hand: ▁q (-5) first, so "qu" never forms; i+c, then ic+k; ▁b, w+n, o+wn ("row" never forms)
    assert [toks[i] for i in spm_tokenize("quick brown", vocab)] == ["\u2581q", "u", "ick", "\u2581b", "r", "own"]
    # a character outside the vocabulary: its UTF-8 bytes
    assert [toks[i] for i in spm_tokenize("é", vocab)] == ["\u2581", "<0xC3>", "<0xA9>"]


def test_a_vocabulary_read_wrongly_is_rebuilt_and_then_tokenizes_as_the_file_says(tmp_path, caplog):
    path = write_spm_gguf(tmp_path / "gemma.gguf", "gemma3", MERGED, add_space_prefix=False)
    vocab = read_vocab(path)
    hf = _hf_reading(path)
    text = "quick brown"
    want = spm_tokenize(text, vocab)
    assert [vocab["tokens"][i] for i in want][:2] == ["qui", "ck"]
    if hf(text, add_special_tokens=False).input_ids == want:
        pytest.skip("this transformers reads the vocabulary right; nothing to repair")
    with caplog.at_level(logging.WARNING):
        tok = checked_tokenizer(path, hf)
    assert any("reads this file's tokenizer wrongly" in r.getMessage() for r in caplog.records)
    for sample in (text, "quick, quicker. brown own row", "a b  c"):
        assert tok(sample, add_special_tokens=False).input_ids == spm_tokenize(sample, vocab)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_a_vocabulary_read_right_is_kept(model_dirs, tmp_path, caplog):
    """A byte-level BPE file (our GGUF export of the tiny model): transformers' reading agrees with llama.cpp
    (when installed), so it is used as it is, without a word."""
    from click.testing import CliRunner

    from compress.cli import cli

    r = CliRunner().invoke(cli, ["export", str(model_dirs["llama"]), "--format", "gguf", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    path = tmp_path / "g" / "model.gguf"
    assert read_vocab(path)["model"] == "gpt2"
    hf = _hf_reading(path)
    with caplog.at_level(logging.WARNING):
        assert checked_tokenizer(path, hf) is hf
    assert not [r for r in caplog.records if "tokenizer" in r.getMessage()]


def test_leading_spaces_follow_llama_cpp(tmp_path):
    """llama.cpp puts its space prefix before a text that already starts with a space ("▁▁Leading");
    transformers' Metaspace reading writes one: the check notices, the rebuilt tokenizer agrees."""
    path = write_spm_gguf(tmp_path / "llama.gguf", "llama", sorted(MERGED, key=lambda m: -m[1]))
    vocab = read_vocab(path)
    tok = checked_tokenizer(path, _hf_reading(path))
    for text in (" quick", "  brown own", "quick  brown "):
        assert tok(text, add_special_tokens=False).input_ids == spm_tokenize(text, vocab)


def test_the_reference_is_llama_cpps_own_tokenization(tmp_path):
    """Where llama-cpp-python is installed, spm_tokenize gives llama.cpp's ids on varied text."""
    from compress.gguf_vocab import SAMPLES, _llama_cpp_tokenize

    for arch, prefix in (("llama", True), ("gemma3", False)):
        path = write_spm_gguf(tmp_path / f"{arch}.gguf", arch, MERGED, add_space_prefix=prefix)
        ll = _llama_cpp_tokenize(path)
        if ll is None:
            pytest.skip("llama-cpp-python is not installed (or cannot read a vocabulary-only file)")
        vocab = read_vocab(path)
        for text in (*SAMPLES, "quick brown", "  quick  ", "quicker, brown own row"):
            assert spm_tokenize(text, vocab) == ll(text), (arch, text)
