"""Per-layer KV-cache types and attention rotation for the next context a thread creates.

llama.cpp's context parameters hold one K and one V cache type. pyadaq's libllama adds a
thread-local slot of settings that the next ``llama_init_from_model`` on the same thread
takes, whether it succeeds or not (native/src/pyadaq-llama.cpp, native/patches/0005): K and V
types per layer, with which the KV cache (the iSWA cache of sliding-window models included)
allocates each layer's tensors, and whether a quantized cache is stored with attention
rotation, and the K/V transforms of a calibration (pyadaq.runtime.kv_transform): each layer's K
and V are then stored in the calibration's coordinates. :func:`next_context` fills the slot for
the context created inside its ``with`` block and empties it afterwards, so no other thread and
no later context sees it.
:func:`context_layer_types` reads back the types of the tensors a context holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from pyadaq._native import native
from pyadaq.types import CacheType, cache_type

__all__ = ["context_layer_types", "context_transform_layers", "next_context", "pending"]


def _ptr(p) -> object:
    n = native()
    if p is None:
        return n.ffi.NULL
    return n.ffi.cast("void *", int(p) if not hasattr(p, "value") else p.value)


def _set_layer_types(model_ptr, types_k: Sequence, types_v: Sequence) -> None:
    n = native()
    tk = [cache_type(t).id for t in types_k]
    tv = [cache_type(t).id for t in types_v]
    if len(tk) != len(tv) or not tk:
        raise ValueError(f"per-layer types need one K and one V type per layer ({len(tk)} K, {len(tv)} V given)")
    err = n.ffi.new("char[]", 512)
    rc = n.llama.pyadaq_next_context_layer_types(_ptr(model_ptr), len(tk), n.ffi.new("int32_t[]", tk),
                                                 n.ffi.new("int32_t[]", tv), err, 512)
    if rc != 0:
        raise ValueError(f"per-layer KV cache types refused by libllama: {n.ffi.string(err).decode()}")


def _set_transforms(transforms) -> None:
    n = native()
    err = n.ffi.new("char[]", 512)
    for t in transforms:
        heads, d = t.mean.shape if t.matrix is None else t.matrix.shape[:2]
        matrix = n.ffi.NULL if t.matrix is None else n.ffi.from_buffer("float[]", t.matrix)
        scale = n.ffi.NULL if t.scale is None else n.ffi.from_buffer("float[]", t.scale)
        mean = n.ffi.NULL if t.mean is None else n.ffi.from_buffer("float[]", t.mean)
        inverse = n.ffi.NULL if t.inverse is None else n.ffi.from_buffer("float[]", t.inverse)
        rc = n.llama.pyadaq_next_context_kv_transform(
            t.layer, int(t.is_v), heads, d, matrix, scale, mean, inverse, err, 512)
        if rc != 0:
            raise ValueError(f"calibration refused by libllama: {n.ffi.string(err).decode()}")


@contextlib.contextmanager
def next_context(types_k: Sequence | None = None, types_v: Sequence | None = None, *,
                 model_ptr=None, attn_rot: bool | tuple | None = None, transforms=None,
                 kv_window: int = 0) -> Iterator[None]:
    """Settings for the context created on this thread inside the ``with`` block.

    ``types_k`` / ``types_v``: one cache type per layer (``None``: the context's uniform
    types). With ``model_ptr`` (a loaded llama_model) the types are checked against the model
    at once and a misfit raises ``ValueError`` with libllama's reason (wrong layer count, a
    type whose block size does not divide a layer's head size); without it (the model is
    loaded inside the block) the context creation fails instead. ``attn_rot``: ``False``
    stores a quantized cache without attention rotation, ``True`` with it where upstream
    would, ``None`` as upstream decides (``LLAMA_ATTN_ROT_DISABLE``); a pair ``(k, v)`` of those
    sets K and V apart. ``transforms``: the
    per-layer K/V transforms of a calibration (:func:`pyadaq.runtime.kv_transform.kv_transforms`,
    from a calibration already checked against the model), which the context's KV cache then uses.
    ``kv_window``: the number of most recently written cells whose K/V rows the context also keeps
    in f16 beside its quantized cache (0: none; :mod:`pyadaq.runtime.kvconfig` checks it).

    The first ``llama_init_from_model`` on this thread takes the settings; whatever happens
    inside the block, none are left afterwards.
    """
    n = native()
    n.llama.pyadaq_next_context_clear()
    try:
        if types_k is not None:
            _set_layer_types(model_ptr, types_k, types_v if types_v is not None else [])
        if isinstance(attn_rot, tuple):
            k, v = (-1 if r is None else int(bool(r)) for r in attn_rot)
            n.llama.pyadaq_next_context_attn_rot_kv(k, v)
        elif attn_rot is not None:
            n.llama.pyadaq_next_context_attn_rot(1 if attn_rot else 0)
        if transforms:
            _set_transforms(transforms)
        if kv_window and n.llama.pyadaq_next_context_kv_window(int(kv_window)) != 0:
            raise ValueError(f"KV window of {kv_window} cells refused by libllama")
        yield
    finally:
        n.llama.pyadaq_next_context_clear()


def pending() -> int:
    """What this thread's slot holds (bit 0: per-layer types, bit 1: attention rotation, bit 2: a
    calibration, bit 3: a KV window)."""
    return int(native().llama.pyadaq_next_context_pending())


def context_layer_types(ctx_ptr, n_layer: int) -> tuple[list[CacheType | None], list[CacheType | None]]:
    """The cache types of each layer's K and V tensors in a context: two lists of
    :class:`CacheType` (``None`` for layers without their own cache tensors)."""
    n = native()
    k = n.ffi.new("int32_t[]", max(n_layer, 1))
    v = n.ffi.new("int32_t[]", max(n_layer, 1))
    got = n.llama.pyadaq_kv_layer_types(_ptr(ctx_ptr), n_layer, k, v)
    if got < 0:
        raise RuntimeError("this context has no KV cache pyadaq can read")

    def conv(x: int) -> CacheType | None:
        return None if x < 0 else cache_type(int(x))

    return [conv(k[i]) for i in range(n_layer)], [conv(v[i]) for i in range(n_layer)]


def context_transform_layers(ctx_ptr) -> int:
    """How many layers of a context store their K/V cache in calibrated coordinates."""
    return int(native().llama.pyadaq_kv_transform_layers(_ptr(ctx_ptr)))
