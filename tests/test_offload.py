"""No silent CPU fallback (pyadaq.offload, pyadaq_kv_offload_check in libllama).

Without a GPU the native check skips CPU-resident caches, so these tests switch it to checking
them against the CPU device too (PYADAQ_OFFLOAD_CHECK_CPU=1, read by the check at each call):
that builds every op the check asks a device about (SET_ROWS for K and V, FLASH_ATTN_EXT for
the layer's pair, or MUL_MAT without flash attention) from the real cache tensors of each
layer, for plain, iSWA and per-layer caches, where a wrong shape would abort in ggml. The CPU
runs all of them, so the answer must be "no problem".

A device that refuses an op cannot occur on a CPU-only machine (the CPU runs every op the check
asks about); what a GPU refuses, and the wording of a refusal, are exercised by
scripts/gpu-check.sh. The handling of problems is tested here with real answers of the native
check: PYADAQ_OFFLOAD_CHECK_CPU=list makes it report every layer it checked, with what it
asked, as a problem line of its own, through the same count and text a refusal comes back in;
nothing on the Python side is replaced.
"""

from __future__ import annotations

import warnings

import pytest
from test_cache_types import tokens

import pyadaq
from pyadaq.runtime import offload
from pyadaq.runtime.context import Context, Model


@pytest.fixture
def check_cpu(monkeypatch):
    monkeypatch.setenv("PYADAQ_OFFLOAD_CHECK_CPU", "1")


@pytest.fixture(scope="module")
def models(tiny_model):
    out = {
        "llama": Model(str(tiny_model(head_dim=64, n_layer=3))),
        "llama128": Model(str(tiny_model(head_dim=128, n_layer=2))),
        "gemma3": Model(str(tiny_model(arch="gemma3", head_dim=64, n_layer=4, sliding_window=32, swa_pattern=2))),
    }
    yield out
    for m in out.values():
        m.close()


CONFIGS = [
    ("llama", "f16", "f16", True, None),
    ("llama", "q4_0", "kvq2", True, None),
    ("llama", "kvq3", "kvq2", True, None),
    ("llama", "kvq2_u32", "kvq3_n64", True, None),  # CPU-only research types
    ("llama", "kvq2", "f16", False, None),            # quantized K without flash attention: MUL_MAT
    ("llama128", "q8_0", "kvq2", True, None),
    ("gemma3", "q4_0", "kvq2", True, None),           # iSWA: both caches
    ("gemma3", "f16", "f16", False, None),
    ("llama", "f16", "f16", True, (["q8_0", "kvq2", "kvq3"], ["kvq2", "q4_0", "f16"])),  # per layer
]


@pytest.mark.parametrize("arch,k,v,fa,layers", CONFIGS,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{'fa' if c[3] else 'nofa'}{'-layers' if c[4] else ''}"
                              for c in CONFIGS])
def test_check_builds_every_op_and_the_cpu_runs_them(models, check_cpu, arch, k, v, fa, layers):
    model = models[arch]
    ctx = Context(model, k, v, n_ctx=256, flash_attn=fa, layer_types=layers)
    try:
        assert offload.offload_problems(ctx.ptr) == []
        ctx.logits(tokens(32, n_vocab=model.n_vocab), 0)  # the context still works afterwards
    finally:
        ctx.close()


def test_check_asks_about_each_layer_with_its_own_types(models, monkeypatch):
    """"list" mode reports what was asked per layer: every layer (both iSWA caches), with the
    layer's own types, flash attention or the K.Q product as configured."""
    layers = (["q8_0", "kvq2", "kvq3", "f16"], ["kvq2", "q4_0", "f16", "kvq3"])
    ctx = Context(models["gemma3"], "f16", "f16", n_ctx=256, layer_types=layers)
    try:
        monkeypatch.setenv("PYADAQ_OFFLOAD_CHECK_CPU", "list")  # after creation, which would refuse
        lines = offload.offload_problems(ctx.ptr)
    finally:
        ctx.close()
    assert len(lines) == 4
    for il, line in enumerate(sorted(lines)):
        k, v = layers[0][il], layers[1][il]
        assert line == f"layer {il} (CPU): checked set_rows {k}, set_rows {v}, flash_attn {k}/{v}"

    monkeypatch.delenv("PYADAQ_OFFLOAD_CHECK_CPU")
    ctx = Context(models["llama"], "kvq2", "f16", n_ctx=256, flash_attn=False)
    try:
        monkeypatch.setenv("PYADAQ_OFFLOAD_CHECK_CPU", "list")
        lines = offload.offload_problems(ctx.ptr)
    finally:
        ctx.close()
    assert lines == [f"layer {il} (CPU): checked set_rows kvq2, set_rows f16, mul_mat kvq2" for il in range(3)]


def test_cpu_resident_cache_is_not_checked_by_default(models, monkeypatch):
    monkeypatch.delenv("PYADAQ_OFFLOAD_CHECK_CPU", raising=False)
    ctx = Context(models["llama"], "q4_0", "kvq2", n_ctx=256)
    try:
        assert offload.offload_problems(ctx.ptr) == []
    finally:
        ctx.close()


@pytest.fixture
def list_all(monkeypatch):
    """The native check reports every checked layer as a problem (at each call, so for a
    context created after this too)."""
    monkeypatch.setenv("PYADAQ_OFFLOAD_CHECK_CPU", "list")


def listed(il: int, k: str, v: str) -> str:
    """The native check's line for a layer it checked in "list" mode, with flash attention."""
    return f"layer {il} (CPU): checked set_rows {k}, set_rows {v}, flash_attn {k}/{v}"


def test_a_problem_is_an_error_naming_every_layer(models, list_all, monkeypatch):
    """Problems from the native check make Context raise KVOffloadError with every problem line
    (each naming its layer and device) and what to do, and free the context it created."""
    import gc

    from pyadaq.runtime import context

    gc.collect()  # no earlier test's garbage freed while the spy below counts
    freed = []
    real_free = context._llama_cpp.llama_free

    def spy_free(ptr):  # counts, then frees for real
        freed.append(ptr)
        return real_free(ptr)

    monkeypatch.setattr(context._llama_cpp, "llama_free", spy_free)
    with pytest.raises(pyadaq.KVOffloadError) as ei:
        Context(models["llama"], "q4_0", "kvq2", n_ctx=256)
    msg = str(ei.value)
    assert msg.startswith("3 layer(s) of the KV cache")
    lines = msg.splitlines()
    for il in range(3):
        assert f"  {listed(il, 'q4_0', 'kvq2')}" in lines
    assert "allow_cpu_fallback=True" in msg and "offload_kqv=False" in msg
    assert len(freed) == 1  # the context that failed the check, and only it


def test_problem_lines_come_back_one_per_layer(models, monkeypatch):
    """offload_problems splits the native text into its lines, as many as the native count
    says, in layer order, with the per-layer types of a mixed cache."""
    layers = (["q8_0", "kvq2", "kvq3"], ["kvq2", "q4_0", "f16"])
    ctx = Context(models["llama"], "f16", "f16", n_ctx=256, layer_types=layers)
    try:
        monkeypatch.setenv("PYADAQ_OFFLOAD_CHECK_CPU", "list")
        assert offload.offload_problems(ctx.ptr) == [listed(il, layers[0][il], layers[1][il]) for il in range(3)]
        with pytest.raises(pyadaq.KVOffloadError, match=r"layer 2 \(CPU\): checked set_rows kvq3, set_rows f16"):
            offload.check_offload(ctx.ptr)
        monkeypatch.setenv("PYADAQ_OFFLOAD_CHECK_CPU", "1")
        assert offload.offload_problems(ctx.ptr) == []
        offload.check_offload(ctx.ptr)  # no problem: nothing raised
    finally:
        ctx.close()


def test_llama_raises_and_frees_or_warns(tiny_model, list_all, monkeypatch):
    import gc

    import llama_cpp.llama_cpp as lib  # what llama_cpp's own objects free their handles with

    path = tiny_model(head_dim=64, n_layer=3)
    gc.collect()  # no earlier test's garbage freed while the spies below count
    freed = []
    with monkeypatch.context() as m:
        real_free, real_model_free = lib.llama_free, lib.llama_model_free
        m.setattr(lib, "llama_free", lambda ctx: (freed.append("context"), real_free(ctx))[1])
        m.setattr(lib, "llama_model_free", lambda model: (freed.append("model"), real_model_free(model))[1])
        with pytest.raises(pyadaq.KVOffloadError,
                           match=r"(?s)layer 0 \(CPU\).*layer 2 \(CPU\).*allow_cpu_fallback") as ei:
            pyadaq.Llama(str(path), cache_type_k="q4_0", cache_type_v="kvq2", n_ctx=256)
        # the half-built Llama is still alive (ei's traceback holds it): freed by the error path,
        # not by its __del__
        assert freed == ["context", "model"]
        del ei
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = pyadaq.Llama(str(path), cache_type_k="q4_0", cache_type_v="kvq2", n_ctx=256, allow_cpu_fallback=True)
    try:
        warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(warned) == 1
        assert all(listed(il, "q4_0", "kvq2") in warned[0] for il in range(3))
        assert llm.context_layer_types()[0][0].name == "q4_0"
        out = llm("Line 1: the quick", max_tokens=2, temperature=0.0)  # a warned Llama still works
        assert out["choices"][0]["text"] is not None
    finally:
        llm.close()


def test_llama_without_problems_is_silent(tiny_model, check_cpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm = pyadaq.Llama(str(tiny_model(head_dim=64, n_layer=3)), cache_type_k="kvq3", cache_type_v="kvq2", n_ctx=256)
    llm.close()


def test_commands_report_a_problem_without_a_traceback(tiny_model, list_all, capsys):
    from pyadaq.cli import main

    rc = main(["bench", "--model", str(tiny_model(head_dim=64, n_layer=3)), "--configs", "q4_0:kvq2",
               "--depths", "0", "--n-prompt", "8", "--n-gen", "2", "--reps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "error: 3 layer(s) of the KV cache" in err  # its first context (the f16 baseline) already
    assert all(listed(il, "f16", "f16") in err for il in range(3))
