"""Shared fixtures: the tiny generated GGUF models and the embedded Gemma 3 270M.

Tests run against the installed pyadaq (its libraries in pyadaq/lib). The repository root is
deliberately not put on sys.path, so that the source tree's pyadaq/ (which has no built
libraries) cannot shadow the installed package; the model generator is imported from models/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import pyadaq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

import tiny  # noqa: E402  (models/tiny.py, after its directory is on sys.path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """make(arch="llama", head_dim=64, ...) -> path of a generated tiny GGUF, cached per session."""
    made: dict = {}

    def make(**kw) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in made:
            name = "-".join(f"{k}{v}" for k, v in key) or "default"
            made[key] = tiny.make_tiny_model(tiny_dir / f"{name}.gguf", **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from pyadaq.model.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def child_env():
    """child_env(**extra) -> the environment for a child Python that imports the same pyadaq
    and models/tiny.py as these tests (plus the extra variables)."""
    import os


    def make(**extra) -> dict:
        env = dict(os.environ, **extra)
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(pyadaq.__file__)),
                                             os.path.dirname(tiny.__file__), env.get("PYTHONPATH", "")])
        return env

    return make


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """pyadaq's cache directory for one test: an empty tmp_path/cache ($PYADAQ_CACHE_DIR)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("PYADAQ_CACHE_DIR", str(d))
    return d
