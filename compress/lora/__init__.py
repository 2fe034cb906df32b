"""LoRA merging: PEFT adapters folded into a float or quantized base, one adapter or several (linear, TIES)."""
