"""The per-layer K/V transforms a calibrated context uses, derived from a calibration and the
layer's cache types.

libllama applies, per layer and KV head, x~ = ((x - mean) . M) / s to the keys and values it
caches, q . M * s to the queries, and (out~ * s) . M^T + mean to attention's output
(native/src/pyadaq-kv-transform.h); this module chooses M, s and the means:

* a float cache (f32, f16, bf16): M = the calibration's principal directions, s = 1: the
  cache holds each head's principal coordinates, less the mean;
* a block-quantized cache of one bit width (q8_0, q4_0, kvq2, ...): M = the principal
  directions followed by a Hadamard rotation (of the largest power-of-two blocks that make up
  the head size), s = 1: the mean comes out, and every block still sees values of one size,
  as with llama.cpp's own rotation, which a calibrated context does not use.

The means stay in the keys of layers with soft-capped logits or attention sinks (libllama
decides that from the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from pyadaq.types import cache_type

__all__ = ["LayerTransform", "hadamard", "kv_transforms"]


@dataclass(frozen=True)
class LayerTransform:
    layer: int
    is_v: bool
    matrix: np.ndarray  # [heads, d, d], orthonormal columns: the cache's coordinates
    scale: np.ndarray | None  # [heads, d] or None (all 1)
    mean: np.ndarray  # [heads, d]


@cache
def hadamard(d: int) -> np.ndarray:
    """An orthonormal d x d matrix that spreads every coordinate over all of its block: the
    normalized Sylvester-Hadamard matrices of the powers of two in d's binary expansion, on the
    diagonal (d = 96: blocks of 64 and 32)."""
    out = np.zeros((d, d))
    start = 0
    for bit in reversed(range(d.bit_length())):
        n = 1 << bit
        if not d & n:
            continue
        h = np.ones((1, 1))
        while h.shape[0] < n:
            h = np.block([[h, h], [h, -h]])
        out[start:start + n, start:start + n] = h / np.sqrt(n)
        start += n
    return out


def _for_type(comps, t) -> tuple[np.ndarray, np.ndarray | None]:
    basis = comps.basis.astype(np.float64)
    if not t.quantized:
        return basis, None
    return basis @ hadamard(comps.head_size), None


def kv_transforms(calibration, types_k, types_v) -> list[LayerTransform]:
    """The transforms of every calibrated layer, for one K and one V cache type per layer."""
    out = []
    for il in calibration.layers():
        for is_v, comps, t in ((False, calibration.k[il], types_k[il]), (True, calibration.v[il], types_v[il])):
            matrix, scale = _for_type(comps, cache_type(t))
            out.append(LayerTransform(il, is_v, np.ascontiguousarray(matrix, dtype=np.float32),
                                      None if scale is None else np.ascontiguousarray(scale, dtype=np.float32),
                                      np.ascontiguousarray(comps.mean, dtype=np.float32)))
    return out
