"""Slow: a LoRA adapter trained for a few steps on the reference model merges to the same logits."""

import pytest
import torch

from compress.data import wikitext2_path
from compress.models import load_model
from compress.pipeline import apply
from compress.recipe import Recipe

pytestmark = pytest.mark.slow


def test_trained_adapter_merges_to_the_same_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    lm = load_model()
    text = wikitext2_path("validation").read_text(encoding="utf-8")[:20_000]
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False).input_ids[: 4 * 128]).view(4, 128)
    test = torch.tensor(lm.tokenizer(wikitext2_path("test").read_text(encoding="utf-8")[:5_000],
                                     add_special_tokens=False).input_ids[:96])[None]
    torch.manual_seed(0)
    peft_model = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    peft_model.train()
    for step in range(4):  # a few steps on a small text: B moves away from its zero init
        batch = ids[step % 2 * 2:(step % 2 + 1) * 2]
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        adapted = peft_model(input_ids=test).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=test).logits
    assert float((adapted - plain).abs().max()) > 1e-2  # the adapter matters

    base = load_model().model
    # a float base: nothing is re-quantized, so no calibration data is needed
    (report,) = apply(base, Recipe.single("lora_merge", adapters=[str(tmp_path / "adapter")]))
    assert report.modules == 2 * base.config.num_hidden_layers
    with torch.no_grad():
        merged = base(input_ids=test).logits
    assert float((merged - adapted).abs().max()) <= 1e-4
