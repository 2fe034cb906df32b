"""compress: quantize, prune, distill and merge transformers, export the artifact, score it, gate on it.

The Python API in a few lines::

    import compress
    compress.load_plugins()                          # register the passes, exporters and tasks (once)
    lm = compress.load_model()                       # default reference model (SmolLM2-135M)
    recipe = compress.Recipe.from_yaml("- pass: rtn\\n  bits: 4\\n  group_size: 128\\n")
    reports = compress.apply(lm.model, recipe)
    compress.save_model(lm, "out/smollm2-w4", recipe=recipe, reports=reports)
"""

from __future__ import annotations

__version__ = "0.1.0"

from compress.models import LoadedModel, load_model, save_model
from compress.pipeline import PassReport, apply
from compress.plugins import load_plugins
from compress.recipe import Recipe, Step

__all__ = [
    "LoadedModel",
    "PassReport",
    "Recipe",
    "Step",
    "__version__",
    "apply",
    "load_plugins",
    "load_model",
    "save_model",
]
