"""The transform-coded KV-cache types kvt2/3/4 and kvt2s/3s/4s (native/src/pyadaq-kvt.c, the
spec): the C level tables are the twin's Lloyd-Max levels bit for bit and satisfy the centroid
condition, the scale codes decode to the twin's powers of 2^(1/8) and the search finds the best
code; the numpy twin (pyadaq/quants_ref.py) writes the C reference's bytes and decodes its
floats, on Gaussian data of every scale, zeros, NaN, infinities and huge values, the AVX2
quantizer writes the reference's bytes and the AVX2 dequantization decodes its floats bit for bit; the layout
decodes as written by hand; the error on a spectrum the profiles were made for is below a flat
2- / 3- / 4-bit type's; the dot product with q8_0; a context refuses them without a
calibration and runs them with one (K-shift included)."""

from __future__ import annotations

import numpy as np
import pytest

import pyadaq
from pyadaq import quants_ref as qr
from pyadaq.types import cache_type

NAT = pyadaq.native()
FFI = NAT.ffi
KVT = [cache_type(name) for name in qr.KVT_TYPES]
per_type = pytest.mark.parametrize("t", KVT, ids=[t.name for t in KVT])


def c_quantize(t, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(len(x) // t.block_size * t.type_size, dtype=np.uint8)
    assert NAT.base.pyadaq_quantize_ref(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(out), len(x)) == 0
    return out


def c_dequantize(t, data: np.ndarray, n: int) -> np.ndarray:
    y = np.zeros(n, dtype=np.float32)
    assert NAT.base.pyadaq_dequantize(t.id, FFI.from_buffer(np.ascontiguousarray(data)),
                                      FFI.from_buffer("float[]", y), n) == 0
    return y


def test_levels_are_the_twins_and_lloyd_max():
    from statistics import NormalDist

    nd = NormalDist()
    for bits in range(1, qr.KVT_MAX_BITS + 1):
        out = np.zeros(1 << bits, np.float32)
        assert NAT.base.pyadaq_kvt_levels(bits, FFI.from_buffer("float[]", out), len(out)) == len(out)
        assert np.array_equal(out.view(np.uint32), qr.kvt_levels(bits).view(np.uint32))
        lv = out.astype(np.float64)
        assert (np.diff(lv) > 0).all() and np.allclose(lv, -lv[::-1])
        # each level is the mean of a unit Gaussian over its cell (to the float32 the table holds)
        cuts = np.concatenate([[-np.inf], (lv[1:] + lv[:-1]) / 2, [np.inf]])
        pdf = np.array([0.0 if np.isinf(c) else np.exp(-c * c / 2) / np.sqrt(2 * np.pi) for c in cuts])
        cdf = np.array([nd.cdf(c) if np.isfinite(c) else float(c > 0) for c in cuts])
        centroid = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])
        assert np.abs(centroid - lv).max() < 2e-3 * max(1.0, bits / 2), bits
    assert NAT.base.pyadaq_kvt_levels(8, FFI.from_buffer("float[]", np.zeros(256, np.float32)), 256) == -1


def test_scale_codes_are_the_twins():
    """Code e decodes to 2^((e - 128) / 8) (0 for e = 0), in C and in the twin, bit for bit; the
    scales increase with the code, so the search's binary search for the rms's code is sound."""
    twin = qr.kvt_scales()
    out = FFI.new("float *")
    c = np.zeros(256, np.float32)
    for e in range(256):
        assert NAT.base.pyadaq_kvt_scale(e, out) == 0
        c[e] = out[0]
    assert np.array_equal(c.view(np.uint32), twin.view(np.uint32))
    assert c[0] == 0 and c[128] == 1 and c[136] == 2 and c[120] == 0.5 and (np.diff(c) > 0).all()
    assert np.allclose(c[1:], 2.0 ** ((np.arange(1, 256) - 128) / 8), rtol=1e-7, atol=0)
    assert NAT.base.pyadaq_kvt_scale(256, out) == -1 and NAT.base.pyadaq_kvt_scale(-1, out) == -1


@pytest.mark.parametrize("name", ["kvt1", "kvt2", "kvt4s"])
def test_scale_code_search_finds_the_best_code(name):
    """On blocks of Gaussians of sizes across the code range, up to its ends (2^+-15.9, where the
    codes clamp), the C quantizer's code is the best of its 16 trial codes (from 4 below the
    rms's code, found here from the scale table) by the weighted squared error the search
    minimizes, and within 1 % of the best of all 255 codes on average (the error is
    not convex in the scale: a block of 8 large values can prefer a code outside the window)."""
    t = qr.KVT_TYPES[name]
    ct = cache_type(name)
    rng = np.random.default_rng(11)
    size = np.float32(2.0) ** np.concatenate([rng.uniform(-14, 14, 60), [-15.7, -16.5, 15.7, 16.5]]).astype(np.float32)
    x = (rng.standard_normal((64, 64)) * size[:, None]).astype(np.float32)
    q = c_quantize(ct, x.reshape(-1)).reshape(64, -1)
    wt = np.repeat(4.0 ** np.array(t.widths), 8)
    scales = qr.kvt_scales()

    def error(xb, e):  # the block encoded with code e by the format's rule: nearest levels
        d = scales[e]
        y = np.concatenate([qr.kvt_levels(w)[np.searchsorted((qr.kvt_levels(w)[1:] + qr.kvt_levels(w)[:-1]) / 2,
                                                              xb[8 * g:8 * g + 8] / d)] * d if w else np.zeros(8)
                            for g, w in enumerate(t.widths)])
        return float((wt * (xb.astype(np.float64) - y) ** 2).sum())

    ratios = []
    for b in range(64):
        rms = np.sqrt(np.float32((wt * x[b].astype(np.float64) ** 2).sum() / wt.sum()))
        e_rms = max(1, int(np.searchsorted(scales[1:], rms, side="right")))
        window = {min(max(e_rms - 4 + k, 1), 255) for k in range(16)}
        got = float((wt * (x[b].astype(np.float64) - c_dequantize(ct, q[b], 64)) ** 2).sum())
        assert int(q[b][0]) in window
        assert got <= min(error(x[b], e) for e in window) * (1 + 1e-5), (b, int(q[b][0]))
        ratios.append(got / min(error(x[b], e) for e in range(1, 256)))
    assert np.mean(ratios) < 1.01, np.mean(ratios)


def _cases(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    nb = 300
    scales = np.repeat(np.exp(rng.uniform(-12, 12, nb)), 64)
    gauss = (rng.standard_normal(64 * nb) * scales).astype(np.float32)
    special = rng.standard_normal(64 * 8).astype(np.float32)
    special[0:64] = 0
    special[70] = np.nan
    special[130] = np.inf
    special[200] = -np.inf
    special[256:320] = 3e38
    special[320:384] = 1e-40  # denormals
    special[384:448] = 0
    special[400] = 1e-22  # the block's weighted mean square underflows to 0: an all-zero block
    spectrum = (rng.standard_normal((nb, 64)) * np.repeat(2.0 ** -np.arange(8), 8)).astype(np.float32).reshape(-1)
    return {"gauss": gauss, "special": special, "spectrum": spectrum}


@per_type
def test_twin_is_bit_exact(t):
    for name, x in _cases(t.id).items():
        c = c_quantize(t, x)
        assert np.array_equal(c, qr.quantize(t.name, x)), name
        y = c_dequantize(t, c, len(x))
        assert np.array_equal(y.view(np.uint32), qr.dequantize(t.name, c, len(x)).view(np.uint32)), name
        if name == "special":
            assert np.isfinite(y[:256]).all() and (y[:64] == 0).all() and (y[384:448] == 0).all()


@per_type
def test_avx2_dequantization_is_the_reference(t):
    """The AVX2 path (what the registered to_float runs on a CPU with AVX2) gives the scalar
    reference's floats bit for bit, on every case of the twin test."""
    if NAT.base.pyadaq_dequant_impl_name(1) == FFI.NULL:
        pytest.skip("no AVX2 on this CPU or build")
    for name, x in _cases(t.id + 100).items():
        c = c_quantize(t, x)
        out = [np.zeros(len(x), np.float32) for _ in range(2)]
        for impl, y in enumerate(out):
            assert NAT.base.pyadaq_dequantize_impl(t.id, FFI.from_buffer(c), FFI.from_buffer("float[]", y),
                                                   len(x), impl) == 0
        assert np.array_equal(out[0].view(np.uint32), out[1].view(np.uint32)), name
    assert NAT.base.pyadaq_dequantize_impl(t.id, FFI.from_buffer(c), FFI.from_buffer("float[]", out[0]), 63, 1) == -1
    assert NAT.base.pyadaq_dequantize_impl(t.id, FFI.from_buffer(c), FFI.from_buffer("float[]", out[0]), 64, 7) == -2


@per_type
def test_avx2_quantization_is_the_reference(t):
    """The AVX2 quantizer (8 trial scales per register; what the CPU backend's quantize_row runs)
    writes the scalar reference's bytes, on every case of the twin test and on rows whose blocks
    sit at a tie-prone spread of scales; the CPU backend's entry gives the same bytes."""
    if NAT.base.pyadaq_dequant_impl_name(1) == FFI.NULL:
        pytest.skip("no AVX2 on this CPU or build")
    rng = np.random.default_rng(t.id + 7)
    cases = {**_cases(t.id + 200),
             "small-ints": rng.integers(-3, 4, 64 * 200).astype(np.float32),
             "one-hot": np.eye(64, dtype=np.float32).reshape(-1) * 5}
    for name, x in cases.items():
        ref = c_quantize(t, x)
        fast = np.zeros_like(ref)
        assert NAT.base.pyadaq_kvt_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(fast), len(x), 1) == 0
        assert np.array_equal(ref, fast), name
        cpu = np.zeros_like(ref)
        assert NAT.cpu.pyadaq_cpu_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(cpu), len(x)) == 0
        assert np.array_equal(ref, cpu), name
    assert NAT.base.pyadaq_kvt_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(fast), 32, 1) == -1
    assert NAT.base.pyadaq_kvt_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(fast), 64, 7) == -2
    assert NAT.base.pyadaq_kvt_quantize(2, FFI.from_buffer("float[]", x), FFI.from_buffer(fast), 64, 0) == -1


@per_type
def test_layout_by_hand(t):
    """The scale code, then per group g of 8 values widths[g] bit planes; value = d * levels[index]."""
    s = qr.KVT_TYPES[t.name]
    assert t.block_size == 64 and t.type_size == 1 + sum(s.widths)
    rng = np.random.default_rng(3)
    idx = [rng.integers(0, 1 << w, 8) if w else np.zeros(8, int) for w in s.widths]
    block = [126]  # scale 2^(-2/8)
    for w, ix in zip(s.widths, idx):
        for k in range(w):
            block.append(sum(((int(v) >> k) & 1) << i for i, v in enumerate(ix)))
    y = c_dequantize(t, np.array(block, np.uint8), 64)
    want = np.concatenate([qr.kvt_levels(w)[ix] if w else np.zeros(8, np.float32) for w, ix in zip(s.widths, idx)])
    assert np.array_equal(y, (want * np.float32(2.0 ** -0.25)).astype(np.float32))


def test_profiles_beat_flat_bits_on_their_spectrum():
    """Values whose variance falls by 4x per group (what the profiles were made for): the error in
    model coordinates (each group weighted by its variance) is below that of a flat type with the
    same bits, kvq2 / kvq3 / q4_0-like (Lloyd-Max Gaussian at 2, 3, 4 bits per value plus scale)."""
    rng = np.random.default_rng(9)
    sd = np.repeat(2.0 ** -np.arange(8), 8)
    white = rng.standard_normal((4000, 64)).astype(np.float32)
    x = white * sd  # model coordinates
    for t, flat_bits in (("kvt2", 2), ("kvt3", 3), ("kvt4", 4)):
        # the type stores whitened values; its error in model coordinates is scaled back
        y = qr.dequantize(t, qr.quantize(t, white.reshape(-1)), white.size).reshape(white.shape)
        err = ((y - white) * sd) ** 2
        flat = qr.dequantize("kvq2" if flat_bits == 2 else "kvq3", qr.quantize("kvq2" if flat_bits == 2 else "kvq3",
                             x.reshape(-1)), x.size).reshape(x.shape) if flat_bits < 4 else None
        if flat is not None:
            assert err.mean() < ((flat - x) ** 2).mean(), t
        # and below the Gaussian rate-distortion bound of flat allocation at those bits (D = 4^-b)
        assert err.mean() < (sd ** 2).mean() * 4.0 ** -flat_bits, t


@per_type
@pytest.mark.parametrize("n", [256, 640])  # 640: 10 blocks, dequantized 8 and 2 at a time
def test_vec_dot_f32(t, n):
    """The CPU dot product takes the query side in float (vec_dot_type F32): the dequantized
    row times y, here against float64."""
    rng = np.random.default_rng(t.id + n)
    x = rng.standard_normal(n).astype(np.float32)
    # a query of a whitened key's spectrum: q8_0 (one scale per 32 values) would zero most of it
    y = (rng.standard_normal(n) * np.geomspace(1.0, 1e-3, n)).astype(np.float32)
    qx = c_quantize(t, x)
    want = float(np.dot(c_dequantize(t, qx, n).astype(np.float64), y.astype(np.float64)))
    out = FFI.new("float *")
    assert NAT.cpu.pyadaq_cpu_vec_dot_f32(t.id, n, FFI.from_buffer(qx), FFI.from_buffer("float[]", y), out) == 0
    assert abs(out[0] - want) < 1e-5 * max(1e-3, float(np.abs(c_dequantize(t, qx, n) * y).sum()))
    assert NAT.cpu.pyadaq_cpu_vec_dot_f32(t.id, n - 32, FFI.from_buffer(qx), FFI.from_buffer("float[]", y), out) == -1
    assert NAT.cpu.pyadaq_cpu_vec_dot_f32(8, n, FFI.from_buffer(qx), FFI.from_buffer("float[]", y), out) == -1  # q8_0
    spare = np.zeros_like(qx)
    assert NAT.cpu.pyadaq_cpu_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(spare), 32) == -1


def test_calibrated_types_need_a_calibration(tiny_model):
    from pyadaq.runtime.context import Context, Model

    assert all(t.calibrated for t in KVT) and not cache_type("kvq2").calibrated
    path = tiny_model(arch="llama", head_dim=64, n_head_kv=2)
    m = Model(str(path))
    try:
        with pytest.raises(ValueError, match="needs one"):
            Context(m, "q8_0", "kvt2", 256, 1)
        with pytest.raises(ValueError, match="needs one"):
            Context(m, "f16", "f16", 256, 1, layer_types=(["kvt3s", "f16"], ["f16", "f16"]))
    finally:
        m.close()
    with pytest.raises(ValueError, match="needs one"):
        pyadaq.Llama(path, cache_type_k="kvt4s", cache_type_v="kvq2", n_ctx=128)


def test_calibrated_context_with_kvt_types(tiny_model):
    """On a tiny llama, K and V in kvt types with the model's calibration: finite, close to the
    exact logits as a 2-4 bit cache is, and a K-shift keeps them so."""
    from pyadaq.eval.calibration import calibrate
    from pyadaq.eval.metrics import token_kl
    from pyadaq.runtime.context import Context, Model

    path = tiny_model(arch="llama", head_dim=128, n_head_kv=2, dtype="f32")
    text = " ".join(f"Sentence number {i} talks about the weather and the {i % 9} ships." for i in range(300))
    cal = calibrate(path, text, n_ctx=256, n_chunks=2, n_threads=2, progress=False)
    m = Model(str(path))
    try:
        toks = m.tokenize(text)[:256]
        exact = Context(m, "f32", "f32", 256, 2, flash_attn=False).logits(toks, 0)
        for k, v in (("kvt4s", "kvt4"), ("kvt3s", "kvt3"), ("kvt2s", "q8_0"), ("q8_0", "kvt2")):
            c = Context(m, k, v, 256, 2, kv_calibration=cal)
            got = c.logits(toks, 0)
            c.close()
            kl = float(token_kl(exact, got).mean())
            assert np.isfinite(got).all() and kl < 0.5, (k, v, kl)
        c = Context(m, "kvt3s", "kvt3", 256, 2, kv_calibration=cal)
        try:
            import pyadaq as _p

            L = _p.native().llama_cpp
            mem = L.llama_get_memory(c.ptr)
            c.decode(toks[:128], 0)
            assert L.llama_memory_seq_rm(mem, 0, 0, 64)
            L.llama_memory_seq_add(mem, 0, 64, -1, -64)
            c.decode(toks[128:160], 64, logits_from=0)
            assert np.isfinite(np.stack([c.logits_at(i) for i in range(32)])).all()
        finally:
            c.close()
    finally:
        m.close()


def test_formats_fingerprint_follows_the_formats(monkeypatch):
    """What planner caches and saved states are keyed by: stable, and another value when a
    format constant of the twin differs (here the search window)."""
    from pyadaq.types import formats_fingerprint

    fp = formats_fingerprint()
    assert len(fp) == 16 and fp == formats_fingerprint()
    formats_fingerprint.cache_clear()
    monkeypatch.setattr(qr, "KVT_SEARCH_BELOW", qr.KVT_SEARCH_BELOW + 1)
    try:
        assert formats_fingerprint() != fp
    finally:
        formats_fingerprint.cache_clear()
