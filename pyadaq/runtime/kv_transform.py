"""The per-layer K/V transforms a calibrated context uses, derived from a calibration and the
layer's cache types.

libllama applies, per layer and KV head, x~ = ((x - mean) . M) / s to the keys and values it
caches, q . M * s to the queries, and (out~ * s) . M^T + mean to attention's output
(native/src/pyadaq-kv-transform.h); this module chooses M, s and the means. Keys are always
transformed; values only when a layer's V type is transform-coded (:func:`transforms_values`),
otherwise they keep llama.cpp's rotation. When no layer's K type is transform-coded (and
llama.cpp rotates quantized keys), the keys only take out their mean (M is the identity, which
costs no product) and keep llama.cpp's rotation (:func:`keys_by_mean`). Every other part is
stored, per cache type:

* a float cache (f32, f16, bf16): M = the calibration's principal directions, s = 1: the
  cache holds each head's principal coordinates, less the mean;
* a block-quantized cache of one bit width (q8_0, q4_0, kvq2, ...): M = the principal
  directions followed by a Hadamard rotation (of the largest power-of-two blocks that make up
  the head size), s = 1: the mean comes out, and every block still sees values of one size,
  as with llama.cpp's own rotation, which is then off for the keys;
* a transform-coded type (kvt1, kvt2, kvt3, kvt4 and the steep kvt*s, :attr:`CacheType.calibrated`):
  the principal directions interleaved by rank, so that position p of block b (of the head's
  d/64 blocks of 64) holds direction p * d/64 + b, and s = the square root of each direction's
  variance (at least 1e-6 of the largest): every stored value has unit variance on the
  calibration text, and every block sees the same descending spectrum, which the type's bit
  profile follows (:data:`WHITENING`).
  The directions that share a bit width (one group of 8 positions in every
  block) are then mixed by a Hadamard rotation and share their root mean variance as scale: a
  principal coordinate alone is far from Gaussian, a mix of a few is closer (embedded model,
  K=q8_0 with V=kvt3: KL 0.055 mixed on 2 chunks, 0.09-0.12 for every unmixed variant;
  docs/CALIBRATION.md).

What each part subtracts before its transform (its offset, added back to attention's output for
values; for keys it shifts every logit of a query alike, which softmax ignores), and so the
point about which its directions and scales are taken (the second moment about the offset:
covariance + (mean - offset)(mean - offset)^T), :func:`part_offset`:

* transform-coded types, when the calibration recorded them: the key and value that a sequence
  starting with the model's BOS token caches at position 0. Attention puts much of its weight on
  that token (about half in the global layers of Gemma 3), so its row should be stored exactly,
  and relative to itself it is stored as zeros, which every format keeps exactly. On the
  embedded model (scripts' measurement in docs/CALIBRATION.md) this is what made kvt values
  better than the rotated flat types instead of worse: their squared error per token was half
  of kvq2's, but the BOS row, unlike the data the directions were fitted to, came back with 5
  times kvq2's error, and in the global layers that row carries half the attention;
* otherwise: the key mean for keys, nothing for values. Taking the value mean out makes the
  near-zero values of the sink tokens large (K f16 with V kvq2 on the embedded model, 2 chunks
  of 512: KL 0.084 without a calibration, 0.134 with the value mean out);
* nothing where the model keeps the offset in the data (``Calibration.offsets_kept``: the keys
  of layers with soft-capped logits, keys and values of layers with learned attention sinks,
  where the identities do not hold): such parts are stored, and fitted, about zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import numpy as np

from pyadaq.types import cache_type

__all__ = ["LayerTransform", "context_settings", "coordinates_fingerprint", "hadamard", "interleave", "keys_by_mean",
           "kv_transforms", "matrix_and_scale", "part_components", "part_offset", "require_calibration",
           "transforms_values"]


@dataclass(frozen=True)
class LayerTransform:
    layer: int
    is_v: bool
    matrix: np.ndarray | None  # [heads, d, d], orthonormal columns: the cache's coordinates (None: the identity)
    scale: np.ndarray | None  # [heads, d] or None (all 1)
    mean: np.ndarray | None  # [heads, d]: the offset taken out (part_offset), or None
    inverse: np.ndarray | None = None  # [heads, d, d]: the inverse of matrix (None: its transpose)


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


# The period of every transform-coded type's bit profile: a kvt block, and each of the four
# sub-blocks of a row-trellis (kvt*r) block, whose profile repeats every 64 values.
PROFILE_BLOCK = 64


def interleave(d: int, block: int = PROFILE_BLOCK) -> np.ndarray:
    """order[j]: the principal direction (by descending variance) stored at position j of a head
    of d values in blocks of `block`: position p of block b holds direction p * (d/block) + b."""
    nb = d // block
    j = np.arange(d)
    return (j % block) * nb + j // block


def _mix_groups(matrix, var, block: int, group: int = 8):
    """Rotate together the directions that share a bit width: the positions of one group of
    every block (group positions x d/block blocks, a power of two) get a Hadamard mix of those
    directions, and their common scale (the root mean variance of the set)."""
    d = matrix.shape[1]
    j = np.arange(d)
    matrix, var = matrix.copy(), var.copy()
    for g in range(block // group):
        sel = j[(j % block) // group == g]
        h = hadamard(len(sel))
        matrix[:, :, sel] = matrix[:, :, sel] @ h
        var[:, sel] = var[:, sel].mean(axis=1, keepdims=True)
    return matrix, var


# How far each transform-coded type whitens: s = sd ** WHITENING.get(type, 1). Every profile
# divides each direction by its standard deviation. Half-whitened values (0.5) were tried: 19 %
# less KL on short chat exchanges, but pass-key retrieval at 4096 tokens fell from 83 % to 50 %
# (f16: 80 %) and held-out prose got no better (docs/CALIBRATION.md, "Values on other text").
# scripts/chat_kl.py --values-whitening reruns the comparison.
WHITENING: dict[str, float] = {}


def matrix_and_scale(comps, t) -> tuple[np.ndarray, np.ndarray | None]:
    """(M [heads, d, d], s [heads, d] or None) of one layer's K or V part (its components:
    :func:`part_components`) stored in cache type t: the cache holds ((x - mean) M) / s."""
    basis = comps.basis.astype(np.float64)
    if t.calibrated:
        if comps.head_size % t.block_size:
            raise ValueError(f"{t.name} needs a head size that is a multiple of {t.block_size}, "
                             f"not {comps.head_size}")
        order = interleave(comps.head_size, PROFILE_BLOCK)
        var = np.maximum(comps.var.astype(np.float64), 1e-6 * comps.var.max(axis=1, keepdims=True))
        var = np.maximum(var, 1e-30)
        matrix, var = _mix_groups(basis[:, :, order], var[:, order], PROFILE_BLOCK)
        return matrix, np.sqrt(var) ** WHITENING.get(t.name, 1.0)
    if not t.quantized:
        return basis, None
    return basis @ hadamard(comps.head_size), None


def _about(comps, offset):
    """The same data's principal directions about `offset` [heads, d] instead of about the mean:
    the eigenbasis of the second moment about it, covariance + (mean - offset)(mean - offset)^T,
    by descending second moment (the mean field stays the data's mean)."""
    from pyadaq.model.calibration import Components

    m = comps.mean.astype(np.float64) - offset.astype(np.float64)
    second = comps.covariance().astype(np.float64) + m[:, :, None] * m[:, None, :]
    w, v = np.linalg.eigh(0.5 * (second + second.transpose(0, 2, 1)))
    return Components(comps.mean, v[:, :, ::-1].astype(np.float32), np.clip(w[:, ::-1], 0, None).astype(np.float32))


def part_offset(calibration, il: int, is_v: bool, t=None) -> np.ndarray | None:
    """What a layer's K or V part stored in cache type `t` subtracts before its transform
    ([heads, d]; None: nothing): see the module doc."""
    if calibration.offsets_kept and (il, is_v) in calibration.offsets_kept:
        return None
    first = calibration.v_first if is_v else calibration.k_first
    if t is not None and cache_type(t).calibrated and first is not None:
        return first[il]
    return None if is_v else calibration.k[il].mean


def part_components(calibration, il: int, is_v: bool, t=None):
    """The components a layer's keys or values in cache type `t` are stored by: those of the
    data about :func:`part_offset` (the keys' covariance when the offset is their mean)."""
    comps = calibration.v[il] if is_v else calibration.k[il]
    offset = part_offset(calibration, il, is_v, t)
    if offset is None:
        return _about(comps, np.zeros_like(comps.mean))
    if offset is comps.mean:
        return comps
    return _about(comps, offset)


def transforms_values(types_v) -> bool:
    """Whether a calibrated context transforms its values: only when some layer's V type is
    transform-coded. Otherwise the values are left as they are (a transform gains them nothing,
    docs/CALIBRATION.md, and would cost d x d floats per KV head and layer), with llama.cpp's
    own rotation for quantized ones; the keys are always transformed (their mean at least,
    :func:`keys_by_mean`)."""
    return any(cache_type(t).calibrated for t in types_v)


def keys_by_mean(calibration, types_k, attn_rot=None) -> bool:
    """Whether a calibrated context's keys only take out their mean (M the identity) and leave
    their rotation to llama.cpp: when no layer's K type is transform-coded and either no K type is
    quantized (a float cache gains nothing from a basis) or llama.cpp rotates the keys (its
    rotation not turned off, here or by LLAMA_ATTN_ROT_DISABLE, and every head size a multiple of
    64: its condition). The principal directions followed by a Hadamard rotation, which such keys
    took before, cost a d x d product per query head and key on every token (on the embedded model
    2.5 % of prompt processing at depth 4096) for no measured gain (docs/CALIBRATION.md, "Keys of
    the flat types")."""
    types = [cache_type(t) for t in types_k]
    if any(t.calibrated for t in types):
        return False
    if not any(t.quantized for t in types):
        return True
    # llama.cpp's own switch (LLAMA_ATTN_ROT_DISABLE=1) turns its rotation off for every context
    env_off = os.environ.get("LLAMA_ATTN_ROT_DISABLE", "0").strip() not in ("", "0")
    return ((attn_rot is None or bool(attn_rot)) and not env_off
            and all(calibration.k[il].head_size % 64 == 0 for il in calibration.layers()))


def kv_transforms(calibration, types_k, types_v, by_mean: bool = False) -> list[LayerTransform]:
    """The transforms of every calibrated layer, for one K and one V cache type per layer: keys
    always, values when :func:`transforms_values`. by_mean: the keys only take out their mean
    (:func:`keys_by_mean`)."""
    out = []
    # the sides a matrix transforms (keys by their mean alone get only their offset)
    sides = ([] if by_mean else [False]) + ([True] if transforms_values(types_v) else [])
    for il in calibration.layers():
        if by_mean:
            # an identity part takes a mean: zero where the model keeps the keys' offset in
            offset = part_offset(calibration, il, False, types_k[il])
            if offset is None:
                offset = np.zeros_like(calibration.k[il].mean)
            out.append(LayerTransform(il, False, None, None, np.ascontiguousarray(offset, dtype=np.float32)))
        for is_v in sides:
            t = (types_v if is_v else types_k)[il]
            comps, offset = part_components(calibration, il, is_v, t), part_offset(calibration, il, is_v, t)
            matrix, scale = matrix_and_scale(comps, cache_type(t))
            out.append(LayerTransform(il, is_v, np.ascontiguousarray(matrix, dtype=np.float32),
                                      None if scale is None else np.ascontiguousarray(scale, dtype=np.float32),
                                      None if offset is None else np.ascontiguousarray(offset, dtype=np.float32)))
    return out


def require_calibration(types, calibration) -> None:
    """ValueError when a calibrated cache type (kvt*) is asked for without a calibration."""
    if calibration is not None:
        return
    need = sorted({cache_type(t).name for t in types if cache_type(t).calibrated})
    if need:
        raise ValueError(f"cache type {', '.join(need)} stores a calibration's coordinates and needs one: pass "
                         "kv_calibration=FILE (from `pyadaq calibrate`; in the tools --kv-calibration or a +cal "
                         "config)")


def coordinates_fingerprint(transforms, attn_rot) -> str | None:
    """Hex sha256 of what a calibrated context stores its K/V in: every transform's matrix (or
    the identity), scales and offset, and llama.cpp's rotations (:func:`context_settings`' two
    results; None without transforms). A saved state loads only where this agrees: the same
    calibration once gave other coordinates (keys took principal directions before
    :func:`keys_by_mean`)."""
    if transforms is None:
        return None
    import hashlib

    h = hashlib.sha256(repr(attn_rot).encode())
    for t in transforms:
        h.update(f"{t.layer}:{int(t.is_v)}".encode())
        for a in (t.matrix, t.scale, t.mean, t.inverse):
            h.update(b"-" if a is None else np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


def context_settings(calibration, types_k, types_v, attn_rot=None) -> tuple:
    """What a context with these per-layer types needs of the next-context slot
    (pyadaq.runtime.layer_types.next_context): ``(transforms, attn_rot)``. Without a calibration:
    no transforms and attn_rot as given (a kvt type raises, :func:`require_calibration`). With
    one: its transforms; llama.cpp's key rotation as given where the keys only take out their
    mean (:func:`keys_by_mean`), else off (the transforms rotate the keys); its value rotation off
    when the values are transformed, else as given."""
    require_calibration([*types_k, *types_v], calibration)
    if calibration is None:
        return None, attn_rot
    by_mean = keys_by_mean(calibration, types_k, attn_rot)
    rot = (attn_rot if by_mean else False, False if transforms_values(types_v) else attn_rot)
    return kv_transforms(calibration, types_k, types_v, by_mean), rot
