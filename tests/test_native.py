"""The loader: pyadaq's libllama is found, identified, and never mixed with another one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pyadaq
from pyadaq._native import lib_dir


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH",)}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=full)


def copy_libs(dst):
    shutil.copytree(lib_dir(), dst)
    return dst


def test_build_info_identifies_the_library():
    info = pyadaq.native().build_info
    assert info["info"].startswith(f"pyadaq {pyadaq.__version__}; patchset ")
    assert "llama-cpp-python==0.3.36" in info["info"]
    import llama_cpp

    assert os.path.realpath(str(llama_cpp.llama_cpp._base_path)) == os.path.realpath(str(lib_dir()))


def test_llama_cpp_imported_first_from_elsewhere_is_refused(tmp_path):
    other = copy_libs(tmp_path / "other")
    res = run_py("import llama_cpp, pyadaq", LLAMA_CPP_LIB_PATH=str(other), PYADAQ_LIB_DIR=str(lib_dir()))
    assert res.returncode != 0
    assert "NativeLibraryError" in res.stderr
    assert "imported before pyadaq" in res.stderr


def test_llama_cpp_imported_first_from_the_same_place_is_fine():
    res = run_py("import llama_cpp, pyadaq; print(pyadaq.cache_type('kvq2').bits_per_value)",
                 LLAMA_CPP_LIB_PATH=str(lib_dir()), PYADAQ_LIB_DIR=str(lib_dir()))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2.5"


def test_library_from_another_build_is_refused(tmp_path):
    other = copy_libs(tmp_path / "other")
    meta = {"version": pyadaq.__version__, "patchset": "0123456789abcdef", "upstream": "x", "cuda": "OFF"}
    (other / "_build_info.json").write_text(json.dumps(meta))
    res = run_py("import pyadaq", PYADAQ_LIB_DIR=str(other))
    assert res.returncode != 0
    assert "different builds" in res.stderr


def test_missing_libraries_say_how_to_fix(tmp_path):
    res = run_py("import pyadaq", PYADAQ_LIB_DIR=str(tmp_path))
    assert res.returncode != 0
    assert "native libraries are not in" in res.stderr and "pip install" in res.stderr


def test_llama_cpp_imported_first_says_to_import_pyadaq():
    """llama-cpp-python installed without libraries of its own (pyadaq provides them): importing
    llama_cpp first fails, and the error says what to do (native/site/_pyadaq_llama_cpp_hint.py)."""
    import importlib.util

    if os.environ.get("PYADAQ_LIB_DIR"):
        pytest.skip("pyadaq runs from a source tree here (PYADAQ_LIB_DIR); the hint comes with `pip install`")
    if importlib.util.find_spec("_pyadaq_llama_cpp_hint") is None:
        pytest.fail("the hint module is not installed beside pyadaq (CMakeLists.txt installs it)")
    own = Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib"
    if any(own.glob("libllama*")):
        pytest.skip(f"this llama_cpp has libraries of its own ({own}): importing it first works")
    res = run_py("import llama_cpp")
    assert res.returncode != 0
    assert "import pyadaq` before `import llama_cpp`" in res.stderr, res.stderr
    # and with pyadaq first, nothing changes
    res = run_py("import pyadaq, llama_cpp; print(llama_cpp.__version__)")
    assert res.returncode == 0 and res.stdout.strip() == "0.3.36", res.stderr
