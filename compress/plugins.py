"""Plugin discovery: built-ins and entry-point plugins register through the same hooks."""

from __future__ import annotations

import logging

import pluggy

from compress import hookspecs
from compress.hookspecs import hookimpl

log = logging.getLogger(__name__)

_manager: pluggy.PluginManager | None = None


class _Builtin:
    """The built-in passes, exporters and tasks, registered like any plugin."""

    @hookimpl
    def register_passes(self, register):
        from compress.quantize import (
            awq,
            block_tune,
            embeddings,
            gptq,
            mixed,
            rotate,
            rtn,
            smoothquant,
            w8a8,
        )

        register(rtn.run)
        register(rotate.run)
        register(embeddings.run)
        register(gptq.run)
        register(block_tune.run)
        register(awq.run)
        register(mixed.run)
        register(smoothquant.run)
        register(w8a8.run)

        from compress.prune import layers, magnitude, sparsegpt, structured, wanda

        register(magnitude.run)
        register(wanda.run)
        register(sparsegpt.run)
        register(structured.run_channels)
        register(structured.run_heads)
        register(layers.run)

        from compress.distill import kd, scale_tune, student

        register(student.run)
        register(kd.run)
        register(scale_tune.run)

        from compress.lora import merge

        register(merge.run)

    @hookimpl
    def register_exporters(self, register):
        from export import gguf as gguf_export
        from export import onnx as onnx_export
        from export import safetensors as st

        register(st.export_safetensors)
        register(onnx_export.export_onnx)
        register(gguf_export.export_gguf)

    @hookimpl
    def register_tasks(self, register):
        from eval import multiple_choice, perplexity

        register(perplexity.wikitext2)
        register(perplexity.text_file)
        register(multiple_choice.mmlu)
        register(multiple_choice.arc_easy)
        register(multiple_choice.user_mc)


builtin = _Builtin()


def _registrar(registry, attr: str):
    def register(obj):
        spec = getattr(obj, attr, obj)
        return registry.add(spec)

    return register


def load_plugins() -> pluggy.PluginManager:
    """Load built-ins and every `compress` entry point once; return the manager."""
    global _manager
    if _manager is not None:
        return _manager
    from compress.registry import EXPORTERS, PASSES, TASKS

    pm = pluggy.PluginManager("compress")
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="builtin")
    _manager = pm  # set before the hooks run: they read registries, which must not recurse
    try:
        pm.load_setuptools_entrypoints("compress")
    except Exception as e:  # a broken third-party plugin must not break the toolkit
        log.warning("could not load a compress plugin: %s", e)
    pm.hook.register_passes(register=_registrar(PASSES, "pass_spec"))
    pm.hook.register_exporters(register=_registrar(EXPORTERS, "exporter_spec"))
    pm.hook.register_tasks(register=_registrar(TASKS, "task_spec"))
    log.debug("plugins: %s", [n for n, _ in pm.list_name_plugin()])
    return pm


def plugin_names() -> list[str]:
    """Names of loaded plugins (the built-ins are 'builtin')."""
    return sorted(n for n, _ in load_plugins().list_name_plugin())

