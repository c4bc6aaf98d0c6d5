"""Predicted errors from a KV calibration's spectra: the planner's ``"spectra"`` source.

For every layer's K and V and every candidate cache type, the squared error per cached token
that storing that part in that type adds, in the model's coordinates, if each head's data were
Gaussian with the calibration's spectrum:

* a float cache (16 bits or more): 0;
* a block type of one bit width (q8_0, q4_0, kvq2, ...): the type's error on unit-variance
  Gaussian values (``unit_error``) times the part's total variance: a calibrated context's keys
  (their mean out, then llama.cpp's rotation; principal directions, then a Hadamard rotation,
  where a kvt K type is present) and llama.cpp's rotated values all give every block values of
  the same spread, and each block's scale follows it;
* a transform-coded type (kvt*): what the context stores is whitened (``matrix_and_scale`` of
  :mod:`pyadaq.runtime.kv_transform`: position j holds unit-variance data of scale s_j), so the
  error is the sum over positions of s_j**2 times the type's error at that position of a block of
  unit Gaussians (``position_errors``: its bit profile).

Each part is measured about what its context subtracts (pyadaq.runtime.kv_transform.part_offset:
the key mean, nothing for values, the first token's rows for transform-coded types).
The errors of all types come from the same formats (ggml's reference quantizer and to_float, on
a fixed seed), so they rank the types by what they do to Gaussian data. Real values are not
Gaussian (a few sink tokens carry most of the attention), so where it matters the measured KL
source ranks better (docs/CALIBRATION.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

from pyadaq._native import native
from pyadaq.runtime.kv_transform import matrix_and_scale, part_components
from pyadaq.types import CacheType, cache_type

__all__ = ["position_errors", "predicted_errors", "unit_error"]

_SAMPLES = 1 << 16
_SEED = 20261202


def _gaussian(n: int) -> np.ndarray:
    return np.random.default_rng(_SEED).standard_normal(n).astype(np.float32)


def unit_error(type_id: int) -> float:
    """Mean squared error of a cache type on unit-variance Gaussian values (0 for float types):
    the mean of its position errors."""
    return float(position_errors(type_id).mean())


@cache
def position_errors(type_id: int) -> np.ndarray:
    """Mean squared error at each position of a block of unit-variance Gaussian values [block]:
    the bit profile of a transform-coded type, flat for the others."""
    t = cache_type(type_id)
    if not t.quantized:
        return np.zeros(t.block_size)
    x = _gaussian(_SAMPLES - _SAMPLES % t.block_size)
    e = (native().roundtrip(t.id, x) - x).astype(np.float64) ** 2
    return e.reshape(-1, t.block_size).mean(axis=0)


def _part_error(comps, t: CacheType) -> float:
    if not t.quantized:
        return 0.0
    if comps.head_size % t.block_size:
        return float("inf")
    if not t.calibrated:
        return unit_error(t.id) * float(comps.var.astype(np.float64).sum())
    _, scale = matrix_and_scale(comps, t)
    prof = position_errors(t.id)
    per_pos = np.tile(prof, comps.head_size // t.block_size)  # [d]
    return float((scale.astype(np.float64) ** 2 * per_pos[None, :]).sum())


def predicted_errors(calibration, types: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(errors_k, errors_v), each [n_layer, len(types)]: the squared error per token that storing
    a layer's K (or V) in each type adds (+inf where the type's block does not fit the head size;
    0 for layers without a cache of their own)."""
    cts = [cache_type(t) for t in types]
    out = [np.zeros((calibration.n_layer, len(cts))), np.zeros((calibration.n_layer, len(cts)))]
    for il in calibration.layers():
        for is_v in (False, True):
            out[is_v][il] = [_part_error(part_components(calibration, il, is_v, t), t) for t in cts]
    return out[0], out[1]
