"""ggml type ids in pyadaq's libraries: every id below GGML_TYPE_COUNT has a name (the unused
ones marked the way upstream marks retired ids), and a model file with a tensor of an unused
id is refused with a clear error, by pyadaq before native code and by libllama itself."""

from __future__ import annotations

import shutil
import subprocess
import sys

import gguf
import pytest

import pyadaq
from pyadaq.types import PYADAQ_CACHE_TYPES, PYADAQ_CALIBRATED_TYPES, PYADAQ_RESEARCH_TYPES

GGML_TYPE_COUNT = 117  # native/patches/0001
UNUSED = [*range(43, 100)]


def test_every_id_has_a_name():
    n = pyadaq.native()
    used = {*PYADAQ_CACHE_TYPES.values(), *PYADAQ_RESEARCH_TYPES.values(), *PYADAQ_CALIBRATED_TYPES.values()}
    for tid in range(GGML_TYPE_COUNT):
        name = n.type_name(tid)
        assert name, f"ggml_type_name({tid}) is NULL or empty"
        if tid in UNUSED:
            assert name == f"unused type id {tid} (reserved by pyadaq)"
            assert n.base.ggml_blck_size(tid) == 0 and n.base.ggml_type_size(tid) == 0
        elif tid >= 43:
            assert tid in used


def _with_tensor_type(src, dst, type_id: int):
    """A copy of the model whose first tensor claims ggml type `type_id` (header only)."""
    shutil.copy(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    field = reader.tensors[0].field
    field.parts[4][0] = type_id  # [name length, name, n_dims, dims, type, offset]
    reader.data.flush()
    del reader
    return dst


@pytest.mark.parametrize("type_id", [43, 50, 99])
def test_model_with_an_unused_type_id_is_refused(tiny_model, tmp_path, child_env, type_id):
    bad = _with_tensor_type(tiny_model(head_dim=64), tmp_path / "bad.gguf", type_id)
    # pyadaq: a Python exception before native code
    with pytest.raises(pyadaq.ModelFileError, match=f"invalid ggml type id {type_id}"):
        pyadaq.Llama(str(bad), n_ctx=64)
    # libllama on its own (what llama.cpp's tools built from this tree do): no model, no crash,
    # and its log names the type
    code = ("import sys, pyadaq\n"
            "L = pyadaq.native().llama_cpp\n"
            "p = L.llama_model_default_params()\n"
            "m = L.llama_model_load_from_file(sys.argv[1].encode(), p)\n"
            "print('NULL' if not m else 'LOADED', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "NULL", (proc.stdout, proc.stderr)
    assert f"unused type id {type_id} (reserved by pyadaq)" in proc.stderr
    assert "(null)" not in proc.stderr
