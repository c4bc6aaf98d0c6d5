"""The recent-token window (native/src/pyadaq-kv-window.cpp, patch 0017; pyadaq.runtime.kv_window):
the K/V rows of the last W cells written, kept in f16 beside a quantized cache and read by the
CPU flash-attention kernels instead of the quantized rows. A window that covers every cell
makes every quantized pairing give the same logits, bit for bit, in prompt processing and in
generation, on a GQA llama, an iSWA gemma3, a qwen2 with attention biases, a gemma2 with
soft-capped attention logits and a gpt-oss with attention sinks and experts; a shorter one lies
in between. Rewritten cells, a K-shift and a state read keep it consistent; its memory; bad input."""

from __future__ import annotations

import ctypes
import os
import pickle

import cffi
import numpy as np
import pytest

import pyadaq
from pyadaq._native import _lib
from pyadaq.eval.metrics import token_kl
from pyadaq.plan.spec import parse_configs
from pyadaq.runtime.context import Context, Model
from pyadaq.runtime.kv_window import MAX_CELLS, check_kv_window

L = pyadaq.native().llama_cpp
N = pyadaq.native()
THREADS = 2
TEXT = " ".join(f"Line {i} of the log says the pump ran {i % 5} hours and the valve stayed shut." for i in range(200))


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen2", "gemma2", "gpt-oss"])
def model(request, tiny_model):
    kw = {"arch": request.param, "head_dim": 64, "n_head": 4, "n_head_kv": 2}
    if request.param == "gemma3":
        kw.update(n_layer=3, sliding_window=32)  # the iSWA cache: two caches, two windows
    if request.param in ("gemma2", "gpt-oss"):
        kw.update(n_layer=2, sliding_window=32)  # soft-capped logits, sinks: in the kernels that read the window
    m = Model(str(tiny_model(**kw)), n_gpu_layers=0)  # the window is read on the CPU (also under gpu-check.sh)
    yield m
    m.close()


def _cpu():
    """libggml-cpu's counter of pyadaq's generation kernel."""
    ffi = cffi.FFI()
    ffi.cdef("int64_t pyadaq_cpu_fa_decode(void);")
    return ffi.dlopen(str(_lib("ggml-cpu")))


def _toks(m, n):
    return m.tokenize(TEXT)[:n]


def _run(m, k, v, toks, window, *, n_prompt=None, n_ctx=256):
    """Logits of every token: a prompt of n_prompt tokens in one batch (all of them by default),
    then the rest one token at a time (generation's kernel)."""
    c = Context(m, k, v, n_ctx, THREADS, kv_window=window)
    try:
        n_prompt = len(toks) if n_prompt is None else n_prompt
        c.decode(toks[:n_prompt], 0, logits_from=0)
        rows = [c.logits_at(i).copy() for i in range(n_prompt)]
        for p in range(n_prompt, len(toks)):
            c.decode(toks[p:p + 1], p, logits_from=0)
            rows.append(c.logits_at(0).copy())
        return np.stack(rows)
    finally:
        c.close()


@pytest.mark.parametrize("n_prompt", [None, 40])
def test_full_window_is_the_same_for_every_quantized_pair(model, n_prompt):
    """With every cell in the window, attention reads only the f16 copies: q4_0/q4_0, q8_0/kvq2 and
    q4_0/kvq3 give the same logits bit for bit (prompt processing, and generation after a prompt
    of 40), which differ from each pair's own without a window and are closer to f16's."""
    toks = _toks(model, 72)
    got = [_run(model, k, v, toks, 128, n_prompt=n_prompt) for k, v in (("q4_0", "q4_0"), ("q8_0", "kvq2"),
                                                                         ("q4_0", "kvq3"))]
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[0], got[2])
    ref = _run(model, "f16", "f16", toks, 0, n_prompt=n_prompt)
    plain = _run(model, "q4_0", "kvq3", toks, 0, n_prompt=n_prompt)
    assert not np.array_equal(plain, got[2])
    assert token_kl(ref, got[2]).mean() < 0.5 * token_kl(ref, plain).mean()


def test_full_window_with_float_values(model):
    """A quantized K with f32 or f16 values: only the keys have copies, the values are read as they
    are (f32 values have no conversion function in ggml: the generation kernel copies them). With
    every cell in the window q8_0 and q4_0 keys give the same logits, in prompts and generation."""
    toks = _toks(model, 60)
    for v in ("f32", "f16"):
        got = [_run(model, k, v, toks, 128, n_prompt=30) for k in ("q8_0", "q4_0")]
        assert np.isfinite(got[0]).all() and np.array_equal(got[0], got[1]), v


def test_short_window_in_between(model):
    """A window of 16 cells in generation: the newest tokens from the copies, the older ones
    quantized; neither the logits without a window nor those with all cells in it."""
    toks = _toks(model, 60)
    none = _run(model, "q4_0", "kvq2", toks, 0, n_prompt=30)
    short = _run(model, "q4_0", "kvq2", toks, 16, n_prompt=30)
    full = _run(model, "q4_0", "kvq2", toks, 128, n_prompt=30)
    assert not np.array_equal(short[30:], none[30:]) and not np.array_equal(short[30:], full[30:])


def test_rewritten_cells(model):
    """Cells removed and written again with other tokens (llama-cpp-python's prefix reuse does
    this) are read from their new rows: the logits are those of a context that had the new tokens
    there all along, through the same batches, bit for bit (reading the old copies would give the
    old text's)."""
    toks = _toks(model, 200)
    new = np.concatenate([toks[:60], toks[120:150]])

    def rewritten(first):
        c = Context(model, "q4_0", "kvq2", 256, THREADS, kv_window=64)
        try:
            c.decode(first[:90], 0)
            c.drop_from(60)
            c.decode(new[60:], 60, logits_from=0)
            return np.stack([c.logits_at(i).copy() for i in range(30)])
        finally:
            c.close()

    again = rewritten(toks)  # cells 60..89 held toks[60:90] first
    assert np.array_equal(again, rewritten(new))
    assert not np.array_equal(again, _run(model, "q4_0", "kvq2", toks, 64)[60:90])


def test_wrapped_window_is_exact_where_attention_stays_in_it(tiny_model):
    """A model whose every layer attends only its last 16 positions (sliding window), generating
    token by token with a window of 24 cells: the ring wraps many times, and every row attention
    reads is still a copy of the cell it belongs to, so the logits are those of a window that
    never wraps, bit for bit. (An off-by-one slot, a stale tag or the wrong cell of a shared slot
    would read a quantized row, or another cell's.)"""
    m = Model(str(tiny_model(arch="gemma3", head_dim=64, n_head=4, n_head_kv=2, n_layer=2, sliding_window=16,
                             swa_pattern=8)), n_gpu_layers=0)
    try:
        toks = _toks(m, 130)
        wrapped = _run(m, "q4_0", "kvq2", toks, 24, n_prompt=8)
        whole = _run(m, "q4_0", "kvq2", toks, 200, n_prompt=8)
        plain = _run(m, "q4_0", "kvq2", toks, 0, n_prompt=8)
    finally:
        m.close()
    assert np.array_equal(wrapped, whole)
    assert not np.array_equal(wrapped[8:], plain[8:])


def _shifted(m, k, v, x, window, n_fill=96, n_drop=48):
    """Fill, drop the first n_drop tokens and shift the rest down (K-shift), decode the rest."""
    c = Context(m, k, v, 256, THREADS, kv_window=window)
    try:
        mem = L.llama_get_memory(c.ptr)
        c.decode(x[:n_fill], 0)
        assert L.llama_memory_seq_rm(mem, 0, 0, n_drop)
        L.llama_memory_seq_add(mem, 0, n_drop, -1, -n_drop)
        rest = x[n_fill:]
        c.decode(rest, n_fill - n_drop, logits_from=0)
        return np.stack([c.logits_at(i).copy() for i in range(len(rest))])
    finally:
        c.close()


def test_context_shift_empties_the_window(model):
    """A K-shift rotates the quantized keys in place; the copies of the shifted cells are not read
    afterwards (their keys would carry the old positions): the shifted context is as close to an
    exact one with a window as without (closer: the new tokens' rows are exact)."""
    x = _toks(model, 120)
    exact = _shifted(model, "f32", "f32", x, 0)
    plain = float(token_kl(exact, _shifted(model, "q4_0", "q4_0", x, 0)).mean())
    got = float(token_kl(exact, _shifted(model, "q4_0", "q4_0", x, 200)).mean())
    assert got < 1.2 * plain + 1e-6, (got, plain)


def _state(ptr) -> bytes:
    n = L.llama_state_get_size(ptr)
    buf = (ctypes.c_uint8 * n)()
    assert L.llama_state_get_data(ptr, buf, n) == n
    return bytes(buf)


def _load(ptr, data: bytes) -> None:
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    assert L.llama_state_set_data(ptr, buf, len(data)) == len(data)


def test_state_read_empties_the_window(model):
    """A context whose window holds one text, loaded with the state of another: its cells are read
    from the loaded (quantized) rows, not from the copies of the first text: the next token's
    logits are those of a context without a window, loaded with the same state, to the precision
    of that one new token's row."""
    toks = _toks(model, 140)
    x, y = toks[:60], toks[70:130]
    src = Context(model, "q4_0", "q4_0", 256, THREADS)
    a = Context(model, "q4_0", "q4_0", 256, THREADS, kv_window=128)
    c = Context(model, "q4_0", "q4_0", 256, THREADS)
    try:
        src.decode(y, 0)
        st = _state(src.ptr)
        a.decode(x, 0)  # the window now holds x's rows in cells 0..59
        _load(a.ptr, st)
        _load(c.ptr, st)
        nxt = toks[130:131]
        a.decode(nxt, 60, logits_from=0)
        c.decode(nxt, 60, logits_from=0)
        got, ref = a.logits_at(0).copy(), c.logits_at(0).copy()
        a.clear()
        a.decode(np.concatenate([x, nxt]), 0, logits_from=60)
        stale = a.logits_at(60).copy()  # what reading x's rows would look like
    finally:
        for ctx in (src, a, c):
            ctx.close()
    assert np.abs(got - ref).max() < 0.25 * np.abs(stale - ref).max()


def test_memory_and_kernels(model):
    """The window's bytes: W + 1 f16 rows per quantized layer side (a spare row for a batch that
    writes two cells of one slot) and W int32 tags per cache, padded by the buffers' alignment;
    nothing for f16 caches or without a window. Generation with a flat pair (q8_0/kvq2, which
    keeps upstream's path without a window) runs on pyadaq's kernel with one."""
    info = pyadaq.read_model_info(model.path)
    W = 64
    dims = sum(info.n_head_kv_layer(il) * info.head_size_k_layer(il) for il in info.cache_layers())
    c = Context(model, "q8_0", "f16", 256, THREADS, kv_window=W)
    try:
        assert c.kv_window_cells == W
        rows = (W + 1) * 2 * dims  # K only (V is f16)
        n_caches = 2 if info.sliding_window else 1
        got = c.kv_window_bytes
        assert rows + 4 * W * n_caches <= got <= rows + 4 * W * n_caches + 512 * (info.n_layer + n_caches)
    finally:
        c.close()
    for k, v, w in (("f16", "f16", W), ("q8_0", "kvq2", 0)):
        c = Context(model, k, v, 256, THREADS, kv_window=w)
        try:
            assert c.kv_window_bytes == 0 and c.kv_window_cells == 0
        finally:
            c.close()
    cpu = _cpu()
    before = int(cpu.pyadaq_cpu_fa_decode())
    _run(model, "q8_0", "kvq2", _toks(model, 36), 32, n_prompt=30)
    assert int(cpu.pyadaq_cpu_fa_decode()) > before


@pytest.mark.parametrize("bad", [-1, MAX_CELLS + 1, 1.5, "64", True, None])
def test_bad_window(tiny_model, bad):
    """Not a whole number of cells in 0..MAX_CELLS: ValueError, before any native call."""
    with pytest.raises(ValueError, match="kv_window"):
        check_kv_window(bad)
    m = Model(str(tiny_model(arch="llama", head_dim=64, n_head=4, n_head_kv=2)), n_gpu_layers=0)
    try:
        with pytest.raises(ValueError, match="kv_window"):
            Context(m, "q4_0", "q4_0", 256, THREADS, kv_window=bad)
    finally:
        m.close()


def test_window_needs_flash_attention_on_the_cpu(tiny_model):
    path = str(tiny_model(arch="llama", head_dim=64, n_head=4, n_head_kv=2))
    m = Model(path, n_gpu_layers=0)
    try:
        with pytest.raises(ValueError, match="flash attention"):
            Context(m, "q4_0", "f16", 256, THREADS, flash_attn=False, kv_window=32)
    finally:
        m.close()
    with pytest.raises(ValueError, match="flash attention"):
        pyadaq.Llama(path, cache_type_k="q4_0", kv_window=32, flash_attn=False, n_ctx=256, n_gpu_layers=0)
    if pyadaq.native().gpu_devices():
        with pytest.raises(ValueError, match="CPU"):
            pyadaq.Llama(path, cache_type_k="q4_0", kv_window=32, n_gpu_layers=1, n_ctx=256)
    else:  # n_gpu_layers asks for nothing where ggml has no GPU: the window is made
        llm = pyadaq.Llama(path, cache_type_k="q4_0", kv_window=32, n_gpu_layers=1, n_ctx=256)
        try:
            assert llm.kv_window_bytes > 0
        finally:
            llm.close()


def test_llama_with_a_window(tiny_model):
    """pyadaq.Llama(kv_window=...): the context has it (its bytes), it survives pickling, and a
    prompt that fits the window is answered as every quantized pair answers it with one."""
    path = str(tiny_model(arch="llama", head_dim=64, n_head=4, n_head_kv=2))
    outs = []
    for k, v in (("q4_0", "kvq2"), ("q8_0", "kvq3")):
        llm = pyadaq.Llama(path, cache_type_k=k, cache_type_v=v, kv_window=128, n_ctx=256, seed=1, n_gpu_layers=0)
        try:
            assert llm.kv_window == 128 and llm.kv_window_bytes > 0
            outs.append(llm("Line 3 of the log says", max_tokens=12, temperature=0.0)["choices"][0]["text"])
            if k == "q4_0":
                clone = pickle.loads(pickle.dumps(llm))
                try:
                    assert clone.kv_window == 128 and clone.kv_window_bytes == llm.kv_window_bytes
                finally:
                    clone.close()
        finally:
            llm.close()
    assert outs[0] == outs[1]


def test_config_specs():
    specs = parse_configs("q8_0:kvt2+cal+w64,q4_0:kvq2+w8,budget:3.0+w128")
    assert [s.label for s in specs] == ["q8_0:kvt2+cal+w64", "q4_0:kvq2+w8", "budget:3.0+w128"]
    for bad, msg in (("q4_0:kvq2+w0", "no window"), (f"q4_0:kvq2+w{MAX_CELLS + 1}", "between"),
                     ("q8_0:kvt2+w8+cal", "window comes last"), ("q4_0:kvq2+w8+w16", "two windows")):
        with pytest.raises(ValueError, match=msg):
            parse_configs(bad)


@pytest.mark.skipif(bool(os.environ.get("PYADAQ_GPU_LAYERS", "").strip("0 ")),
                    reason="eval and bench offload to the GPU here, where a window is refused")
def test_eval_and_bench_with_windows(tiny_model, tmp_path):
    """`pyadaq eval` and `pyadaq bench` run +wN configs (also under --kv-calibration alone), and count
    the window's bytes in the KV bytes."""
    import json

    from pyadaq.cli import main

    path = str(tiny_model(arch="llama", head_dim=64, n_head=4, n_head_kv=2))
    out = tmp_path / "e.json"
    assert main(["eval", "--model", path, "--ctx", "64", "--chunks", "1", "--threads", "1",
                 "--configs", "q4_0:kvq2,q4_0:kvq2+w16", "--json", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    plain, win = rows["q4_0:kvq2"], rows["q4_0:kvq2+w16"]
    assert win["kv_window"] == 16 and win["kv_window_bytes"] > 0 and plain["kv_window_bytes"] == 0
    assert win["kv_bytes"] == plain["kv_bytes"] + win["kv_window_bytes"]
    assert win["kl_mean"] != plain["kl_mean"]
    cal = tmp_path / "cal.gguf"
    assert main(["calibrate", "--model", path, "--ctx", "64", "--chunks", "1", "--threads", "1",
                 "--out", str(cal)]) == 0
    assert main(["eval", "--model", path, "--ctx", "64", "--chunks", "1", "--threads", "1", "--kv-calibration",
                 str(cal), "--configs", "q8_0:kvt2+w16", "--json", str(out)]) == 0
    assert [r["config"] for r in json.loads(out.read_text())["results"]] == ["q8_0:kvt2+cal+w16"]
    bench = tmp_path / "b.json"
    assert main(["bench", "--model", path, "--configs", "q4_0:kvq2+w16", "--depths", "0", "--reps", "1",
                 "--n-prompt", "16", "--n-gen", "4", "--threads", "1", "--json", str(bench)]) == 0
    row = json.loads(bench.read_text())["results"][-1]
    assert row["config"] == "q4_0:kvq2+w16" and row["kv_window_bytes"] > 0
