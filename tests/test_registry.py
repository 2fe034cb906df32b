from dataclasses import dataclass

import pytest

from compress.pipeline import PassReport
from compress.registry import PASSES, PassSpec, Registry, register_pass


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"unknown pass 'nope'; known: .*rtn"):
        PASSES.get("nope")


def test_duplicate_name_with_other_function_refused():
    reg: Registry = Registry("pass")

    @dataclass(frozen=True, kw_only=True)
    class C:
        x: int = 1

    reg.add(PassSpec("a", C, lambda m, c, k: None))
    with pytest.raises(ValueError, match="registered twice"):
        reg.add(PassSpec("a", C, lambda m, c, k: None))


def test_register_pass_needs_frozen_dataclass():
    @dataclass
    class Mutable:
        x: int = 1

    with pytest.raises(TypeError, match="frozen dataclass"):
        register_pass("mutable", Mutable)


def test_registered_pass_is_visible_and_idempotent():
    @dataclass(frozen=True, kw_only=True)
    class NoopConfig:
        factor: float = 1.0

    @register_pass("_test_noop", NoopConfig)
    def run(model, cfg, calib=None):
        return PassReport(name="_test_noop", config={})

    assert PASSES.get("_test_noop").run is run
    PASSES.add(run.pass_spec)  # same spec again: fine
    assert "_test_noop" in PASSES.names()
