"""Tiny random models of two architecture families (Llama and OPT), built offline.

Both share one small byte-level BPE tokenizer trained here on a slice of the
bundled WikiText-2 validation text, so no hub access is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress.data import wikitext2_path
from compress.plugins import load_plugins

load_plugins()  # what the CLI and the runner do at start-up: recipes in tests name passes directly

HIDDEN = 64


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = wikitext2_path("validation").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _config(arch: str, vocab: int):
    from transformers import LlamaConfig, OPTConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, ffn_dim=160, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=HIDDEN,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    raise ValueError(arch)


def make_model(arch: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tokenizer)))
    with torch.no_grad():  # larger-than-init weights so quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "opt"])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """arch -> directory holding a saved tiny model (safetensors) and tokenizer."""
    out = {}
    for a in ("llama", "opt"):
        d = tmp_path_factory.mktemp(f"tiny-{a}")
        make_model(a, tiny_tokenizer).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        out[a] = d
    return out


@pytest.fixture
def model_dir(model_dirs, arch) -> Path:
    return model_dirs[arch]


@pytest.fixture
def tokens(tiny_tokenizer) -> torch.Tensor:
    text = wikitext2_path("test").read_text(encoding="utf-8")[:4000]
    return torch.tensor([tiny_tokenizer(text).input_ids[:96]])


@pytest.fixture
def make_tiny(tiny_tokenizer):
    """Factory: make_tiny(arch, seed=0) -> a fresh tiny random model."""
    return lambda arch, seed=0: make_model(arch, tiny_tokenizer, seed)


@pytest.fixture
def make_adapter():
    """Factory: make_adapter(base, path, seed=1, std=0.05, **LoraConfig fields) saves a PEFT adapter for `base` with
    random non-zero factors (normal, `std`) (and perturbed DoRA magnitudes) on q/v/down_proj; returns peft's merged model."""
    import copy

    from peft import LoraConfig, get_peft_model

    def make(base, path, *, seed=1, std=0.05, **lora):
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                                                    **lora))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.normal_(0, std)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.randn_like(p))
        peft_model.save_pretrained(path)
        return peft_model.merge_and_unload()

    return make
