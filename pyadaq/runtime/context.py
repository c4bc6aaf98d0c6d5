"""Running a model on token chunks: the one layer every evaluation goes through.

:class:`Model` loads a GGUF file once (its header checked first); each K/V configuration gets
its own :class:`Context` on it; :class:`Batch` feeds tokens to llama_decode. Evaluation,
pass-key, bench, analysis and calibration all decode through ``Batch`` and ``Context``.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from pyadaq._native import creation_lock, native
from pyadaq.model.calibration import calibration_for_model
from pyadaq.model.header import read_model_info
from pyadaq.runtime.kv_transform import context_settings
from pyadaq.runtime.kv_window import check_kv_window, check_window_made, window_bytes, window_cells
from pyadaq.runtime.layer_types import next_context
from pyadaq.runtime.offload import KVOffloadError, check_offload
from pyadaq.types import CacheType, cache_type

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


class Batch:
    """A reusable llama_batch. ``add`` appends tokens of one sequence at consecutive positions
    (the ones from index ``logits_from`` on get logits), ``submit`` decodes what was added;
    ``decode`` does both for a sequence of any length, in steps of at most ``step`` tokens."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        self.capacity = int(capacity)
        self.ptr = _llama_cpp.llama_batch_init(self.capacity, 0, max(1, n_seq_max))
        self.n = 0

    def add(self, tokens, pos0: int, seq_id: int = 0, logits_from: int | None = None) -> range:
        """Rows of the batch the tokens went to."""
        if self.n + len(tokens) > self.capacity:
            raise ValueError(f"{self.n + len(tokens)} tokens do not fit a batch of {self.capacity}")
        b = self.ptr
        start = self.n
        for j, t in enumerate(tokens):
            r = start + j
            b.token[r] = int(t)
            b.pos[r] = pos0 + j
            b.n_seq_id[r] = 1
            b.seq_id[r][0] = seq_id
            b.logits[r] = logits_from is not None and j >= logits_from
        self.n += len(tokens)
        return range(start, self.n)

    def submit(self, ctx_ptr) -> None:
        self.ptr.n_tokens = self.n
        self.n = 0
        rc = _llama_cpp.llama_decode(ctx_ptr, self.ptr)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def decode(self, ctx_ptr, tokens, pos0: int = 0, *, logits_from: int | None = None,
               step: int | None = None, seq_id: int = 0) -> None:
        """Decode ``tokens`` at positions pos0.. in calls of at most ``step`` tokens (default:
        the capacity); the tokens from index ``logits_from`` on get logits."""
        step = min(step or self.capacity, self.capacity)
        for start in range(0, len(tokens), step):
            part = tokens[start:start + step]
            # where this part's logits start, relative to it (None: none in this part)
            first = None if logits_from is None or logits_from >= start + len(part) else max(0, logits_from - start)
            self.add(part, pos0 + start, seq_id, first)
            self.submit(ctx_ptr)

    def close(self) -> None:
        if self.ptr is not None:
            _llama_cpp.llama_batch_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


class Model:
    def __init__(self, path: str, n_gpu_layers: int | None = None):
        self.info = read_model_info(path)  # a bad file is a ModelFileError here, never a native abort
        params = _llama_cpp.llama_model_default_params()
        params.n_gpu_layers = default_gpu_layers() if n_gpu_layers is None else n_gpu_layers
        self.path = str(path)
        self.n_gpu_layers = params.n_gpu_layers
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
                 layer_types: tuple | None = None, cb_eval=None, kv_calibration=None, n_batch: int | None = None,
                 swa_full: bool = True, kv_window: int = 0):
        """layer_types: optional (types_k, types_v), one cache type per layer, used instead of
        cache_type_k/cache_type_v for the layers' tensors (pyadaq.layer_types). cb_eval: an
        optional (callback, user_data) pair of C pointers for llama.cpp's evaluation callback.
        kv_calibration: a calibration (or its file) for this model; the cache then stores each
        layer's K and V in the calibration's coordinates. n_batch: the most tokens one decode call
        takes (default n_ctx). swa_full: sliding-window layers keep the whole context (llama.cpp's
        default) or only their window. kv_window: the K/V rows of the last this many cells written
        are also kept in f16 and attended at that precision (pyadaq.runtime.kvconfig.check_kv_window)."""
        self.ptr = None
        check_kv_window(kv_window, flash_attn, model.n_gpu_layers)
        self.calibration = None if kv_calibration is None else calibration_for_model(kv_calibration, model.info)
        self.model = model
        self.k = cache_type(cache_type_k)
        self.v = cache_type(cache_type_v)
        p = _llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = min(n_batch or n_ctx, n_ctx)
        p.n_ubatch = min(p.n_batch, 512)
        p.swa_full = swa_full
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
        n_layer = model.info.n_layer
        transforms, attn_rot = context_settings(self.calibration, types_k or [self.k] * n_layer,
                                                types_v or [self.v] * n_layer, attn_rot)
        with creation_lock, next_context(types_k, types_v, model_ptr=model.ptr, attn_rot=attn_rot,
                                         transforms=transforms, kv_window=kv_window):
            self.ptr = _llama_cpp.llama_init_from_model(model.ptr, p)
        if self.ptr:
            try:
                check_window_made(self.ptr, kv_window,
                                  [cache_type(t) for t in (types_k or [self.k]) + (types_v or [self.v])])
            except ValueError:
                _llama_cpp.llama_free(self.ptr)
                self.ptr = None
                raise
        if not self.ptr:
            what = "per-layer K/V types" if layer_types is not None else f"K={self.k} V={self.v}"
            if self.calibration is not None:
                what += f" and the calibration {self.calibration.path}"
            raise ValueError(f"llama.cpp could not create a context with {what}")
        try:
            check_offload(self.ptr)  # a GPU-resident cache must run on its GPU
        except KVOffloadError:
            _llama_cpp.llama_free(self.ptr)
            self.ptr = None
            raise
        self.n_ctx = n_ctx
        self.batch = Batch(n_ctx)

    @property
    def kv_cache_bytes(self) -> int:
        return int(native().llama.pyadaq_kv_cache_bytes(native().ffi.cast("void *", self.ptr)))

    @property
    def kv_window_bytes(self) -> int:
        """Bytes of the KV window's f16 copies and tags (0 without a window)."""
        return window_bytes(self.ptr)

    @property
    def kv_window_cells(self) -> int:
        """The KV window's cells (0: none; also 0 when no layer's cache is quantized)."""
        return window_cells(self.ptr)

    @property
    def kv_transform_bytes(self) -> int:
        """Bytes of the calibrated K/V transforms' buffers (0 without a calibration)."""
        return int(native().llama.pyadaq_kv_transform_bytes(native().ffi.cast("void *", self.ptr)))

    def clear(self) -> None:
        """Empty the KV cache."""
        _llama_cpp.llama_memory_clear(_llama_cpp.llama_get_memory(self.ptr), True)

    def drop_from(self, pos: int, seq_id: int = 0) -> None:
        """Remove the cells of positions pos.. of a sequence."""
        if not _llama_cpp.llama_memory_seq_rm(_llama_cpp.llama_get_memory(self.ptr), seq_id, pos, -1):
            raise RuntimeError("llama_memory_seq_rm failed")

    def decode(self, tokens, pos0: int = 0, *, logits_from: int | None = None, step: int | None = None) -> None:
        """Decode ``tokens`` at positions pos0.. onto the cache (see :meth:`Batch.decode`)."""
        self.batch.decode(self.ptr, tokens, pos0, logits_from=logits_from, step=step)

    def logits_at(self, i: int) -> np.ndarray:
        """The logits of output row i of the last decode (-1: the last one), a view."""
        return np.ctypeslib.as_array(_llama_cpp.llama_get_logits_ith(self.ptr, i), shape=(self.model.n_vocab,))

    def logits(self, tokens: np.ndarray, first_scored: int) -> np.ndarray:
        """Evaluate `tokens` from an empty cache; logits of positions first_scored..len-1."""
        n = len(tokens)
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit a context of {self.n_ctx}")
        self.clear()
        self.decode(tokens, 0, logits_from=first_scored)
        out = np.empty((n - first_scored, self.model.n_vocab), dtype=np.float32)
        for row, i in enumerate(range(first_scored, n)):
            out[row] = self.logits_at(i)
        return out

    def close(self) -> None:
        if self.ptr:
            self.batch.close()
            _llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()
