"""The row-trellis KV-cache types kvt2r and kvt3r (native/src/pyadaq-kvt.c, the spec): the C
trellis tables are the twin's; the numpy twin (pyadaq/quants_ref.py) writes the C reference's
bytes and decodes its floats, on Gaussian rows of every scale, zero rows and sub-blocks, NaN,
infinities and huge values; the CPU backend's quantizer (the AVX2 scale search) writes the same
bytes; the layout decodes as written by hand, the trellis windows wrapping to each stream's end;
coded by the trellis, a profile's error is below the same profile coded value by value (kvt's
scalar levels, same scales); the dot product with a float row; a calibrated context runs them
(K-shift included), and a head size that is not a multiple of 256 is refused before native code."""

from __future__ import annotations

import numpy as np
import pytest
from test_kvt import c_dequantize, c_quantize

import pyadaq
from pyadaq import quants_ref as qr
from pyadaq.kvt_trellis_tables import STATE_BITS
from pyadaq.types import cache_type

NAT = pyadaq.native()
FFI = NAT.ffi
KVTR = [cache_type(name) for name in qr.KVTR_TYPES]
per_type = pytest.mark.parametrize("t", KVTR, ids=[t.name for t in KVTR])


def c_quantize_impl(t, x: np.ndarray, impl: int) -> np.ndarray:
    """x through pyadaq_kvt_quantize with an explicit implementation (0 scalar, 1 AVX2)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(len(x) // t.block_size * t.type_size, dtype=np.uint8)
    assert NAT.base.pyadaq_kvt_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(out), len(x), impl) == 0
    return out


def test_sizes_and_tables():
    for t in KVTR:
        s = qr.KVTR_TYPES[t.name]
        assert t.calibrated and t.block_size == 256 and t.type_size == 4 * (1 + sum(s.widths))
    assert cache_type("kvt2r").bits_per_value == cache_type("kvt2").bits_per_value == 2.5
    assert cache_type("kvt3r").bits_per_value == cache_type("kvt3").bits_per_value == 3.5
    for bits in range(1, qr.KVTR_MAX_TRELLIS + 1):
        out = np.zeros(4096, np.float32)
        size = NAT.base.pyadaq_kvtr_table(bits, FFI.from_buffer("float[]", out), len(out))
        assert size == 1 << (bits + STATE_BITS)
        assert np.array_equal(out[:size].view(np.uint32), qr.kvtr_table(bits).view(np.uint32))
        # a trained table: every entry a different value, spread like a unit Gaussian's
        assert len(np.unique(out[:size])) == size and 0.7 < float(np.std(out[:size])) < 1.1
    small = np.zeros(8, np.float32)
    assert NAT.base.pyadaq_kvtr_table(4, FFI.from_buffer("float[]", small), 8) == -1
    assert NAT.base.pyadaq_kvtr_table(1, FFI.from_buffer("float[]", small), 8) == -1  # too small for 128


def _rows(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((24, 256)).astype(np.float32)
    scale = np.float32(2.0) ** rng.uniform(-12, 12, (24, 1)).astype(np.float32)
    cases = {"gaussian": g.reshape(-1), "scaled": (g * scale).reshape(-1)}
    z = g[:4].copy()
    z[0] = 0
    z[1, 64:128] = 0  # one sub-block of zeros (scale code 0)
    z[2, :192] = 0
    z[3, ::7] = 0
    cases["zeros"] = z.reshape(-1)
    odd = g[:4].copy()
    odd[0, 5] = np.nan
    odd[1, 70] = np.inf
    odd[2, 200] = -np.inf
    odd[3, 3] = 3e38
    cases["non-finite"] = odd.reshape(-1)
    tiny = g[:2].copy() * np.float32(1e-20)
    tiny[1, 0] = np.float32(1e-22)  # a sub-block whose mean square underflows
    tiny[1, 1:64] = 0
    cases["tiny"] = tiny.reshape(-1)
    return cases


@per_type
def test_twin_is_the_reference(t):
    for name, x in _rows(t.id).items():
        c = c_quantize(t, x)
        twin = qr.quantize(t.name, x)
        assert np.array_equal(c, twin), name
        y = c_dequantize(t, c, len(x))
        assert np.array_equal(y.view(np.uint32), qr.dequantize(t.name, c, len(x)).view(np.uint32)), name
        assert np.isfinite(y).all(), name


@per_type
def test_cpu_quantizer_is_the_reference(t):
    """The CPU backend's quantizer (the AVX2 scale search where the CPU has it) writes the
    reference's bytes; both decodings give the reference's floats; wrong sizes are refused."""
    for name, x in _rows(t.id + 100).items():
        ref = c_quantize(t, x)
        cpu = np.zeros_like(ref)
        assert NAT.cpu.pyadaq_cpu_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(cpu), len(x)) == 0
        assert np.array_equal(ref, cpu), name
        for impl in (0, 1):
            if impl == 1 and NAT.base.pyadaq_dequant_impl_name(1) == FFI.NULL:
                continue
            assert np.array_equal(ref, c_quantize_impl(t, x, impl)), (name, impl)
            y = np.zeros(len(x), np.float32)
            assert NAT.base.pyadaq_dequantize_impl(t.id, FFI.from_buffer(ref), FFI.from_buffer("float[]", y),
                                                   len(x), impl) == 0
            assert np.array_equal(y, c_dequantize(t, ref, len(x))), (name, impl)
    x = np.ones(256, np.float32)
    buf = np.zeros(t.type_size, np.uint8)
    assert NAT.base.pyadaq_kvt_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(buf), 64, 0) == -1
    assert NAT.base.pyadaq_kvt_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(buf), 256, 7) == -2
    assert NAT.base.pyadaq_quantize_ref(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(buf), 128) == -1
    assert NAT.base.pyadaq_dequantize(t.id, FFI.from_buffer(buf), FFI.from_buffer("float[]", x), 192) == -1
    assert NAT.cpu.pyadaq_cpu_quantize(t.id, FFI.from_buffer("float[]", x), FFI.from_buffer(buf), 64) == -1


@per_type
def test_bad_input_is_refused(t):
    """Lengths that are not whole rows, short buffers and tables of other widths: a ValueError
    from the twin, an error code from C; nothing written past the buffer."""
    x = np.ones(128, np.float32)
    for n in (64, 128, 320):
        with pytest.raises(ValueError, match="block size 256"):
            qr.quantize(t.name, np.ones(n, np.float32))
        with pytest.raises(ValueError, match="block size 256"):
            qr.dequantize(t.name, np.zeros(2 * t.type_size, np.uint8), n)
    with pytest.raises(ValueError, match="need"):
        qr.dequantize(t.name, np.zeros(t.type_size - 1, np.uint8), 256)
    for bits in (0, 4):
        with pytest.raises(ValueError, match="trellis tables exist"):
            qr.kvtr_table(bits)
    out = np.zeros(4096, np.float32)
    for bits in (0, -1, 4, 7):
        assert NAT.base.pyadaq_kvtr_table(bits, FFI.from_buffer("float[]", out), len(out)) == -1
    buf = np.zeros(t.type_size, np.uint8)
    y = np.zeros(256, np.float32)
    assert NAT.base.pyadaq_dequantize_impl(t.id, FFI.from_buffer(buf), FFI.from_buffer("float[]", y), 256, 7) == -2
    assert NAT.base.pyadaq_dequantize_impl(t.id, FFI.from_buffer(buf), FFI.from_buffer("float[]", y), 128, 0) == -1
    assert NAT.cpu.pyadaq_cpu_vec_dot_f32(t.id, 128, FFI.from_buffer(buf), FFI.from_buffer("float[]", x),
                                          FFI.new("float *")) == -1


def _read(bits: np.ndarray, at: int, n: int) -> int:
    return sum(int(bits[at + i]) << i for i in range(n))


@per_type
def test_layout_by_hand(t):
    """Four scale codes, then per width from the widest a little-endian stream of that width's
    values in row order; a trellis value is d * table[its S earlier stream bits (wrapping) | its
    own bits << S], a wider one d * kvt's level at its bits."""
    s = qr.KVTR_TYPES[t.name]
    rng = np.random.default_rng(5)
    codes = np.array([126, 128, 0, 131], np.uint8)  # sub-block 2 has scale 0
    payload = rng.integers(0, 256, t.type_size - 4).astype(np.uint8)
    block = np.concatenate([codes, payload])
    y = c_dequantize(t, block, 256)
    bits = np.unpackbits(payload, bitorder="little")
    d = qr.kvt_scales()[codes]
    want = np.zeros(256, np.float32)
    at = 0
    for k in range(7, 0, -1):
        pos = [64 * b + 8 * g + i for b in range(4) for g in range(8) if s.widths[g] == k for i in range(8)]
        n_bits = len(pos) * k
        for j, p in enumerate(pos):
            own = _read(bits, at + j * k, k)
            if k > qr.KVTR_MAX_TRELLIS:
                lv = qr.kvt_levels(k)[own]
            else:
                state = sum(int(bits[at + (j * k - STATE_BITS + i) % n_bits]) << i for i in range(STATE_BITS))
                lv = qr.kvtr_table(k)[state | (own << STATE_BITS)]
            want[p] = np.float32(d[p // 64] * lv)
        at += n_bits
    assert at == 8 * payload.size
    assert np.array_equal(y, want)
    assert (y[128:192] == 0).all()
    for impl in (0, 1):  # the reference and the AVX2 decoder, each on its own
        if impl == 1 and NAT.base.pyadaq_dequant_impl_name(1) == FFI.NULL:
            continue
        got = np.zeros(256, np.float32)
        assert NAT.base.pyadaq_dequantize_impl(t.id, FFI.from_buffer(block), FFI.from_buffer("float[]", got), 256,
                                               impl) == 0
        assert np.array_equal(got, want), impl
    assert np.array_equal(qr.dequantize(t.name, block, 256), want)


@per_type
def test_trellis_beats_the_same_profile_value_by_value(t):
    """On unit Gaussian rows (what the whitened cache holds), the row's error weighted 4^width per
    value (the weight kvt's scale search uses: a direction given one bit more carries four times
    the variance) is well below that of the same profile's values rounded one by one to kvt's
    levels with the same scales; the wider, scalar-coded positions are identical."""
    s = qr.KVTR_TYPES[t.name]
    scalar = qr.KvtSpec("same-profile", 0, s.widths)
    rng = np.random.default_rng(17)
    x = rng.standard_normal((300, 256)).astype(np.float32)
    got = qr.dequantize(t.name, qr.quantize(t.name, x.reshape(-1)), x.size).reshape(x.shape)
    ref = qr.dequantize(scalar, qr.quantize(scalar, x.reshape(-1)), x.size).reshape(x.shape)
    w = np.tile(np.repeat(4.0 ** np.array(s.widths), 8), 4)
    wide = np.tile(np.repeat(np.array(s.widths) > qr.KVTR_MAX_TRELLIS, 8), 4)
    assert np.array_equal(got[:, wide], ref[:, wide])
    ratio = float((w * (got - x) ** 2).sum() / (w * (ref - x) ** 2).sum())
    narrow = ~wide
    gain_db = 10 * np.log10(((ref - x)[:, narrow] ** 2).mean() / ((got - x)[:, narrow] ** 2).mean())
    assert ratio < 0.9 and gain_db > 0.5, (ratio, gain_db)


@per_type
@pytest.mark.parametrize("n", [256, 768])  # 768: three rows, decoded two and one at a time
def test_vec_dot_f32(t, n):
    rng = np.random.default_rng(t.id + n)
    x = rng.standard_normal(n).astype(np.float32)
    y = (rng.standard_normal(n) * np.geomspace(1.0, 1e-3, n)).astype(np.float32)
    qx = c_quantize(t, x)
    deq = c_dequantize(t, qx, n)
    want = float(np.dot(deq.astype(np.float64), y.astype(np.float64)))
    out = FFI.new("float *")
    assert NAT.cpu.pyadaq_cpu_vec_dot_f32(t.id, n, FFI.from_buffer(qx), FFI.from_buffer("float[]", y), out) == 0
    assert abs(out[0] - want) < 1e-5 * max(1e-3, float(np.abs(deq * y).sum()))
    assert NAT.cpu.pyadaq_cpu_vec_dot_f32(t.id, n - 64, FFI.from_buffer(qx), FFI.from_buffer("float[]", y), out) == -1


def test_head_size_must_be_a_multiple_of_256(tiny_model):
    from pyadaq.eval.calibration import calibrate

    path = tiny_model(arch="llama", head_dim=128, n_head_kv=2, dtype="f32")
    text = " ".join(f"Line {i} of a short text about {i % 7} rivers." for i in range(200))
    cal = calibrate(path, text, n_ctx=128, n_chunks=1, n_threads=2, progress=False)
    with pytest.raises(ValueError, match="kvt2r needs a head size that is a multiple of 256, not 128"):
        pyadaq.Llama(path, cache_type_k="q8_0", cache_type_v="kvt2r", n_ctx=128, kv_calibration=cal)


def test_calibrated_context_with_kvtr_types(tiny_model):
    """On a tiny llama with two KV heads of 256 (rows of two blocks): the row types with the
    model's calibration cost about what the kvt types of the same bits cost against the exact
    logits (a broken row decoder would cost far more), through the flash-attention kernels; and
    after a K-shift of kvt3r keys the logits are as close to the exact shift's as with kvt3 keys."""
    from test_kv_transform import _shifted

    from pyadaq.eval.calibration import calibrate
    from pyadaq.eval.metrics import token_kl
    from pyadaq.runtime.context import Context, Model

    path = tiny_model(arch="llama", head_dim=256, n_head_kv=2, dtype="f32")
    text = " ".join(f"Sentence number {i} talks about the weather and the {i % 9} ships." for i in range(300))
    cal = calibrate(path, text, n_ctx=256, n_chunks=2, n_threads=2, progress=False)
    m = Model(str(path))
    try:
        toks = m.tokenize(text)[:256]
        exact = Context(m, "f32", "f32", 256, 2, flash_attn=False).logits(toks, 0)
        kl = {}
        for k, v in (("q8_0", "kvt2r"), ("q8_0", "kvt2"), ("kvt3r", "kvt3r"), ("kvt3s", "kvt3")):
            tiled = NAT.cpu.pyadaq_cpu_fa_tiled()
            c = Context(m, k, v, 256, 2, kv_calibration=cal)
            try:
                got = c.logits(toks, 0)
            finally:
                c.close()
            assert NAT.cpu.pyadaq_cpu_fa_tiled() > tiled, (k, v)
            kl[k, v] = float(token_kl(exact, got).mean())
            assert np.isfinite(got).all(), (k, v)
        assert kl["q8_0", "kvt2r"] < 1.5 * kl["q8_0", "kvt2"] + 1e-4, kl
        assert kl["kvt3r", "kvt3r"] < 1.5 * kl["kvt3s", "kvt3"] + 1e-4, kl
        x = np.asarray(m.tokenize(text)[:160], np.int32)
        shift_exact = _shifted(m, "f32", "f32", x)
        shift_r = float(token_kl(shift_exact, _shifted(m, "kvt3r", "kvt2r", x, cal=cal, flash_attn=True)).mean())
        shift_t = float(token_kl(shift_exact, _shifted(m, "kvt3", "kvt2", x, cal=cal, flash_attn=True)).mean())
        assert np.isfinite(shift_r) and shift_r < 1.5 * shift_t + 1e-4, (shift_r, shift_t)
    finally:
        m.close()
