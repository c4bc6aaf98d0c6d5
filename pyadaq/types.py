"""The KV-cache types pyadaq offers: upstream's and pyadaq's own, read from the native library."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pyadaq._native import native

# Upstream types that llama.cpp's CPU flash attention runs as K or V cache.
UPSTREAM_CACHE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
    "iq4_nl": 20, "bf16": 30, "q2_0": 42,
}
# pyadaq's types (native/src/pyadaq-quants.h). The recommended two come first; the
# research candidates are the formats they were chosen from (docs/FORMATS.md).
PYADAQ_CACHE_TYPES = {"kvq2": 100, "kvq3": 101}
# Transform-coded types (native/src/pyadaq-kvt.c): bits that fall along each head's principal
# components; they hold whitened, interleaved coordinates, so they need a calibration.
# kvt2r and kvt3r code a row of 256 values (a head of 256, or a multiple) with one trellis stream per
# bit width: the same sizes as kvt2 and kvt3, less error; CPU only for now.
PYADAQ_CALIBRATED_TYPES = {"kvt2": 102, "kvt3": 103, "kvt4": 104, "kvt2s": 105, "kvt3s": 106, "kvt4s": 107,
                           "kvt1": 108, "kvt2r": 109, "kvt3r": 116}
PYADAQ_RESEARCH_TYPES = {
    "kvq2_u32m": 110, "kvq2_u32": 111, "kvq2_n64": 112,
    "kvq3_u32m": 113, "kvq3_u32": 114, "kvq3_n64": 115,
}
# Types whose cache writes and flash attention run on CUDA (f32 converts to f16 there); every
# K/V pair among CUDA_FA_PAIR_TYPES has a compiled vector kernel, bf16 only with itself, and so
# have the pairs of CUDA_KVT_FA_PAIRS: the keys' transform-coded profiles with the common values,
# and the common keys with the values' profiles (native/cmake/pyadaq_cuda_pairs.cmake,
# docs/CUDA.md).
CUDA_FA_PAIR_TYPES = ("f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "kvq2", "kvq3")
CUDA_KVT_FA_PAIRS = tuple(
    [f"{k}-{v}" for k in ("kvt2s", "kvt3s", "kvt4s")
     for v in ("f16", "q8_0", "q4_0", "kvq2", "kvq3", "kvt1", "kvt2", "kvt3", "kvt4")]
    + [f"{k}-{v}" for k in ("f16", "q8_0", "q4_0") for v in ("kvt1", "kvt2", "kvt3", "kvt4")]
    # the row-trellis values, compiled for heads of 256 (their only size below 512)
    + [f"{k}-{v}" for k in ("f16", "q8_0", "q4_0", "kvt2s", "kvt3s", "kvt4s") for v in ("kvt2r", "kvt3r")])
CUDA_CACHE_TYPES = frozenset({"f32", "bf16", *CUDA_FA_PAIR_TYPES,
                              *(t for p in CUDA_KVT_FA_PAIRS for t in p.split("-"))})


@dataclass(frozen=True)
class CacheType:
    name: str
    id: int
    block_size: int
    type_size: int  # bytes per block, scales included
    quantized: bool
    origin: str  # "upstream" or "pyadaq"
    research: bool = False
    calibrated: bool = False  # needs a KV calibration (pyadaq.model.calibration) to run

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def cuda(self) -> bool:
        """Whether a cache of this type runs on CUDA (writes and flash attention)."""
        return self.name in CUDA_CACHE_TYPES

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"CacheType({self.name!r})"


@lru_cache(maxsize=1)
def _table() -> dict[str, CacheType]:
    n = native()
    out: dict[str, CacheType] = {}
    groups = (
        (UPSTREAM_CACHE_TYPES, "upstream", False),
        (PYADAQ_CACHE_TYPES, "pyadaq", False),
        (PYADAQ_CALIBRATED_TYPES, "pyadaq", False),
        (PYADAQ_RESEARCH_TYPES, "pyadaq", True),
    )
    for names, origin, research in groups:
        for name, tid in names.items():
            native_name = n.type_name(tid)
            if native_name != name:
                raise RuntimeError(f"native type {tid} is '{native_name}', expected '{name}'")
            out[name] = CacheType(
                name=name,
                id=tid,
                block_size=int(n.base.ggml_blck_size(tid)),
                type_size=int(n.base.ggml_type_size(tid)),
                quantized=bool(n.base.ggml_is_quantized(tid)),
                origin=origin,
                research=research,
                calibrated=name in PYADAQ_CALIBRATED_TYPES,
            )
    return out


@lru_cache(maxsize=1)
def formats_fingerprint() -> str:
    """A short hash of pyadaq's cache formats: the numpy twin's constants (profiles, codebooks,
    searches) and the native library's kvt level, scale and trellis tables. Cached measurements of the
    types (the planner's sensitivities) and saved states are keyed by it, so that what was
    measured or saved with other formats is not reused."""
    from pyadaq.quants_ref import KVT_MAX_BITS, KVTR_MAX_TRELLIS, format_constants

    n = native()
    parts = [format_constants()]
    for bits in range(1, KVT_MAX_BITS + 1):
        lv = np.zeros(1 << bits, np.float32)
        n.base.pyadaq_kvt_levels(bits, n.ffi.from_buffer("float[]", lv), len(lv))
        parts.append(lv.tobytes().hex())
    for bits in range(1, KVTR_MAX_TRELLIS + 1):
        table = np.zeros(4096, np.float32)
        size = n.base.pyadaq_kvtr_table(bits, n.ffi.from_buffer("float[]", table), len(table))
        parts.append(table[:size].tobytes().hex())
    out = n.ffi.new("float *")
    scales = []
    for e in range(256):
        n.base.pyadaq_kvt_scale(e, out)
        scales.append(out[0])
    parts.append(np.asarray(scales, np.float32).tobytes().hex())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_types(research: bool = False) -> list[CacheType]:
    """Every supported KV-cache type; with ``research=True`` also the format candidates."""
    return [t for t in _table().values() if research or not t.research]


def cache_type(spec: str | int | CacheType) -> CacheType:
    """A cache type by name (case-insensitive), ggml id, or CacheType."""
    if isinstance(spec, CacheType):
        return spec
    table = _table()
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise TypeError(f"a cache type is a name or a ggml type id, not {type(spec).__name__}")
    if isinstance(spec, int):
        for t in table.values():
            if t.id == spec:
                return t
        raise ValueError(f"ggml type id {spec} is not a supported KV-cache type; "
                         f"supported: {', '.join(f'{t.name}={t.id}' for t in table.values())}")
    key = spec.strip().lower()
    if key not in table:
        raise ValueError(f"unknown KV-cache type '{spec}'; supported: {', '.join(table)}")
    return table[key]
