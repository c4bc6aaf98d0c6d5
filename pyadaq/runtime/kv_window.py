"""The recent-token window: the K/V rows of the last W cells a context wrote, kept in f16 beside
its quantized cache and attended at that precision (native/src/pyadaq-kv-window.h).

A quantized cache's error per token does not average out when attention rests on a few tokens:
in a short context (a chat's first question) every token carries much of the weight. With a
window, a context shorter than W cells is attended as with an f16 cache, and a longer one keeps
its last W tokens exact. The copies cost W rows of f16 per quantized layer side (the window's
bytes: ``Context.kv_window_bytes``); pyadaq's CPU flash-attention kernels read them, other
backends' kernels the quantized rows, so a window needs flash attention on the CPU. Hybrid
models (recurrent and attention memory), DFlash drafts and contexts with several streams of
cells get none (the context then refuses to be made with one).
"""

from __future__ import annotations

__all__ = ["MAX_CELLS", "check_kv_window", "check_window_made", "window_bytes", "window_cells"]

MAX_CELLS = 65536  # PYADAQ_KV_WINDOW_MAX


def check_kv_window(kv_window, flash_attn: bool = True, n_gpu_layers: int = 0) -> int:
    """``kv_window`` as a number of cells, or ValueError: not an integer in 0..MAX_CELLS, or a
    window (> 0) without flash attention or with layers offloaded to a GPU (whose kernels read
    only the quantized rows; ``n_gpu_layers`` counts only where ggml has a GPU device)."""
    if isinstance(kv_window, bool) or not isinstance(kv_window, int):
        raise ValueError(f"kv_window must be a whole number of cells, not {kv_window!r}")
    if not 0 <= kv_window <= MAX_CELLS:
        raise ValueError(f"kv_window must be between 0 and {MAX_CELLS} cells, not {kv_window}")
    if kv_window and not flash_attn:
        raise ValueError("a KV window needs flash attention (pyadaq's CPU kernels read it)")
    if kv_window and n_gpu_layers and _gpu_devices():
        raise ValueError("a KV window is read by pyadaq's CPU flash-attention kernels only: use n_gpu_layers=0 "
                         "or no window")
    return kv_window


def _gpu_devices() -> int:
    from pyadaq._native import native

    return native().gpu_devices()


def window_cells(ctx_ptr) -> int:
    """The window of a llama_context (cells; 0: none, also when no layer's cache is quantized)."""
    from pyadaq._native import native

    n = native()
    return int(n.llama.pyadaq_kv_window_cells(n.ffi.cast("void *", int(ctx_ptr))))


def window_bytes(ctx_ptr) -> int:
    """Bytes of a llama_context's window: its f16 copies and tags (0 without one)."""
    from pyadaq._native import native

    n = native()
    return int(n.llama.pyadaq_kv_window_bytes(n.ffi.cast("void *", int(ctx_ptr))))


def check_window_made(ctx_ptr, kv_window: int, types) -> None:
    """ValueError when a window was asked for, some layer's cache (``types``: CacheType) is
    quantized, and libllama made none (hybrid and DFlash models, several streams of cells)."""
    if kv_window and any(t.quantized for t in types) and not window_cells(ctx_ptr):
        raise ValueError("llama.cpp made no KV window for this model (hybrid and DFlash models, and several "
                         "streams of cells, get none)")
