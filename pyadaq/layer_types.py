"""Per-layer KV-cache types through libllama's ``pyadaq_set_layer_cache_types``.

llama.cpp's context parameters hold one K and one V cache type. pyadaq's libllama adds a
per-model list of types per layer that the next ``llama_init_from_model`` for that model
takes (native/src/pyadaq-llama.cpp, native/patches/0005): the KV cache (the iSWA cache of
sliding-window models included) then allocates each layer's K and V tensors with its own
type. These helpers set that list, make sure it never outlives the call it was meant for,
and read back the types of the tensors a context actually holds.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Tuple

from ._native import native
from .types import CacheType, cache_type

__all__ = ["pending_layer_types", "set_layer_types", "clear_layer_types", "context_layer_types"]


def _ptr(p) -> object:
    n = native()
    if p is None:
        raise ValueError("NULL llama.cpp pointer")
    return n.ffi.cast("void *", int(p) if not hasattr(p, "value") else p.value)


def set_layer_types(model_ptr, types_k: Sequence, types_v: Sequence) -> None:
    """Store K/V types per layer for the next context created from the model at model_ptr.

    Raises ``ValueError`` with libllama's reason (wrong layer count, a type a KV cache cannot
    hold, a block size that does not divide the layer's head size) and stores nothing.
    """
    n = native()
    tk = [cache_type(t).id for t in types_k]
    tv = [cache_type(t).id for t in types_v]
    if len(tk) != len(tv) or not tk:
        raise ValueError(f"per-layer types need one K and one V type per layer ({len(tk)} K, {len(tv)} V given)")
    err = n.ffi.new("char[]", 512)
    rc = n.llama.pyadaq_set_layer_cache_types(_ptr(model_ptr), len(tk), n.ffi.new("int32_t[]", tk),
                                              n.ffi.new("int32_t[]", tv), err, 512)
    if rc != 0:
        raise ValueError(f"per-layer KV cache types refused by libllama: {n.ffi.string(err).decode()}")


def clear_layer_types(model_ptr) -> None:
    """Drop per-layer types still pending for the model (no-op when none are)."""
    n = native()
    n.llama.pyadaq_set_layer_cache_types(_ptr(model_ptr), 0, n.ffi.NULL, n.ffi.NULL, n.ffi.NULL, 0)


def has_layer_types(model_ptr) -> bool:
    return bool(native().llama.pyadaq_has_layer_cache_types(_ptr(model_ptr)))


@contextlib.contextmanager
def pending_layer_types(model_ptr, types_k: Optional[Sequence], types_v: Optional[Sequence]) -> Iterator[None]:
    """Per-layer types for the context created inside the ``with`` block.

    The types are consumed by the first ``llama_init_from_model`` for the model; whatever
    happens inside the block, none are left pending afterwards, so a later context of the
    same model gets the uniform types it asks for. ``types_k=None`` does nothing.
    """
    if types_k is None:
        yield
        return
    set_layer_types(model_ptr, types_k, types_v)
    try:
        yield
    finally:
        clear_layer_types(model_ptr)


def context_layer_types(ctx_ptr, n_layer: int) -> Tuple[list, list]:
    """The cache types of each layer's K and V tensors in a context: two lists of
    :class:`CacheType` (``None`` for layers without their own cache tensors)."""
    n = native()
    k = n.ffi.new("int32_t[]", max(n_layer, 1))
    v = n.ffi.new("int32_t[]", max(n_layer, 1))
    got = n.llama.pyadaq_kv_layer_types(_ptr(ctx_ptr), n_layer, k, v)
    if got < 0:
        raise RuntimeError("this context has no KV cache pyadaq can read")

    def conv(x: int) -> Optional[CacheType]:
        return None if x < 0 else cache_type(int(x))

    return [conv(k[i]) for i in range(n_layer)], [conv(v[i]) for i in range(n_layer)]
