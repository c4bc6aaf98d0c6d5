"""No silent CPU fallback: does each layer's KV cache run on the device that holds it?

When a layer's K/V cache lives on a GPU whose backend cannot run an op that layer needs with
its types (writing the cache, flash attention for the K/V pair, or the K.Q product without
flash attention), ggml's scheduler runs that op on the CPU and copies the cache over every
token: the context works, but at CPU speed, and nothing says so. libllama's
``pyadaq_kv_offload_check`` asks the device about every op of every GPU-resident layer;
pyadaq turns what it finds into an error (or, if the caller allows the fallback, a warning).
llama.cpp's own tools built from pyadaq's tree log the same finding as a warning.
"""

from __future__ import annotations

import warnings

from pyadaq._native import native

__all__ = ["KVOffloadError", "check_offload", "offload_problems"]


class KVOffloadError(RuntimeError):
    """A layer's KV cache is on a GPU that cannot run the ops its K/V types need."""


def offload_problems(ctx_ptr: int) -> list[str]:
    """One line per layer whose cache ops its device cannot run; [] when all can (or when
    the whole cache is in CPU memory)."""
    n = native()
    fn = getattr(n.llama, "pyadaq_kv_offload_check", None)
    if fn is None:
        raise NotImplementedError("this libllama does not export pyadaq_kv_offload_check; rebuild pyadaq")
    buf = n.ffi.new("char[]", 8192)
    rc = int(fn(n.ffi.cast("void *", int(ctx_ptr)), buf, len(buf)))
    if rc < 0:
        return []  # no KV cache (e.g. an embedding-only or recurrent model): nothing to check
    text = n.ffi.string(buf).decode("utf-8", "replace")
    return [line for line in text.splitlines() if line.strip()][:rc] if rc else []


def _message(problems: list[str]) -> str:
    return (
        f"{len(problems)} layer(s) of the KV cache are on a GPU that cannot run what their K/V types "
        "need; llama.cpp would run those ops on the CPU, copying the cache every token:\n  "
        + "\n  ".join(problems)
        + "\nChoose K/V types the GPU runs (`pyadaq types` lists them), turn flash attention on, "
        "keep the cache in CPU memory (offload_kqv=False), or pass allow_cpu_fallback=True to accept it."
    )


def check_offload(ctx_ptr: int, *, allow_cpu_fallback: bool = False) -> None:
    """Raise KVOffloadError (or warn, with allow_cpu_fallback) when offload_problems finds any."""
    problems = offload_problems(ctx_ptr)
    if not problems:
        return
    if allow_cpu_fallback:
        warnings.warn(_message(problems), RuntimeWarning, stacklevel=3)
        return
    raise KVOffloadError(_message(problems))
