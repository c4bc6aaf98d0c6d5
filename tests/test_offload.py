"""No silent CPU fallback (pyadaq.offload, pyadaq_kv_offload_check in libllama).

Without a GPU the native check skips CPU-resident caches, so these tests switch it to checking
them against the CPU device too (PYADAQ_OFFLOAD_CHECK_CPU=1): that builds every op the check
asks a device about (SET_ROWS for K and V, FLASH_ATTN_EXT for the layer's pair, or MUL_MAT
without flash attention) from the real cache tensors of each layer, for plain, iSWA and
per-layer caches, where a wrong shape would abort in ggml. The CPU runs all of them, so the
answer must be "no problem". What a GPU refuses is exercised by scripts/gpu-check.sh; the
Python side's handling of a refusal is tested here by making the native answer a refusal.
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


PROBLEM = "layer 1 (CUDA0): flash attention with K kvq2_u32 / V f16 (head size 64)"


def test_a_refusal_is_an_error_naming_the_layer(models, monkeypatch):
    monkeypatch.setattr(offload, "offload_problems", lambda ptr: [PROBLEM])
    with pytest.raises(pyadaq.KVOffloadError, match=r"(?s)layer 1 \(CUDA0\).*allow_cpu_fallback"):
        Context(models["llama"], "q4_0", "kvq2", n_ctx=256)


def test_llama_raises_and_frees_or_warns(tiny_model, monkeypatch):
    path = tiny_model(head_dim=64, n_layer=3)
    monkeypatch.setattr(offload, "offload_problems", lambda ptr: [PROBLEM])
    with pytest.raises(pyadaq.KVOffloadError, match="CPU"):
        pyadaq.Llama(str(path), cache_type_k="q4_0", cache_type_v="kvq2", n_ctx=256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = pyadaq.Llama(str(path), cache_type_k="q4_0", cache_type_v="kvq2", n_ctx=256, allow_cpu_fallback=True)
    try:
        assert any(issubclass(w.category, RuntimeWarning) and "layer 1" in str(w.message) for w in caught)
        assert llm.context_layer_types()[0][0].name == "q4_0"
    finally:
        llm.close()


def test_llama_without_problems_is_silent(tiny_model, check_cpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm = pyadaq.Llama(str(tiny_model(head_dim=64, n_layer=3)), cache_type_k="kvq3", cache_type_v="kvq2", n_ctx=256)
    llm.close()


def test_commands_report_a_refusal_without_a_traceback(tiny_model, monkeypatch, capsys):
    from pyadaq.cli import main

    monkeypatch.setattr(offload, "offload_problems", lambda ptr: [PROBLEM])
    rc = main(["bench", "--model", str(tiny_model(head_dim=64, n_layer=3)), "--configs", "q4_0:kvq2",
               "--depths", "0", "--n-prompt", "8", "--n-gen", "2", "--reps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "layer 1 (CUDA0)" in err and "Traceback" not in err
