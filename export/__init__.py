"""Exporters: write an artifact in a runtime's format (safetensors, ONNX, GGUF), each checked in its runtime."""

from __future__ import annotations

VERIFY_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "In 1905, Albert Einstein published")


def reference_logits(lm):
    """For each check prompt: (text, token ids without special tokens, the torch model's float32 logits (L, V))."""
    import torch

    out = []
    for text in VERIFY_PROMPTS:
        ids = lm.tokenizer(text, add_special_tokens=False).input_ids
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        out.append((text, ids, logits))
    return out
