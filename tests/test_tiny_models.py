"""models/tiny.py: every architecture it writes loads in llama.cpp and computes what its float64
numpy reference computes (f32 weights and cache, no flash attention), so the tests that run on
these models test llama.cpp's real graphs for them: a GQA llama, an iSWA gemma3, a qwen2 with
attention biases, a gemma2 with soft-capped logits and a gpt-oss with sinks and experts."""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from pyadaq.eval.metrics import token_kl
from pyadaq.runtime.context import Context, Model, quiet_native_logs

quiet_native_logs()
TEXT = "the weather and the sea talk about ships and the people of the town " * 12


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_llama_cpp_computes_the_reference(tiny_model, arch):
    kw = {"sliding_window": 32} if arch in tiny.SWA_ARCHS else {}
    path = tiny_model(arch=arch, head_dim=64, n_head=4, n_head_kv=2, n_layer=2, dtype="f32", **kw)
    cfg = tiny.read_config(path)
    assert cfg.arch == arch and any(cfg.swa_layers) == (arch in tiny.SWA_ARCHS)
    toks = tiny.simple_tokenize(TEXT)[:160]  # past the window of 32
    ref = tiny.reference_logits(path, toks)
    m = Model(str(path))
    try:
        c = Context(m, "f32", "f32", 256, 2, flash_attn=False)
        try:
            got = c.logits(np.asarray(toks, dtype=np.int32), 0)
        finally:
            c.close()
    finally:
        m.close()
    assert float(token_kl(ref, got).mean()) < 1e-6
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.99
    # neither uniform nor one-hot: the next token depends on the weights and the context
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = float(-(p * np.log(p + 1e-30)).sum(1).mean())
    assert 1.0 < entropy < 5.5, entropy
