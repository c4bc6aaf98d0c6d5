"""Kernels of pyadaq's KV-cache types: the C reference, its numpy twin, and the CPU fast paths.

The C reference (native/src/pyadaq-quants.c) is the specification. These tests check that

* the quantization error of every type stays where it was measured (Gaussian and heavy-tailed
  data), and that the MSE scale search beats the absmax baseline;
* pyadaq/quants_ref.py (the numpy twin) produces the same bytes and floats as the C reference,
  bit for bit, on ordinary and on extreme inputs, and its table of type parameters is the
  native one;
* the CPU backend's quantize and its K.Q dot product with q8_0 (generic C and SIMD) agree with
  the reference and with a numpy dot product;
* zeros, NaN/inf inputs and bad lengths have defined results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import pyadaq
from pyadaq import quants_ref as qr

NAT = pyadaq.native()
FFI = NAT.ffi

# the block-scaled codebook types; the transform-coded kvt* types have their own tests (test_kvt.py)
TYPES = [t for t in pyadaq.cache_types(research=True) if t.origin == "pyadaq" and not t.calibrated]
GGML_TYPE_Q8_0 = 8
QK8_0 = 32
Q8_0_SIZE = 2 + QK8_0


def per_type(f):
    return pytest.mark.parametrize("t", TYPES, ids=[t.name for t in TYPES])(f)


# ---------------------------------------------------------------------------------------------
# Helpers: the C entry points on numpy arrays


def _fptr(a: np.ndarray):
    assert a.dtype == np.float32 and a.flags.c_contiguous
    return FFI.from_buffer("float[]", a)


def c_quantize(t, x: np.ndarray, entry: str = "ref") -> np.ndarray:
    """Bytes written by pyadaq_quantize_ref (entry="ref") or the CPU backend's from_float ("cpu")."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(len(x) // t.block_size * t.type_size, dtype=np.uint8)
    fn = NAT.base.pyadaq_quantize_ref if entry == "ref" else NAT.cpu.pyadaq_cpu_quantize
    assert fn(t.id, _fptr(x), FFI.from_buffer(out), len(x)) == 0
    return out


# dequantization implementations (native/src/pyadaq-quants.h: enum pyadaq_impl)
IMPL_SCALAR, IMPL_AVX2, IMPL_BEST = 0, 1, -1


def c_dequantize(t, data: np.ndarray, n: int, impl: int = IMPL_SCALAR) -> np.ndarray:
    """Floats from pyadaq_dequantize_impl: the scalar reference by default, IMPL_AVX2, or
    IMPL_BEST (what the registered to_float runs on this CPU)."""
    y = np.zeros(n, dtype=np.float32)
    rc = NAT.base.pyadaq_dequantize_impl(t.id, FFI.from_buffer(np.ascontiguousarray(data)), _fptr(y), n, impl)
    assert rc == 0, f"pyadaq_dequantize_impl({t.name}, impl={impl}) returned {rc}"
    return y


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def expected_simd() -> str | None:
    """The SIMD path pyadaq implements for this CPU (AVX2 on x86-64 with AVX2), or None."""
    import platform

    if platform.machine().lower() in ("x86_64", "amd64") and "avx2" in _cpu_flags():
        return "avx2"
    return None


def require_simd() -> str:
    """The SIMD path a comparison with the generic one needs. On a CPU pyadaq has a SIMD path
    for, a build without it fails the test (comparing the generic path with itself would pass
    and prove nothing); on another CPU the comparison has nothing to compare and is skipped."""
    want = expected_simd()
    if want is None:
        pytest.skip("this CPU has no SIMD path that pyadaq implements (AVX2 on x86-64)")
    return want


def c_quantize_q8_0(y: np.ndarray) -> np.ndarray:
    y = np.ascontiguousarray(y, dtype=np.float32)
    out = np.zeros(len(y) // QK8_0 * Q8_0_SIZE, dtype=np.uint8)
    assert NAT.cpu.pyadaq_cpu_quantize_q8_0(_fptr(y), FFI.from_buffer(out), len(y)) == 0
    return out


def decode_q8_0(data: np.ndarray) -> np.ndarray:
    blocks = data.reshape(-1, Q8_0_SIZE)
    d = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)
    return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)


def c_vec_dot(t, n: int, qx: np.ndarray, qy: np.ndarray, impl: int) -> float:
    out = FFI.new("float *")
    assert NAT.cpu.pyadaq_cpu_vec_dot_q8_0(t.id, n, FFI.from_buffer(qx), FFI.from_buffer(qy), impl, out) == 0
    return float(out[0])


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns (so NaN == NaN and 0.0 != -0.0)."""
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def rel_rms(x: np.ndarray, y: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(np.linalg.norm(x64 - y) / np.linalg.norm(x64))


def d_field(data: np.ndarray, t) -> np.ndarray:
    """The fp16 scale of every block, as raw uint16."""
    return np.ascontiguousarray(data.reshape(-1, t.type_size)[:, :2]).view("<u2").reshape(-1)


# ---------------------------------------------------------------------------------------------
# Test data

N_ROUNDTRIP = 1 << 18  # 8192 blocks of 32, 4096 of 64


def roundtrip_data(kind: str) -> np.ndarray:
    """The same data for every type (so that types can be compared with each other)."""
    rng = np.random.default_rng({"gauss": 1, "t3": 2, "outliers": 3}[kind])
    if kind == "gauss":
        return rng.standard_normal(N_ROUNDTRIP).astype(np.float32)
    if kind == "t3":
        return rng.standard_t(3, N_ROUNDTRIP).astype(np.float32)
    x = rng.standard_normal(N_ROUNDTRIP)
    pos = rng.choice(N_ROUNDTRIP, N_ROUNDTRIP // 1000, replace=False)  # 0.1% outliers of 10-30 sigma
    x[pos] = rng.choice([-1.0, 1.0], len(pos)) * rng.uniform(10, 30, len(pos))
    return x.astype(np.float32)


def bitexact_cases(t, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for the C-vs-twin comparison, each a whole number of blocks."""
    qk = t.block_size
    rng = np.random.default_rng(seed + t.id)

    def blocks(nb: int) -> int:
        return nb * qk

    one = np.zeros((512, qk), dtype=np.float32)  # one nonzero per block, magnitudes 1e-40..1e4
    one[np.arange(512), rng.integers(0, qk, 512)] = (
        rng.choice([-1.0, 1.0], 512) * 10.0 ** rng.uniform(-40, 4, 512)
    ).astype(np.float32)
    consts = np.array([1, -1, 0.5, -7.25, 1e-3, 3e4, -1e-30, 65504, 1e-42], dtype=np.float32)
    return {
        "gauss": rng.standard_normal(blocks(2048)).astype(np.float32),
        "t3": rng.standard_t(3, blocks(2048)).astype(np.float32),
        "t1": rng.standard_t(1, blocks(512)).astype(np.float32),
        "sparse": np.where(rng.random(blocks(512)) < 0.1, 3.0, 0.1).astype(np.float32)
        * rng.standard_normal(blocks(512)).astype(np.float32),
        "tiny": (1e-6 * rng.standard_normal(blocks(512))).astype(np.float32),
        "huge": (1e4 * rng.standard_normal(blocks(512))).astype(np.float32),
        "fp16_overflow": (3e5 * rng.standard_normal(blocks(64))).astype(np.float32),  # d = inf
        "subnormal": (1e-41 * rng.standard_normal(blocks(64))).astype(np.float32),  # 1/amax = inf
        "integers": rng.integers(-8, 9, blocks(512)).astype(np.float32),  # exact midpoint ties
        "constant": np.repeat(consts, qk),
        "one_nonzero": one.reshape(-1),
    }


# ---------------------------------------------------------------------------------------------
# 1. Quantization error
#
# Relative RMS error ||x - deq(q(x))|| / ||x|| measured on roundtrip_data (seeded, 2^18 values):
#
#   type        gauss   t3      gauss+0.1% outliers
#   kvq2        0.3246  0.5182  0.4990
#   kvq3        0.1601  0.2628  0.2488
#   kvq2_u32m   0.4563  0.9876  0.9838
#   kvq2_u32    0.3283  0.5392  0.5149
#   kvq2_n64    0.3348  0.5555  0.5341
#   kvq3_u32m   0.1946  0.3777  0.3728
#   kvq3_u32    0.1713  0.3157  0.3034
#   kvq3_n64    0.1716  0.3162  0.3048
#
# The bounds below are these figures plus 5% (Gaussian; the spread over seeds is ~0.3%) or 10%
# (heavy-tailed; ~5% spread over seeds). Known quantizer bugs planted in the C reference's
# blocks break the Gaussian bounds; see test_error_bounds_catch_a_broken_quantizer.

ERROR_BOUNDS = {  # type: (gauss, t3, outliers)
    "kvq2": (0.341, 0.571, 0.549),
    "kvq3": (0.169, 0.290, 0.274),
    "kvq2_u32m": (0.480, 1.087, 1.083),
    "kvq2_u32": (0.345, 0.594, 0.567),
    "kvq2_n64": (0.352, 0.612, 0.588),
    "kvq3_u32m": (0.205, 0.416, 0.411),
    "kvq3_u32": (0.180, 0.348, 0.334),
    "kvq3_n64": (0.181, 0.348, 0.336),
}
KINDS = ("gauss", "t3", "outliers")


@pytest.fixture(scope="module")
def roundtrip_errors() -> dict[tuple[str, str], float]:
    out = {}
    for kind in KINDS:
        x = roundtrip_data(kind)
        for t in TYPES:
            out[t.name, kind] = rel_rms(x, c_dequantize(t, c_quantize(t, x), len(x)))
    return out


def test_every_type_has_bounds():
    assert set(ERROR_BOUNDS) == {t.name for t in TYPES}


@per_type
@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_error_bound(t, kind, roundtrip_errors):
    err = roundtrip_errors[t.name, kind]
    bound = ERROR_BOUNDS[t.name][KINDS.index(kind)]
    assert err < bound, f"{t.name} on {kind}: relative RMS error {err:.4f} >= {bound}"
    # and the error is that of a real quantizer of that many bits, not of a broken one
    assert err > 0.01


@per_type
def test_mse_rule_beats_absmax_on_gaussian(t, roundtrip_errors):
    spec = qr.spec(t.name)
    if spec.rule != qr.MSE:
        pytest.skip("absmax-rule type: the baseline itself")
    baseline = next(s for s in qr.TYPES.values() if s.rule == qr.ABSMAX and s.bits == spec.bits)
    ours, theirs = roundtrip_errors[t.name, "gauss"], roundtrip_errors[baseline.name, "gauss"]
    assert ours < 0.95 * theirs, f"{t.name} {ours:.4f} vs absmax {baseline.name} {theirs:.4f}"


def test_more_bits_less_error(roundtrip_errors):
    for kind in KINDS:
        assert max(roundtrip_errors[s, kind] for s in qr.TYPES if qr.TYPES[s].bits == 3) < min(
            roundtrip_errors[s, kind] for s in qr.TYPES if qr.TYPES[s].bits == 2
        )


def repack(t, idx: np.ndarray, d16: np.ndarray) -> np.ndarray:
    """Blocks from level indices (nb, QK) and fp16 scales (nb,), by the layout in pyadaq-quants.h."""
    spec = qr.spec(t.name)
    nb, qk = idx.shape
    out = np.zeros((nb, t.type_size), dtype=np.uint8)
    out[:, :2] = np.ascontiguousarray(d16, dtype="<f2").view(np.uint8).reshape(nb, 2)
    g = idx.astype(np.uint8).reshape(nb, qk // 32, 4, 8)  # value 32*g + 8*k + i: [g, k, i]
    out[:, 2:2 + qk // 4] = np.bitwise_or.reduce((g & 3) << (2 * np.arange(4, dtype=np.uint8))[:, None],
                                                 axis=2).reshape(nb, qk // 4)
    if spec.bits == 3:
        out[:, 2 + qk // 4:] = np.bitwise_or.reduce(((g >> 2) & 1) << np.arange(8, dtype=np.uint8),
                                                    axis=3).reshape(nb, qk // 8)
    return out.reshape(-1)


def plant_bug(t, x: np.ndarray, q: np.ndarray, bug: str) -> np.ndarray:
    """The C reference's blocks q of x as a quantizer with a known bug would have written them."""
    spec = qr.spec(t.name)
    idx, d16 = qr.indices(spec, q, len(x))
    top = len(spec.levels) - 1
    if bug == "absmax_scale":  # the scale search and its least-squares fit left out
        d16 = (np.abs(x.reshape(-1, t.block_size)).max(axis=1) / np.float32(spec.levels[-1])).astype("<f2")
    elif bug == "scale_15pct":  # a scale 15% too large (a wrong fit; the 2-bit bounds let 10% through)
        d16 = (d16.astype(np.float32) * np.float32(1.15)).astype("<f2")
    elif bug == "outer_levels_lost":  # nearest_level searching one midpoint too few at each end
        idx = np.clip(idx, 1, top - 1)
    else:
        raise ValueError(bug)
    return repack(t, idx, d16)


BUGS = ("absmax_scale", "scale_15pct", "outer_levels_lost")


@per_type
def test_error_bounds_catch_a_broken_quantizer(t):
    """The Gaussian bound is tight enough to notice known quantizer bugs, measured on the C
    reference's own blocks decoded by the C reference: each bug planted in C's blocks breaks
    it (the repacking itself changes nothing)."""
    x = roundtrip_data("gauss")[: 1 << 16]
    q = c_quantize(t, x)
    bound = ERROR_BOUNDS[t.name][0]
    assert np.array_equal(repack(t, *qr.indices(t.name, q, len(x))), q)
    good = rel_rms(x, c_dequantize(t, q, len(x)))
    assert good < bound
    for bug in BUGS:
        if bug == "absmax_scale" and qr.spec(t.name).rule != qr.MSE:
            continue  # that is the absmax rule's own scale
        broken = rel_rms(x, c_dequantize(t, plant_bug(t, x, q, bug), len(x)))
        assert broken > bound, f"{t.name}: {bug} gives {broken:.4f}, within the bound {bound}"


# ---------------------------------------------------------------------------------------------
# 2. The numpy twin's table is the native one


@per_type
def test_twin_table_matches_native_sizes(t):
    spec = qr.spec(t.id)
    assert spec is qr.spec(t.name)
    assert spec.name == t.name and spec.id == t.id
    assert spec.block_size == t.block_size == NAT.base.ggml_blck_size(t.id)
    assert spec.type_size == t.type_size == NAT.base.ggml_type_size(t.id)
    assert NAT.base.ggml_row_size(t.id, 4 * spec.block_size) == 4 * spec.type_size
    assert len(spec.levels) == 1 << spec.bits
    assert list(spec.levels) == sorted(spec.levels) and all(-128 < v < 128 for v in spec.levels)


def test_twin_table_covers_exactly_the_native_types():
    assert {(t.name, t.id) for t in TYPES} == {(s.name, s.id) for s in qr.TYPES.values()}
    for tid in (0, 1, 2, 8, 20, 42, 99, 117):
        assert not NAT.base.pyadaq_is_pyadaq_type(tid)
    for s in [*qr.TYPES.values(), *qr.KVT_TYPES.values(), *qr.KVTR_TYPES.values()]:
        assert NAT.base.pyadaq_is_pyadaq_type(s.id)


def pack_by_hand(spec, idx: np.ndarray, d16: int) -> np.ndarray:
    """One block from level indices, written with scalar loops from the layout in pyadaq-quants.h."""
    qk = spec.block_size
    out = np.zeros(spec.type_size, dtype=np.uint8)
    out[0], out[1] = d16 & 0xFF, d16 >> 8
    qs, qh = 2, 2 + qk // 4
    for j in range(qk):
        g, jj = divmod(j, 32)
        out[qs + 8 * g + jj % 8] |= (int(idx[j]) & 3) << (2 * (jj // 8))
        if spec.bits == 3:
            out[qh + 4 * g + jj // 8] |= ((int(idx[j]) >> 2) & 1) << (jj % 8)
    return out


@per_type
def test_twin_levels_and_layout_match_native(t):
    """A block with d = 1 decodes to the table's levels; quantizing those values gives it back."""
    spec = qr.spec(t.name)
    n_levels = 1 << spec.bits
    rng = np.random.default_rng(t.id)
    cycle = np.arange(spec.block_size) % n_levels
    for idx in (cycle, rng.permutation(cycle)):
        block = pack_by_hand(spec, idx, 0x3C00)  # fp16 1.0
        want = np.asarray(spec.levels, dtype=np.float32)[idx]
        assert bits_equal(c_dequantize(t, block, spec.block_size), want)
        assert bits_equal(qr.dequantize(spec, block, spec.block_size), want)
        assert np.array_equal(c_quantize(t, want), block)
        assert np.array_equal(qr.quantize(spec, want), block)
        got_idx, got_d = qr.indices(spec, block, spec.block_size)
        assert np.array_equal(got_idx[0], idx) and got_d[0] == 1.0


@per_type
def test_twin_scale_rule_matches_native(t):
    """The table's rule reproduces the C bytes; the other rule does not."""
    import dataclasses

    spec = qr.spec(t.name)
    x = bitexact_cases(t)["gauss"][: 256 * spec.block_size]
    other = dataclasses.replace(spec, rule=qr.ABSMAX if spec.rule == qr.MSE else qr.MSE)
    c = c_quantize(t, x)
    assert np.array_equal(qr.quantize(spec, x), c)
    assert not np.array_equal(qr.quantize(other, x), c)


SEARCH_PERTURBATIONS = [
    ("SEARCH_LO", np.float32(0.71)),
    ("SEARCH_STEP", np.float32(0.051)),
    ("SEARCH_N", 26),  # drops the last trial (factor 2.0): matters for 2-bit types only
]


@per_type
@pytest.mark.parametrize("attr,value", SEARCH_PERTURBATIONS, ids=[p[0] for p in SEARCH_PERTURBATIONS])
def test_twin_search_constants_match_native(t, attr, value, monkeypatch):
    """The twin's search constants are pinned: change one and the bytes differ from C's."""
    spec = qr.spec(t.name)
    if spec.rule != qr.MSE:
        pytest.skip("no search")
    if attr == "SEARCH_N" and spec.bits == 3:
        pytest.skip("with 8 levels the factor-2.0 trial practically never wins")
    cases = bitexact_cases(t)
    x = np.concatenate([cases["gauss"], cases["t3"], cases["t1"]])
    c = c_quantize(t, x)
    assert np.array_equal(qr.quantize(spec, x), c)
    monkeypatch.setattr(qr, attr, value)
    assert not np.array_equal(qr.quantize(spec, x), c)


def test_twin_works_standalone(monkeypatch):
    """quants_ref.py needs numpy only: loaded from its file alone, it gives the same bytes."""
    import ast
    import importlib.util

    path = qr.__file__
    tree = ast.parse(Path(path).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
    }
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), "relative import"
    # ast and pathlib read the trellis tables (kvt_trellis_tables.py beside it) as literals
    allowed = {"__future__", "dataclasses", "typing", "numpy", "math", "statistics", "ast", "pathlib"}
    assert imported <= allowed, imported
    spec = importlib.util.spec_from_file_location("quants_ref_standalone", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    x = np.random.default_rng(5).standard_normal(4096).astype(np.float32)
    for name in [*qr.TYPES, "kvt2", "kvt2r"]:
        assert np.array_equal(mod.quantize(name, x), qr.quantize(name, x))


# ---------------------------------------------------------------------------------------------
# 3. C reference vs numpy twin: bit-exact


@per_type
def test_twin_bitexact_with_c_reference(t):
    for name, x in bitexact_cases(t).items():
        c = c_quantize(t, x)
        py = qr.quantize(t.name, x)
        assert py.dtype == np.uint8 and py.shape == c.shape
        if not np.array_equal(py, c):
            bad = np.flatnonzero((py != c).reshape(-1, t.type_size).any(axis=1))
            b = bad[0]
            raise AssertionError(
                f"{t.name}/{name}: {len(bad)} blocks differ; first block {b}: "
                f"x={x[b * t.block_size:(b + 1) * t.block_size].tolist()} "
                f"C={c.reshape(-1, t.type_size)[b].tolist()} twin={py.reshape(-1, t.type_size)[b].tolist()}"
            )
        yc = c_dequantize(t, c, len(x))
        ypy = qr.dequantize(t.name, c, len(x))
        assert ypy.dtype == np.float32 and bits_equal(ypy, yc), f"{t.name}/{name}: dequantize differs"


@per_type
def test_twin_dequantize_bitexact_on_arbitrary_bytes(t):
    """Every bit pattern decodes alike: random indices and random fp16 scales (subnormal, inf too)."""
    rng = np.random.default_rng(100 + t.id)
    nb = 4096
    data = rng.integers(0, 256, nb * t.type_size, dtype=np.uint8)
    d = rng.integers(0, 1 << 16, nb, dtype=np.uint16)
    d[(d & 0x7C00) == 0x7C00] &= 0xFC00  # no NaN scales (their payloads are not the point here)
    d[:4] = (0x0000, 0x8000, 0x0001, 0x7C00)  # +0, -0, smallest subnormal, +inf
    data.reshape(nb, t.type_size)[:, :2] = d.view(np.uint8).reshape(nb, 2)
    n = nb * t.block_size
    assert bits_equal(qr.dequantize(t.name, data, n), c_dequantize(t, data, n))
    assert bits_equal(qr.dequantize(t.name, data.tobytes(), n), c_dequantize(t, data, n))


# ---------------------------------------------------------------------------------------------
# 4. CPU fast paths vs the reference


@per_type
def test_cpu_quantize_equals_reference(t):
    cases = bitexact_cases(t, seed=7)
    cases["nonfinite"] = nonfinite_data(t)
    for name, x in cases.items():
        assert np.array_equal(c_quantize(t, x, "cpu"), c_quantize(t, x)), f"{t.name}/{name}"


def test_cpu_simd_reported():
    """The dot product and the dequantization report the SIMD path this CPU should run."""
    want = require_simd()
    assert FFI.string(NAT.cpu.pyadaq_cpu_simd()).decode() == want, "ggml-cpu was built without the SIMD path"
    assert FFI.string(NAT.base.pyadaq_dequant_impl_name(IMPL_BEST)).decode() == want
    assert FFI.string(NAT.base.pyadaq_dequant_impl_name(IMPL_SCALAR)).decode() == "scalar"


@per_type
def test_dequantize_scalar_simd_registered_and_twin_agree(t):
    """The scalar reference, the AVX2 path, the registered to_float (pyadaq_dequantize) and the
    numpy twin give the same floats, bit for bit, on arbitrary bytes and on quantized data."""
    require_simd()
    rng = np.random.default_rng(300 + t.id)
    nb = 2048
    data = rng.integers(0, 256, nb * t.type_size, dtype=np.uint8)
    d = rng.integers(0, 1 << 16, nb, dtype=np.uint16)
    d[(d & 0x7C00) == 0x7C00] &= 0xFC00
    data.reshape(nb, t.type_size)[:, :2] = d.view(np.uint8).reshape(nb, 2)
    n = nb * t.block_size
    for blocks in (data, c_quantize(t, rng.standard_normal(n).astype(np.float32))):
        ref = c_dequantize(t, blocks, n, IMPL_SCALAR)
        assert bits_equal(c_dequantize(t, blocks, n, IMPL_AVX2), ref)
        assert bits_equal(c_dequantize(t, blocks, n, IMPL_BEST), ref)
        y = np.zeros(n, dtype=np.float32)
        assert NAT.base.pyadaq_dequantize(t.id, FFI.from_buffer(blocks), _fptr(y), n) == 0
        assert bits_equal(y, ref)
        assert bits_equal(qr.dequantize(t.name, blocks, n), ref)


def test_unknown_implementation_is_refused():
    t = TYPES[0]
    y = np.zeros(t.block_size, dtype=np.float32)
    x = np.zeros(t.type_size, dtype=np.uint8)
    assert NAT.base.pyadaq_dequantize_impl(t.id, FFI.from_buffer(x), _fptr(y), t.block_size, 7) == -2
    assert NAT.base.pyadaq_dequant_impl_name(7) == FFI.NULL


@per_type
@pytest.mark.parametrize("n", [64, 128, 256])
def test_vec_dot_q8_0(t, n):
    """impl 1 (the backend's SIMD path) == impl 0 (generic C) == numpy, within float32 rounding."""
    require_simd()
    if n % t.block_size:
        pytest.skip("row shorter than a block")
    rng = np.random.default_rng(n + t.id)
    gens = [
        lambda: rng.standard_normal(n),
        lambda: rng.standard_t(3, n),
        lambda: rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3),
        lambda: np.repeat(rng.choice([-1.0, 1.0], n // 8) * rng.uniform(0.5, 2), 8),  # extreme levels
    ]
    for trial in range(120):
        x = gens[trial % 4]().astype(np.float32)
        y = gens[(trial // 4) % 4]().astype(np.float32)
        if trial % 31 == 5:
            x[: t.block_size] = 0  # a block with d = 0
        qx, qy = c_quantize(t, x), c_quantize_q8_0(y)
        xd = c_dequantize(t, qx, n).astype(np.float64)
        yd = decode_q8_0(qy).astype(np.float64)
        want = float(np.dot(xd, yd))
        tol = 1e-5 * float(np.sum(np.abs(xd * yd))) + 1e-30
        r0 = c_vec_dot(t, n, qx, qy, impl=0)
        r1 = c_vec_dot(t, n, qx, qy, impl=1)
        assert abs(r0 - want) <= tol, (trial, r0, want)
        assert abs(r1 - want) <= tol, (trial, r1, want)
        assert abs(r1 - r0) <= tol, (trial, r1, r0)


@per_type
def test_vec_dot_saturating_values(t):
    """Largest levels against +-127 everywhere (the int16 pair sums of the SIMD path at their max)."""
    n = 256
    spec = qr.spec(t.name)
    top = len(spec.levels) - 1
    rng = np.random.default_rng(t.id)
    for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 0)):
        if sx == 0:  # random signs
            idx = rng.choice([0, top], n)
            y = rng.choice([-1.0, 1.0], n).astype(np.float32)
        else:
            idx = np.full(n, top if sx > 0 else 0)
            y = np.full(n, sy, dtype=np.float32)
        qx = np.concatenate([pack_by_hand(spec, blk, 0x3C00) for blk in idx.reshape(-1, spec.block_size)])
        qy = c_quantize_q8_0(y)
        assert np.all(np.abs(qy.reshape(-1, Q8_0_SIZE)[:, 2:].view(np.int8)) == 127)
        want = float(np.dot(c_dequantize(t, qx, n).astype(np.float64), decode_q8_0(qy).astype(np.float64)))
        assert abs(want) > 0 or sx == 0
        for impl in (0, 1):
            got = c_vec_dot(t, n, qx, qy, impl)
            tol = 1e-5 * 127 * float(np.sum(np.abs(decode_q8_0(qy))))  # 1e-5 of sum |x*y|
            assert abs(got - want) <= tol, (sx, sy, impl, got, want)


# ---------------------------------------------------------------------------------------------
# 5. Zeros and non-finite inputs


@per_type
def test_zero_blocks(t):
    spec = qr.spec(t.name)
    nb = 4
    x = np.zeros(nb * t.block_size, dtype=np.float32)
    x[t.block_size:2 * t.block_size] = -0.0
    for q in (c_quantize(t, x), c_quantize(t, x, "cpu"), qr.quantize(t.name, x)):
        assert np.all(d_field(q, t) == 0)  # d == +0
        idx, _ = qr.indices(spec, q, len(x))
        assert np.all(idx == len(spec.levels) // 2)
        y = c_dequantize(t, q, len(x))
        assert bits_equal(y, np.zeros_like(y))  # +0.0 exactly
    # a zero block among others is still all zeros and leaves its neighbours alone
    rng = np.random.default_rng(t.id)
    z = rng.standard_normal(3 * t.block_size).astype(np.float32)
    z[t.block_size:2 * t.block_size] = 0
    q = c_quantize(t, z)
    assert d_field(q, t)[1] == 0 and d_field(q, t)[0] != 0 and d_field(q, t)[2] != 0
    assert np.all(c_dequantize(t, q, len(z))[t.block_size:2 * t.block_size] == 0)


def nonfinite_data(t) -> np.ndarray:
    qk = t.block_size
    rng = np.random.default_rng(200 + t.id)
    x = rng.standard_normal((64, qk)).astype(np.float32)
    specials = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)
    for b in range(48):  # 1..8 non-finite entries at random places
        pos = rng.choice(qk, rng.integers(1, 9), replace=False)
        x[b, pos] = rng.choice(specials, len(pos))
    x[48] = np.nan
    x[49] = np.inf
    x[50] = -np.inf
    x[51] = 0
    x[51, 3] = np.inf  # only inf and zeros: as if all zeros
    x[52] = rng.choice(specials, qk)
    x[53, 0] = -np.nan  # NaN with the sign bit set
    x[54, :] = 1e-3
    x[54, 1::2] = np.inf  # non-finite next to small values: must not take over the scale
    return x.reshape(-1)


@per_type
def test_nonfinite_inputs_count_as_zero(t):
    x = nonfinite_data(t)
    assert not np.all(np.isfinite(x))
    clean = np.where(np.isfinite(x), x, np.float32(0))
    want = c_quantize(t, clean)
    results = {"ref": c_quantize(t, x), "cpu": c_quantize(t, x, "cpu"), "twin": qr.quantize(t.name, x)}
    for name, got in results.items():
        assert np.array_equal(got, want), f"{t.name}: {name} differs from quantizing with non-finite -> 0"
    y = c_dequantize(t, want, len(x))
    assert np.all(np.isfinite(y))
    qk = t.block_size
    blocks = y.reshape(-1, qk)
    for b in (48, 49, 50, 51, 52):  # nothing finite but zeros: a zero block
        assert np.all(blocks[b] == 0)
    assert np.max(np.abs(blocks[54])) < 0.01  # scale set by the finite 1e-3 values only
    # the dot product over such rows is finite too
    n = 256 if qk <= 256 else qk
    qy = c_quantize_q8_0(np.ones(n, dtype=np.float32))
    for impl in (0, 1):
        assert np.isfinite(c_vec_dot(t, n, want[: n // qk * t.type_size], qy, impl))


# ---------------------------------------------------------------------------------------------
# 6. Error cases


@per_type
def test_c_entry_points_reject_partial_blocks(t):
    qk = t.block_size
    sentinel = 0xA5
    x = np.ones(4 * qk, dtype=np.float32)
    for k in (1, qk - 1, qk + 1, 2 * qk - 8, 32 if qk == 64 else 48):
        y = np.full(4 * t.type_size, sentinel, dtype=np.uint8)
        assert NAT.base.pyadaq_quantize_ref(t.id, _fptr(x), FFI.from_buffer(y), k) == -1
        assert NAT.cpu.pyadaq_cpu_quantize(t.id, _fptr(x), FFI.from_buffer(y), k) == -1
        assert np.all(y == sentinel), "wrote output before rejecting"
        f = np.full(4 * qk, 7.0, dtype=np.float32)
        assert NAT.base.pyadaq_dequantize(t.id, FFI.from_buffer(y), _fptr(f), k) == -1
        assert np.all(f == 7.0)
        out = FFI.new("float *", 7.0)
        qy = np.zeros(8 * Q8_0_SIZE, dtype=np.uint8)
        assert NAT.cpu.pyadaq_cpu_vec_dot_q8_0(t.id, k, FFI.from_buffer(y), FFI.from_buffer(qy), 0, out) == -1
        assert NAT.cpu.pyadaq_cpu_vec_dot_q8_0(t.id, k, FFI.from_buffer(y), FFI.from_buffer(qy), 1, out) == -1
        assert out[0] == 7.0
    # and the whole-block lengths are accepted
    y = np.zeros(4 * t.type_size, dtype=np.uint8)
    assert NAT.base.pyadaq_quantize_ref(t.id, _fptr(x), FFI.from_buffer(y), 4 * qk) == 0
    assert NAT.base.pyadaq_quantize_ref(t.id, _fptr(x), FFI.from_buffer(y), 0) == 0


def test_c_entry_points_reject_other_types():
    x = np.ones(64, dtype=np.float32)
    y = np.zeros(256, dtype=np.uint8)
    out = FFI.new("float *")
    for tid in (GGML_TYPE_Q8_0, 0, 42, 99, 117, -1):
        assert NAT.base.pyadaq_quantize_ref(tid, _fptr(x), FFI.from_buffer(y), 64) == -1
        assert NAT.base.pyadaq_dequantize(tid, FFI.from_buffer(y), _fptr(x), 64) == -1
        assert NAT.cpu.pyadaq_cpu_quantize(tid, _fptr(x), FFI.from_buffer(y), 64) == -1
        assert NAT.cpu.pyadaq_cpu_vec_dot_q8_0(tid, 64, FFI.from_buffer(y), FFI.from_buffer(y), 1, out) == -1
    assert NAT.cpu.pyadaq_cpu_quantize_q8_0(_fptr(x), FFI.from_buffer(y), 33) == -1


@per_type
def test_twin_rejects_bad_input(t):
    qk = t.block_size
    for k in (1, qk - 1, qk + 1, 32 if qk == 64 else 48):
        with pytest.raises(ValueError):
            qr.quantize(t.name, np.ones(k, dtype=np.float32))
        with pytest.raises(ValueError):
            qr.dequantize(t.name, np.zeros(4 * t.type_size, dtype=np.uint8), k)
    with pytest.raises(ValueError):
        qr.quantize(t.name, np.ones((2, qk), dtype=np.float32))  # not 1-D
    with pytest.raises(ValueError):
        qr.dequantize(t.name, np.zeros(t.type_size - 1, dtype=np.uint8), qk)  # too few bytes
    assert qr.quantize(t.name, np.zeros(0, dtype=np.float32)).size == 0


def test_twin_rejects_unknown_types():
    for bad in ("q8_0", "kvq4", 8, 117):
        with pytest.raises(ValueError):
            qr.quantize(bad, np.zeros(64, dtype=np.float32))
    with pytest.raises(TypeError):
        qr.spec(1.5)
    assert qr.spec(" KVQ2 ") is qr.spec(100) is qr.spec(pyadaq.cache_type("kvq2"))
