"""Distillation: losses, students made from their teacher, and the training loop (the `distill` pass)."""
