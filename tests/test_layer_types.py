"""Per-layer K/V cache types in libllama (native/patches/0005, pyadaq.layer_types), on tiny
generated models: each layer's tensors have the requested types; an all-equal list gives the
logits of the uniform context bit for bit; mixed lists work with flash attention, rotation
on and off, context shift, state save/load, several sequences and the iSWA cache; the KV
bytes equal the per-layer sum; bad lists are refused without creating anything; pending
types never leak into a later context or another thread's; contexts created from several
threads at once each get their own types.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_cache_types import Ctx, _shifted, kl_bound, tokens

import pyadaq
from pyadaq.eval.metrics import token_kl
from pyadaq.runtime.context import Model, quiet_native_logs
from pyadaq.runtime.layer_types import context_layer_types, next_context, pending
from pyadaq.runtime.llama import _kv_bytes
from pyadaq.types import cache_type

L = pyadaq.native().llama_cpp
quiet_native_logs()

N_LAYER = 4
MIX_K = ["q8_0", "kvq2", "f16", "kvq3"]
MIX_V = ["kvq3", "f16", "kvq2", "q4_0"]


@pytest.fixture(scope="module")
def llama4(tiny_model):
    m = Model(str(tiny_model(head_dim=64, n_layer=N_LAYER)))
    yield m
    m.close()


@pytest.fixture(scope="module")
def gemma4(tiny_model):
    path = tiny_model(arch="gemma3", head_dim=64, n_layer=N_LAYER, sliding_window=32, swa_pattern=2)
    m = Model(str(path))
    yield m, pyadaq.read_model_info(path)
    m.close()


def names(types) -> list:
    return [None if t is None else t.name for t in types]


def test_each_layer_has_the_requested_types(llama4):
    with Ctx(llama4, "f16", "f16", 256, layer_types=(MIX_K, MIX_V)) as c:
        k, v = context_layer_types(c.ptr, N_LAYER)
        assert names(k) == MIX_K and names(v) == MIX_V
        # the bytes of the cache are the sum of the layers' rows (n_head_kv 2 x head_dim 64)
        row = sum(cache_type(a).row_bytes(128) + cache_type(b).row_bytes(128) for a, b in zip(MIX_K, MIX_V))
        assert c.kv_cache_bytes == 256 * row


def test_pending_types_are_consumed(llama4):
    with Ctx(llama4, "q8_0", "q8_0", 256, layer_types=(MIX_K, MIX_V)):
        pass
    assert not pending()
    with Ctx(llama4, "q8_0", "q4_0", 256) as c:  # the next context: uniform, as asked
        k, v = context_layer_types(c.ptr, N_LAYER)
        assert names(k) == ["q8_0"] * N_LAYER and names(v) == ["q4_0"] * N_LAYER


@pytest.mark.parametrize("kv", [("kvq2", "kvq2"), ("q4_0", "kvq3"), ("f16", "f16"), ("kvq3", "f16")])
@pytest.mark.parametrize("rot", [True, False], ids=["rot", "norot"])
def test_all_equal_list_matches_uniform(llama4, kv, rot):
    x = tokens(90, seed=3)
    k, v = kv
    with Ctx(llama4, k, v, 256, attn_rot=rot) as c:
        uniform = c.run(x, chunk=30)
    with Ctx(llama4, "f16", "f16", 256, attn_rot=rot, layer_types=([k] * N_LAYER, [v] * N_LAYER)) as c:
        per_layer = c.run(x, chunk=30)
    assert np.isfinite(uniform).all()
    assert np.array_equal(uniform, per_layer)


def test_mixed_error_between_its_extremes(llama4):
    """A mix of kvq2 and q8_0 layers costs more KL than all-q8_0 and less than all-kvq2: the
    per-layer types are really in use."""
    x = tokens(100, seed=4)
    with Ctx(llama4, "f16", "f16", 256) as c:
        ref = c.run(x)

    def kl(tk, tv):
        with Ctx(llama4, "f16", "f16", 256, layer_types=(tk, tv)) as c:
            return float(token_kl(ref, c.run(x)).mean())

    lo = kl(["q8_0"] * 4, ["q8_0"] * 4)
    hi = kl(["kvq2"] * 4, ["kvq2"] * 4)
    mid = kl(["kvq2", "q8_0", "kvq2", "q8_0"], ["q8_0", "kvq2", "q8_0", "kvq2"])
    assert lo < mid < hi, (lo, mid, hi)
    assert hi < kl_bound("kvq2", "kvq2")


def test_context_shift_mixed(llama4):
    x = tokens(160, seed=1)
    lt = (MIX_K, MIX_V)
    ref = _shifted(llama4, "f16", "f16", x)
    got = _shifted(llama4, "f16", "f16", x, layer_types=lt)
    unshifted = _shifted(llama4, "f16", "f16", x, shift=False, layer_types=lt)
    unshifted_ref = _shifted(llama4, "f16", "f16", x, shift=False)
    assert np.isfinite(got).all()
    kl_shift = float(token_kl(ref, got).mean())
    kl_plain = float(token_kl(unshifted_ref, unshifted).mean())
    assert kl_shift < 2.0 * kl_plain + 0.005, (kl_shift, kl_plain)


def test_state_roundtrip_mixed(llama4):
    x = tokens(120, seed=5)
    lt = (MIX_K, MIX_V)
    with Ctx(llama4, "f16", "f16", 256, layer_types=lt) as c:
        c.run(x[:70])
        state = c.get_state()
        a = c.run(x[70:], pos0=70, chunk=25)
    with Ctx(llama4, "f16", "f16", 256, layer_types=lt) as c:
        assert c.set_state(state) == len(state)
        b = c.run(x[70:], pos0=70, chunk=25)
    assert np.array_equal(a, b)
    # a context with other per-layer types refuses the state (llama.cpp checks each layer's type)
    with Ctx(llama4, "f16", "f16", 256, layer_types=(MIX_V, MIX_K)) as c:
        assert c.set_state(state) == 0


def test_several_sequences_mixed(llama4):
    seqs = [tokens(40, seed=10), tokens(33, seed=11)]
    lt = (MIX_K, MIX_V)
    with Ctx(llama4, "f16", "f16", 512, n_seq_max=2, layer_types=lt) as c:
        together = c.decode([(s, 0, i) for i, s in enumerate(seqs)])
    for i, s in enumerate(seqs):
        with Ctx(llama4, "f16", "f16", 512, n_seq_max=2, layer_types=lt) as c:
            alone = c.decode([(s, 0, i)])[0]
        # together the rest of sequence 0 after the 33 tokens of each goes in a batch of 7, alone
        # the 40 in one: the same attention in another order of additions
        # (test_cache_types.py::test_several_sequences)
        assert token_kl(alone, together[i]).mean() < 1e-3


def test_iswa_mixed(gemma4):
    m, info = gemma4
    lt = (["kvq2", "q8_0", "kvq3", "f16"], ["q4_0", "kvq2", "f16", "kvq3"])
    assert info.has_swa and any(info.is_swa(il) for il in range(N_LAYER))
    x = tokens(150, seed=7)
    with Ctx(m, "f16", "f16", 512, n_ubatch=32) as c:
        ref = c.run(x, chunk=32)
    with Ctx(m, "f16", "f16", 512, n_ubatch=32, layer_types=lt) as c:
        k, v = context_layer_types(c.ptr, N_LAYER)
        assert names(k) == lt[0] and names(v) == lt[1]  # both caches (SWA and full) follow the list
        got = c.run(x, chunk=32)
        expected = _kv_bytes(info, lt[0], lt[1], n_ctx_seq=512, n_seq_max=1, n_ubatch=32, kv_unified=False,
                             swa_full=False, v_trans=False)
        assert c.kv_cache_bytes == expected
    assert np.isfinite(got).all()
    assert float(token_kl(ref, got).mean()) < kl_bound("kvq2", "kvq2")


@pytest.mark.parametrize("bad, msg", [
    ((["q8_0"] * 3, ["f16"] * 3), "3 layers, the model has 4"),
    ((["q8_0"] * 4, [12345] * 4), "not a supported KV-cache type"),
])
def test_bad_lists_are_refused(llama4, bad, msg):
    with pytest.raises(ValueError, match=msg), next_context(*bad, model_ptr=llama4.ptr):
        pass
    assert not pending()


def test_native_refuses_block_size_that_does_not_fit(tiny_model):
    """Head size 48: q4_0 (block 32) cannot hold a head; libllama says so and stores nothing,
    and a list set without the model fails the context creation instead."""
    m = Model(str(tiny_model(head_dim=48)))
    try:
        n = pyadaq.native()
        err = n.ffi.new("char[]", 256)
        ids = n.ffi.new("int32_t[]", [cache_type("q4_0").id] * 2)
        f16 = n.ffi.new("int32_t[]", [cache_type("f16").id] * 2)
        rc = n.llama.pyadaq_next_context_layer_types(n.ffi.cast("void *", m.ptr), 2, ids, f16, err, 256)
        assert rc == -1
        assert "does not divide the head size 48" in n.ffi.string(err).decode()
        assert not pending()
        assert n.llama.pyadaq_next_context_layer_types(n.ffi.NULL, 2, ids, f16, err, 256) == 0
        assert pending() == 1
        p = L.llama_context_default_params()
        p.n_ctx = 256
        assert not L.llama_init_from_model(m.ptr, p)
        assert not pending()
    finally:
        m.close()


def test_quantized_v_without_flash_attention_is_refused(llama4):
    """libllama refuses (no context, no crash) and consumes the list."""
    p = L.llama_context_default_params()
    p.n_ctx = 256
    p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    with next_context(["f16"] * 4, ["f16", "kvq2", "f16", "f16"], model_ptr=llama4.ptr):
        assert pending() == 1
        ctx = L.llama_init_from_model(llama4.ptr, p)
        assert not ctx
        assert not pending()


def test_slot_is_emptied_and_thread_local(llama4):
    import threading

    seen = []
    with next_context(MIX_K, MIX_V, model_ptr=llama4.ptr, attn_rot=False):
        assert pending() == 3
        t = threading.Thread(target=lambda: seen.append(pending()))
        t.start()
        t.join()
    assert seen == [0]  # another thread never sees this thread's slot
    assert not pending()


def test_pending_types_do_not_reach_another_threads_context(llama4):
    """Types set on one thread are not taken by a context another thread creates meanwhile."""
    import threading

    got = {}

    def other():
        with Ctx(llama4, "q8_0", "q8_0", 256) as c:
            got["other"] = names(context_layer_types(c.ptr, N_LAYER)[0])

    with next_context(MIX_K, MIX_V, model_ptr=llama4.ptr):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert pending() == 1  # still this thread's
    assert got["other"] == ["q8_0"] * N_LAYER
