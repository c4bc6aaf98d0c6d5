"""Evaluate token chunks under a given KV-cache configuration and return logits.

One model is loaded once; each K/V configuration gets its own llama.cpp context on it.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from ._native import creation_lock, native
from .layer_types import next_context
from .offload import KVOffloadError, check_offload
from .types import CacheType, cache_type

_llama_cpp = native().llama_cpp


def quiet_native_logs() -> None:
    """Only llama.cpp's errors reach stderr (as with Llama(verbose=False))."""
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)


def default_gpu_layers() -> int:
    """Layers to offload when a caller does not say: $PYADAQ_GPU_LAYERS, else 0 (CPU). The
    GPU check script (scripts/gpu-check.sh) sets it so that the test suite and `pyadaq eval`
    run on the GPU."""
    raw = os.environ.get("PYADAQ_GPU_LAYERS", "").strip()
    try:
        return int(raw) if raw else 0
    except ValueError:
        raise ValueError(f"PYADAQ_GPU_LAYERS must be a number of layers, not {raw!r}") from None


class Model:
    def __init__(self, path: str, n_gpu_layers: int | None = None):
        params = _llama_cpp.llama_model_default_params()
        params.n_gpu_layers = default_gpu_layers() if n_gpu_layers is None else n_gpu_layers
        self.path = str(path)
        with creation_lock:
            self.ptr = _llama_cpp.llama_model_load_from_file(self.path.encode(), params)
        if not self.ptr:
            raise ValueError(f"llama.cpp could not load {path}")
        self.vocab = _llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = _llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.adds_bos = bool(_llama_cpp.llama_vocab_get_add_bos(self.vocab))

    def tokenize(self, text: str, add_bos: bool = True) -> np.ndarray:
        data = text.encode()
        n_max = len(data) + 16
        buf = (_llama_cpp.llama_token * n_max)()
        n = _llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, False)
        if n < 0:
            raise RuntimeError("tokenization failed")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32).copy()

    def close(self) -> None:
        if self.ptr:
            _llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


class Context:
    """A llama.cpp context with the given K/V cache types that scores chunks."""

    def __init__(self, model: Model, cache_type_k: str | int | CacheType, cache_type_v: str | int | CacheType,
                 n_ctx: int, n_threads: int | None = None, attn_rot: bool = True, flash_attn: bool = True,
                 layer_types: tuple | None = None, cb_eval=None):
        """layer_types: optional (types_k, types_v), one cache type per layer, used instead of
        cache_type_k/cache_type_v for the layers' tensors (pyadaq.layer_types). cb_eval: an
        optional (callback, user_data) pair of C pointers for llama.cpp's evaluation callback."""
        self.ptr = None
        self.model = model
        self.k = cache_type(cache_type_k)
        self.v = cache_type(cache_type_v)
        p = _llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_ctx
        p.n_ubatch = min(n_ctx, 512)
        p.n_seq_max = 1
        threads = n_threads or max(1, os.cpu_count() or 1)
        p.n_threads = threads
        p.n_threads_batch = threads
        p.type_k = self.k.id
        p.type_v = self.v.id
        p.flash_attn_type = (_llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                             else _llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if cb_eval is not None:
            p.cb_eval = ctypes.cast(int(cb_eval[0]), _llama_cpp.ggml_backend_sched_eval_callback)
            p.cb_eval_user_data = ctypes.c_void_p(int(cb_eval[1]))
        types_k, types_v = layer_types if layer_types is not None else (None, None)
        with creation_lock, next_context(types_k, types_v, model_ptr=model.ptr, attn_rot=attn_rot):
            self.ptr = _llama_cpp.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            what = "per-layer K/V types" if layer_types is not None else f"K={self.k} V={self.v}"
            raise ValueError(f"llama.cpp could not create a context with {what}")
        try:
            check_offload(self.ptr)  # a GPU-resident cache must run on its GPU
        except KVOffloadError:
            _llama_cpp.llama_free(self.ptr)
            self.ptr = None
            raise
        self.n_ctx = n_ctx
        self.batch = _llama_cpp.llama_batch_init(n_ctx, 0, 1)

    @property
    def kv_cache_bytes(self) -> int:
        return int(native().llama.pyadaq_kv_cache_bytes(native().ffi.cast("void *", self.ptr)))

    def logits(self, tokens: np.ndarray, first_scored: int) -> np.ndarray:
        """Evaluate `tokens` from an empty cache; logits of positions first_scored..len-1."""
        n = len(tokens)
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit a context of {self.n_ctx}")
        _llama_cpp.llama_memory_clear(_llama_cpp.llama_get_memory(self.ptr), True)
        b = self.batch
        b.n_tokens = n
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i >= first_scored
        rc = _llama_cpp.llama_decode(self.ptr, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        out = np.empty((n - first_scored, self.model.n_vocab), dtype=np.float32)
        for row, i in enumerate(range(first_scored, n)):
            ptr = _llama_cpp.llama_get_logits_ith(self.ptr, i)
            out[row] = np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))
        return out

    def close(self) -> None:
        if self.ptr:
            _llama_cpp.llama_batch_free(self.batch)
            _llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()
