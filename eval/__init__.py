"""Eval: score a model or artifact on perplexity and multiple-choice tasks through one backend interface."""

from eval.backends import TorchBackend
from eval.perplexity import PerplexityConfig, compute_perplexity

__all__ = ["PerplexityConfig", "TorchBackend", "compute_perplexity"]
