"""A numpy twin of pyadaq's KV-cache quantization types, bit-exact with the C reference.

The specification is the scalar C code in ``native/src/pyadaq-quants.c`` (compiled with
``-ffp-contract=off``). This module repeats its float32 operations in the same order, so
:func:`quantize` returns the very bytes ``quantize_row_<type>_ref`` writes and :func:`dequantize`
the very floats ``dequantize_row_<type>`` writes. It is vectorized across blocks; inside a
block it follows the C loops. It needs numpy only (no native library); the row-trellis types'
tables it reads as literals from kvt_trellis_tables.py beside it.

Format
------
A row of ``n`` values is ``n / QK`` blocks of ``QK`` values (QK = 32 or 64), stored one after
another. A block is::

    offset 0            d   : fp16 scale, little-endian (ggml_half)
    offset 2            qs  : QK/4 bytes, the low two bits of each value's level index
    offset 2 + QK/4     qh  : QK/8 bytes, the third index bit (3-bit types only)

Each value has an index ``i`` into a small ascending int8 codebook ``levels`` (4 entries for
2 bits, 8 for 3 bits) and decodes as ``d * levels[i]`` (float32 product). Bits are laid out per
group of 32 values; a 64-value block is two groups sharing ``d``. For value ``32*g + 8*k + m``
(``k`` = 0..3, ``m`` = 0..7) the low bits are bits ``2k, 2k+1`` of ``qs[8*g + m]``; for value
``32*g + 8*b + m`` the high bit is bit ``m`` of ``qh[4*g + b]``.

Quantization of one block (non-finite inputs count as 0):

* ``amax = max |x|``. If ``amax == 0``: ``d = 0`` and every index is ``n_levels / 2``.
* ``ABSMAX`` rule: ``inv = lmax / amax``; index = nearest level of ``x * inv``;
  ``d = amax / lmax`` (``lmax`` = the largest level).
* ``MSE`` rule: for ``t = 0..SEARCH_N-1`` the trial inverse scale is
  ``(lmax / amax) * (SEARCH_LO + t * SEARCH_STEP)``; each value takes the nearest level ``l`` of
  ``x * inv``, and ``sxl = sum x*l``, ``sll = sum l*l`` are accumulated in float32 in value
  order. The trial with the largest ``sxl*sxl / sll`` wins (the first one on ties), and
  ``d = sxl / sll`` is its least-squares scale.
* "Nearest level" is the number of midpoints ``(levels[i] + levels[i+1]) / 2`` that the value
  strictly exceeds (a NaN exceeds none).
* ``d`` is stored as fp16, rounded to nearest even (ggml's ``GGML_FP32_TO_FP16``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ABSMAX",
    "KVTR_TYPES",
    "KVT_TYPES",
    "MSE",
    "SEARCH_LO",
    "SEARCH_N",
    "SEARCH_STEP",
    "TYPES",
    "KvtSpec",
    "KvtrSpec",
    "TypeSpec",
    "dequantize",
    "format_constants",
    "indices",
    "kvt_levels",
    "kvt_scales",
    "quantize",
    "spec",
]

# Scale rules (enum pyadaq_scale_rule).
ABSMAX = "absmax"
MSE = "mse"

# Scale search of the MSE rule (PYADAQ_SEARCH_* in pyadaq-quants.h), as the float32 values C uses.
SEARCH_N = 27
SEARCH_LO = np.float32(0.70)
SEARCH_STEP = np.float32(0.05)

# Codebooks (pyadaq_levels_* in pyadaq-quants.c).
LEVELS_N2 = (-127, -38, 38, 127)
LEVELS_U2 = (-3, -1, 1, 3)
LEVELS_N3 = (-127, -79, -45, -14, 14, 45, 79, 127)
LEVELS_U3 = (-7, -5, -3, -1, 1, 3, 5, 7)


@dataclass(frozen=True)
class TypeSpec:
    name: str
    id: int  # ggml type id
    block_size: int  # QK: values per block
    bits: int  # index bits per value
    levels: tuple  # ascending int8 codebook, 2**bits entries
    rule: str  # ABSMAX or MSE

    @property
    def type_size(self) -> int:
        """Bytes per block: fp16 d, QK/4 bytes of low bits, QK/8 bytes of high bits if 3-bit."""
        return 2 + self.block_size // 4 + (self.block_size // 8 if self.bits == 3 else 0)


# The X-macro PYADAQ_TYPES of pyadaq-quants.h, row for row.
TYPES: dict[str, TypeSpec] = {
    t.name: t
    for t in (
        TypeSpec("kvq2", 100, 32, 2, LEVELS_N2, MSE),
        TypeSpec("kvq3", 101, 32, 3, LEVELS_N3, MSE),
        TypeSpec("kvq2_u32m", 110, 32, 2, LEVELS_U2, ABSMAX),
        TypeSpec("kvq2_u32", 111, 32, 2, LEVELS_U2, MSE),
        TypeSpec("kvq2_n64", 112, 64, 2, LEVELS_N2, MSE),
        TypeSpec("kvq3_u32m", 113, 32, 3, LEVELS_U3, ABSMAX),
        TypeSpec("kvq3_u32", 114, 32, 3, LEVELS_U3, MSE),
        TypeSpec("kvq3_n64", 115, 64, 3, LEVELS_N3, MSE),
    )
}


# --- transform-coded types (native/src/pyadaq-kvt.c) -----------------------------------------
#
# Blocks of 64 values: a scale code e (one byte), then 8 groups of 8 values; group g's values have
# widths[g] bits, stored as widths[g] bit planes (byte k of the group: bit i is bit k of value i's
# index); a value decodes as d * kvt_levels(w)[index] (w = 0: 0), d = kvt_scales()[e]: 0 for e = 0,
# else 2^((e - 128) / 8), the float32 mantissa 2^((e % 8) / 8) times the power of two 2^(e // 8 - 16)
# (exact). Quantization of a block (non-finite inputs count as 0), with position weights wt = 4^w:
# ss = sum wt*(x*x) and sw = sum wt in value order (float32); ss == 0 gives rms = 0, else
# rms = sqrt(ss / sw) (0 too when ss / sw underflows); rms == 0 gives e = 0; else e_rms = the
# largest code of 1..255 whose scale is <= rms (1 if none), and for t = 0..KVT_SEARCH_N-1 the
# trial code e_t = clamp(e_rms - KVT_SEARCH_BELOW + t, 1, 255) with ds = kvt_scales()[e_t] scores
# err = sum wt*((x - ds*level)^2) in value order, each value taking the nearest level of
# x * (1 / ds) (a width of 0 contributes wt*x^2); the first trial with the least err wins (e_rms
# when none is below infinity), and the indices are the nearest levels of x * (1 / d) for the
# winner's d (all 0 when e is 0).

KVT_SEARCH_N = 16
KVT_SEARCH_BELOW = 4
KVT_SCALE_STEPS = 8  # scale codes per octave
KVT_SCALE_BIAS = 128  # the code of scale 1
KVT_MAX_BITS = 7


def kvt_scale_mantissas() -> np.ndarray:
    """The float32 mantissas 2^(k/8), k = 0..7, of the kvt scale codes (the C table is this
    function's output, printed by scripts/kvt_levels.py)."""
    return np.array([2.0 ** (k / KVT_SCALE_STEPS) for k in range(KVT_SCALE_STEPS)], dtype=np.float64).astype(np.float32)


def kvt_scales() -> np.ndarray:
    """The 256 scales d of the kvt scale codes (float32; code 0 is 0)."""
    m = kvt_scale_mantissas()
    e = np.arange(256)
    d = np.ldexp(m[e % KVT_SCALE_STEPS], e // KVT_SCALE_STEPS - KVT_SCALE_BIAS // KVT_SCALE_STEPS).astype(np.float32)
    d[0] = 0
    return d


@dataclass(frozen=True)
class KvtSpec:
    name: str
    id: int
    widths: tuple  # bits of the 8 groups of 8 values, descending

    block_size = 64

    @property
    def type_size(self) -> int:
        return 1 + sum(self.widths)


# The X-macro PYADAQ_KVT_TYPES of pyadaq-quants.h, row for row.
KVT_TYPES: dict[str, KvtSpec] = {
    t.name: t
    for t in (
        KvtSpec("kvt2", 102, (4, 3, 3, 3, 2, 2, 1, 1)),
        KvtSpec("kvt3", 103, (5, 4, 4, 3, 3, 3, 3, 2)),
        KvtSpec("kvt4", 104, (6, 5, 5, 4, 4, 4, 4, 3)),
        KvtSpec("kvt2s", 105, (5, 3, 3, 2, 2, 2, 1, 1)),
        KvtSpec("kvt3s", 106, (6, 4, 4, 3, 3, 3, 2, 2)),
        KvtSpec("kvt4s", 107, (7, 5, 4, 4, 4, 4, 4, 3)),
        KvtSpec("kvt1", 108, (4, 2, 2, 1, 1, 1, 0, 0)),
    )
}


def _lloyd_max(n: int, iters: int = 20000) -> list:
    """The n Lloyd-Max levels of a unit Gaussian (float64): Lloyd's iteration from the
    quantiles, each level to the centroid of its cell, until no level moves by 1e-12."""
    import math
    from statistics import NormalDist

    nd = NormalDist()

    def pdf(x: float) -> float:
        return 0.0 if math.isinf(x) else math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    lv = [nd.inv_cdf((i + 0.5) / n) for i in range(n)]
    for _ in range(iters):
        cuts = [-math.inf] + [(a + b) / 2 for a, b in zip(lv, lv[1:])] + [math.inf]
        new = [(pdf(a) - pdf(b)) / (nd.cdf(b) - nd.cdf(a)) for a, b in zip(cuts, cuts[1:])]
        done = max(abs(x - y) for x, y in zip(new, lv)) < 1e-12
        lv = new
        if done:
            break
    return lv


_KVT_LEVELS: dict = {}


def kvt_levels(bits: int) -> np.ndarray:
    """The 2**bits float32 levels of the transform-coded types (the C tables are this function's
    output, printed by scripts/kvt_levels.py)."""
    if not 1 <= bits <= KVT_MAX_BITS:
        raise ValueError(f"kvt levels exist for 1..{KVT_MAX_BITS} bits, not {bits}")
    if bits not in _KVT_LEVELS:
        _KVT_LEVELS[bits] = np.asarray(_lloyd_max(1 << bits), dtype=np.float64).astype(np.float32)
    return _KVT_LEVELS[bits]


def _kvt_nearest(v: np.ndarray, mids: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(mids, v, side="left")  # mids strictly below v
    return np.where(np.isnan(v), 0, idx)


def _kvt_mids(widths) -> tuple[dict, dict]:
    lv = {w: kvt_levels(w) for w in set(widths) if w}
    return lv, {w: (np.float32(0.5) * (lv[w][:-1] + lv[w][1:])).astype(np.float32) for w in lv}


def _kvt_codes(widths: tuple, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks xb [nb, 64] as the search sees them (non-finite values as 0) and their scale codes."""
    nb = xb.shape[0]
    scales = kvt_scales()
    with np.errstate(all="ignore"):
        xs = np.where(np.isfinite(xb), xb, np.float32(0)).astype(np.float32)
        lv, mids = _kvt_mids(widths)
        wt = [np.float32(1 << (2 * widths[j // 8])) for j in range(64)]
        ss = np.zeros(nb, np.float32)
        sw = np.float32(0)
        for j in range(64):
            ss += wt[j] * (xs[:, j] * xs[:, j])
            sw += wt[j]
        rms = np.sqrt(ss / sw)
        e_rms = np.maximum(np.searchsorted(scales[1:], rms, side="right"), 1)
        best_err = np.full(nb, np.inf, np.float32)
        best = e_rms.copy()
        for step in range(KVT_SEARCH_N):
            e_t = np.clip(e_rms - KVT_SEARCH_BELOW + step, 1, 255)
            ds = scales[e_t]
            inv = np.float32(1) / ds
            err = np.zeros(nb, np.float32)
            for j in range(64):
                w = widths[j // 8]
                e = xs[:, j]
                if w:
                    i = _kvt_nearest(xs[:, j] * inv, mids[w])
                    e = xs[:, j] - ds * lv[w][i]
                err += wt[j] * (e * e)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, e_t, best)
        code = np.where(rms > 0, best, 0).astype(np.uint8)
    return xs, code


def _kvt_quantize(t: KvtSpec, xb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    scales = kvt_scales()
    xs, code = _kvt_codes(t.widths, xb)
    _, mids = _kvt_mids(t.widths)
    with np.errstate(all="ignore"):
        dd = scales[code]
        inv = np.where(dd > 0, np.float32(1) / np.where(dd > 0, dd, np.float32(1)), np.float32(0))
        out = np.zeros((nb, t.type_size), dtype=np.uint8)
        out[:, 0] = code
        pos = 1
        for g, w in enumerate(t.widths):
            if not w:
                continue
            x8 = xs[:, 8 * g:8 * g + 8] * inv[:, None]
            idx = np.where((dd > 0)[:, None], _kvt_nearest(x8, mids[w]), 0).astype(np.int64)
            for k in range(w):
                bits = ((idx >> k) & 1) << np.arange(8)
                out[:, pos] = bits.sum(axis=1).astype(np.uint8)
                pos += 1
    return out.reshape(-1)


def _kvt_dequantize(t: KvtSpec, data: Any, n: int) -> np.ndarray:
    if n < 0 or n % 64:
        raise ValueError(f"n = {n} is not a multiple of {t.name}'s block size 64")
    nb = n // 64
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) \
        else np.asarray(data, dtype=np.uint8).reshape(-1)
    if raw.size < nb * t.type_size:
        raise ValueError(f"{n} {t.name} values need {nb * t.type_size} bytes, got {raw.size}")
    blocks = raw[: nb * t.type_size].reshape(nb, t.type_size)
    d = kvt_scales()[blocks[:, 0]]
    y = np.zeros((nb, 64), np.float32)
    pos = 1
    with np.errstate(all="ignore"):
        for g, w in enumerate(t.widths):
            if not w:
                continue
            idx = np.zeros((nb, 8), np.int64)
            for k in range(w):
                idx |= ((blocks[:, pos:pos + 1] >> np.arange(8)) & 1).astype(np.int64) << k
                pos += 1
            y[:, 8 * g:8 * g + 8] = d[:, None] * kvt_levels(w)[idx]
    return y.reshape(-1)


# --- row-trellis types (native/src/pyadaq-kvt.c, "Row-trellis types") -------------------------
#
# A block is a row of 256 values: 4 sub-blocks of 64 with a kvt profile, their 4 scale codes (kvt's
# search, per sub-block), then one little-endian bit stream per width of the profile, widest first;
# stream k holds the values of width k in row order (sub-block, group, position), k bits each.
# Widths above KVTR_MAX_TRELLIS hold the nearest kvt level's index of u = x * (1 / d); narrower
# ones a tail-biting bitshift trellis: value t decodes as d * TABLES[k][W], the window W being
# the STATE_BITS stream bits before value t's (circularly) below its own k bits. The encoder runs
# Viterbi over the 2^STATE_BITS states twice (see the C reference for the exact order).

KVTR_QK = 256
KVTR_SUBS = 4
KVTR_MAX_TRELLIS = 3


@dataclass(frozen=True)
class KvtrSpec:
    name: str
    id: int
    widths: tuple  # bits of the 8 groups of each sub-block, descending

    block_size = KVTR_QK

    @property
    def type_size(self) -> int:
        return KVTR_SUBS * (1 + sum(self.widths))


# The X-macro PYADAQ_KVTR_TYPES of pyadaq-quants.h, row for row.
KVTR_TYPES: dict[str, KvtrSpec] = {
    t.name: t
    for t in (
        KvtrSpec("kvt2r", 109, (4, 3, 3, 2, 2, 2, 2, 1)),
        KvtrSpec("kvt3r", 116, (5, 4, 3, 3, 3, 3, 3, 3)),
    )
}


_TRELLIS: dict = {}


def _trellis_data() -> tuple[int, dict]:
    """(STATE_BITS, TABLES) of kvt_trellis_tables.py beside this file (scripts/kvt_trellis_tables.py
    writes it and the C header), read as literals so that this module still needs numpy only."""
    if not _TRELLIS:
        import ast
        from pathlib import Path

        tree = ast.parse(Path(__file__).with_name("kvt_trellis_tables.py").read_text())
        found = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) for t in n.targets}
        _TRELLIS["state_bits"] = int(found["STATE_BITS"])
        _TRELLIS["tables"] = {k: np.asarray(v, np.float64).astype(np.float32) for k, v in found["TABLES"].items()}
    return _TRELLIS["state_bits"], _TRELLIS["tables"]


def kvtr_state_bits() -> int:
    """The trellis state: the stream bits before a value's own that its window reads."""
    return _trellis_data()[0]


def kvtr_table(bits: int) -> np.ndarray:
    """The float32 reconstruction table of trellis width ``bits`` (1..KVTR_MAX_TRELLIS)."""
    if not 1 <= bits <= KVTR_MAX_TRELLIS:
        raise ValueError(f"trellis tables exist for 1..{KVTR_MAX_TRELLIS} bits, not {bits}")
    return _trellis_data()[1][bits]


def _kvtr_positions(widths: tuple, k: int) -> np.ndarray:
    return np.array([64 * b + 8 * g + i for b in range(KVTR_SUBS) for g in range(8) if widths[g] == k
                     for i in range(8)], dtype=np.int64)


def _kvtr_viterbi(u: np.ndarray, w: np.ndarray, k: int, start: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Viterbi over rows u, w [nr, n] (float32, C's order of operations); returns (end state [nr],
    windows [nr, n])."""
    sbits = kvtr_state_bits()
    nr, n = u.shape
    ns = 1 << sbits
    table = kvtr_table(k)
    rows = np.arange(nr)
    if start is None:
        cost = np.zeros((nr, ns), np.float32)
    else:
        cost = np.full((nr, ns), np.inf, np.float32)
        cost[rows, start] = 0
    back = np.empty((n, nr, ns), np.uint16)  # windows < 2^(sbits + 3)
    s2 = np.arange(ns)
    for t in range(n):
        best = np.full((nr, ns), np.inf, np.float32)
        bw = np.broadcast_to(s2 << k, (nr, ns)).copy()
        for r in range(1 << k):
            win = (s2 << k) | r
            diff = u[:, t:t + 1] - table[win][None, :]
            c = cost[:, win & (ns - 1)] + w[:, t:t + 1] * (diff * diff)
            better = c < best
            best = np.where(better, c, best)
            bw = np.where(better, win[None, :], bw)
        cost = best
        back[t] = bw
    end = cost.argmin(axis=1) if start is None else start
    wins = np.empty((nr, n), np.int64)
    s = end.copy()
    for t in range(n - 1, -1, -1):
        wins[:, t] = back[t][rows, s].astype(np.int64)
        s = wins[:, t] & (ns - 1)
    return end, wins


def _kvtr_quantize(t: KvtrSpec, xb: np.ndarray) -> np.ndarray:
    sbits = kvtr_state_bits()
    nr = xb.shape[0]
    xs, code = _kvt_codes(t.widths, xb.reshape(nr * KVTR_SUBS, 64))
    xs = xs.reshape(nr, KVTR_QK)
    code = code.reshape(nr, KVTR_SUBS)
    _, mids = _kvt_mids(t.widths)
    out = np.zeros((nr, t.type_size), np.uint8)
    out[:, :KVTR_SUBS] = code
    bits = np.zeros((nr, 8 * (t.type_size - KVTR_SUBS)), np.uint8)
    with np.errstate(all="ignore"):
        d = kvt_scales()[code]
        inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0))
        u = (xs.reshape(nr, KVTR_SUBS, 64) * inv[:, :, None]).reshape(nr, KVTR_QK)
        wt = np.repeat(d * d, 64, axis=1)
        at = 0
        for k in range(KVT_MAX_BITS, 0, -1):
            pos = _kvtr_positions(t.widths, k)
            if not pos.size:
                continue
            if k > KVTR_MAX_TRELLIS:
                val = _kvt_nearest(u[:, pos], mids[k]).astype(np.int64)
            else:
                s0, _ = _kvtr_viterbi(u[:, pos], wt[:, pos], k, None)
                _, wins = _kvtr_viterbi(u[:, pos], wt[:, pos], k, s0)
                val = wins >> sbits
            for q in range(k):
                bits[:, at + q:at + pos.size * k:k] = (val >> q) & 1
            at += pos.size * k
    out[:, KVTR_SUBS:] = np.packbits(bits, axis=1, bitorder="little")
    return out.reshape(-1)


def _kvtr_dequantize(t: KvtrSpec, data: Any, n: int) -> np.ndarray:
    sbits = kvtr_state_bits()
    if n < 0 or n % KVTR_QK:
        raise ValueError(f"n = {n} is not a multiple of {t.name}'s block size {KVTR_QK}")
    nr = n // KVTR_QK
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) \
        else np.asarray(data, dtype=np.uint8).reshape(-1)
    if raw.size < nr * t.type_size:
        raise ValueError(f"{n} {t.name} values need {nr * t.type_size} bytes, got {raw.size}")
    blocks = raw[: nr * t.type_size].reshape(nr, t.type_size)
    d = kvt_scales()[blocks[:, :KVTR_SUBS]]
    bits = np.unpackbits(blocks[:, KVTR_SUBS:], axis=1, bitorder="little").astype(np.int64)
    y = np.zeros((nr, KVTR_QK), np.float32)
    at = 0
    with np.errstate(all="ignore"):
        for k in range(KVT_MAX_BITS, 0, -1):
            pos = _kvtr_positions(t.widths, k)
            if not pos.size:
                continue
            stream = bits[:, at:at + pos.size * k]
            dd = d[:, pos // 64]
            if k > KVTR_MAX_TRELLIS:
                idx = sum(stream[:, q::k] << q for q in range(k))
                y[:, pos] = dd * kvt_levels(k)[idx]
            else:
                wrapped = np.concatenate([stream[:, -sbits:], stream], axis=1)
                starts = np.arange(pos.size) * k  # value t's window: wrapped bits t*k .. t*k + S + k
                win = sum(wrapped[:, starts + q] << q for q in range(sbits + k))
                y[:, pos] = dd * kvtr_table(k)[win]
            at += pos.size * k
    return y.reshape(-1)


def format_constants() -> str:
    """The formats' constants this module defines (profiles, codebooks, scale rules, searches) as
    text; with the kvt level and scale tables (see pyadaq.types.formats_fingerprint) they are
    what a cached measurement of pyadaq's types is keyed by."""
    return "\n".join([
        repr(sorted((t.name, t.id, t.block_size, t.bits, t.levels, t.rule) for t in TYPES.values())),
        repr(sorted((t.name, t.id, t.widths) for t in KVT_TYPES.values())),
        repr(sorted((t.name, t.id, t.widths) for t in KVTR_TYPES.values())),
        repr([KVTR_QK, KVTR_SUBS, KVTR_MAX_TRELLIS, kvtr_state_bits()]),
        repr([KVT_SEARCH_N, KVT_SEARCH_BELOW, KVT_SCALE_STEPS, KVT_SCALE_BIAS, KVT_MAX_BITS]),
        repr([SEARCH_N, float(SEARCH_LO), float(SEARCH_STEP)])])


def spec(type_: Any) -> TypeSpec | KvtSpec | KvtrSpec:
    """The TypeSpec (KvtSpec, KvtrSpec) of a pyadaq type given by name, ggml id, spec or CacheType."""
    if isinstance(type_, (TypeSpec, KvtSpec, KvtrSpec)):
        return type_
    if not isinstance(type_, (str, int)) and hasattr(type_, "name"):  # pyadaq.CacheType
        type_ = type_.name
    if isinstance(type_, bool) or not isinstance(type_, (str, int)):
        raise TypeError(f"a pyadaq type is a name or a ggml type id, not {type(type_).__name__}")
    every = {**TYPES, **KVT_TYPES, **KVTR_TYPES}
    if isinstance(type_, int):
        for t in every.values():
            if t.id == type_:
                return t
        raise ValueError(f"ggml type id {type_} is not a pyadaq type")
    key = type_.strip().lower()
    if key not in every:
        raise ValueError(f"'{type_}' is not a pyadaq type; pyadaq types: {', '.join(every)}")
    return every[key]


def _nearest_level(v: np.ndarray, mids: np.ndarray) -> np.ndarray:
    """Per element, the number of midpoints that v strictly exceeds (C's nearest_level)."""
    idx = np.zeros(v.shape, dtype=np.uint8)
    for m in mids:
        idx += v > m
    return idx


def _block_indices(xs: np.ndarray, t: TypeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Level indices (nb, QK) and float32 scales (nb,) of blocks xs (nb, QK), finite float32."""
    nb, qk = xs.shape
    n_levels = 1 << t.bits
    levels = np.asarray(t.levels, dtype=np.float32)
    lmax = levels[-1]
    mids = np.float32(0.5) * (levels[:-1] + levels[1:])

    amax = np.abs(xs).max(axis=1) if qk else np.zeros(nb, np.float32)
    zero = amax == 0
    safe_amax = np.where(zero, np.float32(1), amax)  # blocks of zeros are overwritten below

    if t.rule == ABSMAX:
        inv = lmax / safe_amax
        idx = _nearest_level(xs * inv[:, None], mids)
        d = amax / lmax
    else:
        base = lmax / safe_amax
        best_score = np.full(nb, -1, dtype=np.float32)
        best_sxl = np.zeros(nb, dtype=np.float32)
        best_sll = np.ones(nb, dtype=np.float32)
        idx = np.zeros((nb, qk), dtype=np.uint8)
        for step in range(SEARCH_N):
            inv = base * (SEARCH_LO + np.float32(step) * SEARCH_STEP)
            trial = _nearest_level(xs * inv[:, None], mids)
            lv = levels[trial]
            xl = xs * lv
            ll = lv * lv
            # Sequential float32 sums over j, as in C (np.sum would sum pairwise).
            sxl = np.zeros(nb, dtype=np.float32)
            sll = np.zeros(nb, dtype=np.float32)
            for j in range(qk):
                sxl += xl[:, j]
                sll += ll[:, j]
            score = sxl * sxl / sll
            better = score > best_score
            best_score = np.where(better, score, best_score)
            best_sxl = np.where(better, sxl, best_sxl)
            best_sll = np.where(better, sll, best_sll)
            idx[better] = trial[better]
        d = best_sxl / best_sll

    idx[zero] = n_levels // 2
    d = np.where(zero, np.float32(0), d).astype(np.float32)
    return idx, d


def _as_blocks(x: Any, t: TypeSpec) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {x.shape}")
    if x.size % t.block_size:
        raise ValueError(f"length {x.size} is not a multiple of {t.name}'s block size {t.block_size}")
    return x.astype(np.float32, copy=False).reshape(-1, t.block_size)


def quantize(type_: Any, x: Any) -> np.ndarray:
    """Quantize a 1-D float32 array (length a multiple of the block size) to the raw block bytes.

    Returns a uint8 array of ``len(x) / QK * type_size`` bytes, identical to what the C
    reference ``pyadaq_quantize_ref`` writes. Non-finite inputs count as 0. Other float dtypes
    are first converted to float32.
    """
    t = spec(type_)
    xb = _as_blocks(x, t)
    if isinstance(t, KvtrSpec):
        return _kvtr_quantize(t, xb)
    if isinstance(t, KvtSpec):
        return _kvt_quantize(t, xb)
    nb, qk = xb.shape
    with np.errstate(all="ignore"):  # overflow/inf/NaN behave as in C; no warnings
        xs = np.where(np.isfinite(xb), xb, np.float32(0)).astype(np.float32)
        idx, d = _block_indices(xs, t)
        d16 = d.astype("<f2")

    out = np.zeros((nb, t.type_size), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(nb, 2)
    # value 32*g + 8*k + m -> (g, k, m)
    grouped = idx.reshape(nb, qk // 32, 4, 8)
    low = (grouped & 3) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    out[:, 2:2 + qk // 4] = np.bitwise_or.reduce(low, axis=2).reshape(nb, qk // 4)
    if t.bits == 3:
        high = ((grouped >> 2) & 1) << np.arange(8, dtype=np.uint8)[None, None, None, :]
        out[:, 2 + qk // 4:] = np.bitwise_or.reduce(high, axis=3).reshape(nb, qk // 8)
    return out.reshape(-1)


def indices(type_: Any, data: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode n values' level indices (nb, QK) and fp16 scales (nb,) from raw block bytes."""
    t = spec(type_)
    if n < 0 or n % t.block_size:
        raise ValueError(f"n = {n} is not a multiple of {t.name}'s block size {t.block_size}")
    nb, qk = n // t.block_size, t.block_size
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) \
        else np.asarray(data, dtype=np.uint8).reshape(-1)
    if raw.size < nb * t.type_size:
        raise ValueError(f"{n} {t.name} values need {nb * t.type_size} bytes, got {raw.size}")
    blocks = raw[: nb * t.type_size].reshape(nb, t.type_size)
    d16 = np.ascontiguousarray(blocks[:, 0:2]).view("<f2").reshape(nb)
    qs = blocks[:, 2:2 + qk // 4].reshape(nb, qk // 32, 1, 8)
    idx = (qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3  # (nb, g, k, m)
    if t.bits == 3:
        qh = blocks[:, 2 + qk // 4:].reshape(nb, qk // 32, 4, 1)
        idx = idx | (((qh >> np.arange(8, dtype=np.uint8)[None, None, None, :]) & 1) << 2)
    return idx.reshape(nb, qk), d16


def dequantize(type_: Any, data: Any, n: int) -> np.ndarray:
    """Decode n values from raw block bytes: float32, identical to C's ``pyadaq_dequantize``."""
    t = spec(type_)
    if isinstance(t, KvtrSpec):
        return _kvtr_dequantize(t, data, n)
    if isinstance(t, KvtSpec):
        return _kvt_dequantize(t, data, n)
    idx, d16 = indices(t, data, n)
    levels = np.asarray(t.levels, dtype=np.float32)
    with np.errstate(all="ignore"):
        y = d16.astype(np.float32)[:, None] * levels[idx]
    return y.astype(np.float32, copy=False).reshape(-1)
