"""Find pyadaq's llama.cpp libraries, point llama_cpp at them, bind pyadaq's own C entry points.

The libraries live in ``pyadaq/lib`` (installed by the build, RPATH ``$ORIGIN``). For work on
the native code, ``PYADAQ_LIB_DIR`` may name another directory holding the same files.
llama_cpp reads ``LLAMA_CPP_LIB_PATH`` once, when it is first imported, so this module must
run before ``import llama_cpp``; ``pyadaq/__init__.py`` imports it first.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import cffi
import numpy as np

from pyadaq._version import __version__

# llama.cpp's model loading and context creation, and llama_cpp.Llama's construction (which
# redirects the process's stdout and stderr while it loads, with verbose=False), cannot run in
# two threads at once: pyadaq runs them one at a time, under this lock.
creation_lock = threading.RLock()


class NativeLibraryError(ImportError):
    """pyadaq's native libraries are missing, foreign, or another libllama is already loaded."""


def lib_dir() -> Path:
    override = os.environ.get("PYADAQ_LIB_DIR")
    path = Path(override) if override else Path(str(files("pyadaq").joinpath("lib")))
    if not (path / "libllama.so").exists() and not (path / "libllama.dylib").exists():
        raise NativeLibraryError(
            f"pyadaq's native libraries are not in {path}. Reinstall pyadaq with "
            "`pip install .` (it builds them), or set PYADAQ_LIB_DIR to a directory holding "
            "libllama and libggml* built from this source."
        )
    return path


def _lib(name: str) -> Path:
    d = lib_dir()
    for suffix in (".so", ".dylib"):
        p = d / f"lib{name}{suffix}"
        if p.exists():
            return p
    raise NativeLibraryError(f"lib{name} is missing from {d}")


def _load_llama_cpp():
    path = str(lib_dir())
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None:
        base = os.path.realpath(str(getattr(loaded, "_base_path", "")))
        if base != os.path.realpath(path):
            raise NativeLibraryError(
                f"llama_cpp was imported before pyadaq and loaded its library from {base}, "
                f"not pyadaq's ({path}). A process can hold only one libllama: import pyadaq "
                "before llama_cpp (or start a new Python process)."
            )
    os.environ["LLAMA_CPP_LIB_PATH"] = path
    import logging

    import llama_cpp
    import llama_cpp._logger as _logger

    # llama_cpp 0.3.36 maps ggml's log levels by an older numbering, so warnings of this
    # llama.cpp pass for errors and print even with verbose=False. This is ggml.h's numbering.
    _logger.GGML_LOG_LEVEL_TO_LOGGING_LEVEL.update({
        0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR,
        5: logging.DEBUG,
    })
    return llama_cpp


_CDEF = """
const char * pyadaq_build_info(void);
int64_t pyadaq_kv_cache_bytes(void * ctx);
int32_t pyadaq_next_context_layer_types(void * model, int32_t n_layer, const int32_t * types_k,
                                        const int32_t * types_v, char * err, size_t err_size);
void    pyadaq_next_context_attn_rot(int32_t mode);
void    pyadaq_next_context_attn_rot_kv(int32_t mode_k, int32_t mode_v);
void    pyadaq_next_context_clear(void);
int32_t pyadaq_next_context_pending(void);
int32_t pyadaq_next_context_kv_window(int32_t n_cells);
int32_t pyadaq_kv_window_cells(void * ctx);
int64_t pyadaq_kv_window_bytes(void * ctx);
int32_t pyadaq_next_context_kv_transform(int32_t il, int32_t is_v, int32_t n_head, int32_t head_size,
                                         const float * matrix, const float * scale, const float * mean,
                                         const float * inverse, char * err, size_t err_size);
int32_t pyadaq_kv_transform_layers(void * ctx);
int64_t pyadaq_kv_transform_bytes(void * ctx);
int32_t pyadaq_model_kv_offsets(void * model, int32_t il);
int32_t pyadaq_kv_layer_types(void * ctx, int32_t n_max, int32_t * types_k, int32_t * types_v);
int32_t pyadaq_kv_offload_check(void * ctx, char * err, size_t err_size);
int32_t pyadaq_kv_plan_file(const char * path, char * err, size_t err_size);
void pyadaq_kv_plan_env(int32_t use);
size_t ggml_backend_dev_count(void);
void * ggml_backend_dev_get(size_t index);
int ggml_backend_dev_type(void * device);
void * ggml_backend_dev_backend_reg(void * device);
const char * ggml_backend_reg_name(void * reg);
int32_t pyadaq_next_model_rpc_servers(const char * endpoints, char * err, size_t err_size);

void *  pyadaq_kv_capture_new(void * model);
void    pyadaq_kv_capture_free(void * cap);
bool    pyadaq_kv_capture_eval_cb(void * t, bool ask, void * user_data);
void    pyadaq_kv_capture_flush(void * cap);
int64_t pyadaq_kv_capture_rows(void * cap, int32_t is_v, int32_t il);
int32_t pyadaq_kv_capture_head_size(void * cap, int32_t is_v, int32_t il);
int32_t pyadaq_kv_capture_n_head(void * cap, int32_t is_v, int32_t il);
int32_t pyadaq_kv_capture_gram(void * cap, int32_t is_v, int32_t il, int32_t head, double * out, int64_t n);
int32_t pyadaq_kv_capture_sum(void * cap, int32_t is_v, int32_t il, int32_t head, double * out, int64_t n);
int64_t pyadaq_kv_capture_skipped(void * cap);

int pyadaq_quantize_ref(int type, const float * x, void * y, int64_t k);
int pyadaq_dequantize(int type, const void * x, float * y, int64_t k);
int pyadaq_dequantize_impl(int type, const void * x, float * y, int64_t k, int impl);
const char * pyadaq_dequant_impl_name(int impl);
int pyadaq_is_pyadaq_type(int type);
int pyadaq_kvt_levels(int bits, float * out, int n);
int pyadaq_kvt_scale(int e, float * out);
int pyadaq_kvt_quantize(int type, const float * x, void * y, int64_t k, int impl);
int pyadaq_kvtr_table(int bits, float * out, int n);

typedef void (*ggml_to_float_t)(const void * x, float * y, int64_t k);
typedef void (*ggml_from_float_t)(const float * x, void * y, int64_t k);
struct ggml_type_traits {
    const char *      type_name;
    int64_t           blck_size;
    int64_t           blck_size_interleave;
    size_t            type_size;
    bool              is_quantized;
    ggml_to_float_t   to_float;
    ggml_from_float_t from_float_ref;
};
const struct ggml_type_traits * ggml_get_type_traits(int type);
size_t      ggml_type_size(int type);
int64_t     ggml_blck_size(int type);
const char *ggml_type_name(int type);
bool        ggml_is_quantized(int type);
size_t      ggml_row_size(int type, int64_t ne);

int pyadaq_cpu_vec_dot_q8_0(int type, int n, const void * x, const void * y, int impl, float * out);
int pyadaq_cpu_vec_dot_f32(int type, int n, const void * x, const float * y, float * out);
int pyadaq_cpu_quantize_q8_0(const float * x, void * y, int64_t k);
int pyadaq_cpu_quantize(int type, const float * x, void * y, int64_t k);
const char * pyadaq_cpu_simd(void);
int64_t pyadaq_cpu_fa_tiled(void);
"""


class Native:
    """cffi handles on libllama, libggml-base and libggml-cpu (the same files llama_cpp loaded)."""

    def __init__(self) -> None:
        self.llama_cpp = _load_llama_cpp()
        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        self.llama = self.ffi.dlopen(str(_lib("llama")))
        self.base = self.ffi.dlopen(str(_lib("ggml-base")))
        self.cpu = self.ffi.dlopen(str(_lib("ggml-cpu")))
        self.ggml = self.ffi.dlopen(str(_lib("ggml")))
        self.build_info = self._check_build()
        # PYADAQ_KV_PLAN is for llama.cpp's tools (and other programs on these libraries); here
        # plans are given as kv_plan= / --kv-plan and checked in Python, so libllama must not
        # apply one from the environment to every context behind the caller's back
        self.llama.pyadaq_kv_plan_env(0)

    def _check_build(self) -> dict:
        try:
            info = self.ffi.string(self.llama.pyadaq_build_info()).decode()
        except AttributeError as e:
            raise NativeLibraryError(
                f"{_lib('llama')} is not pyadaq's libllama (it has no pyadaq_build_info)"
            ) from e
        if not info.startswith(f"pyadaq {__version__};"):
            raise NativeLibraryError(
                f"libllama reports '{info}', but this is pyadaq {__version__}: reinstall pyadaq"
            )
        meta_path = lib_dir() / "_build_info.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        expected = f"patchset {meta.get('patchset')}"
        if meta and expected not in info:
            raise NativeLibraryError(
                f"libllama reports '{info}' but {meta_path} expects {expected}: the library and "
                "the package come from different builds; reinstall pyadaq."
            )
        upstream = f"llama-cpp-python=={self.llama_cpp.__version__}"
        if upstream not in info:
            raise NativeLibraryError(
                f"libllama was built from '{info}' but the installed Python layer is {upstream}"
            )
        return {"info": info, **meta}

    def roundtrip(self, type_id: int, x) -> np.ndarray:
        """x (float32, a multiple of the type's block size) stored in a ggml type by its reference
        quantizer (the type traits' from_float_ref) and read back by its to_float."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        traits = self.base.ggml_get_type_traits(type_id)
        if traits.from_float_ref == self.ffi.NULL or traits.to_float == self.ffi.NULL:
            raise ValueError(f"ggml type {type_id} has no reference quantizer and to_float")
        n = x.shape[0]
        if n % traits.blck_size:
            raise ValueError(f"{n} values are not whole blocks of {traits.blck_size}")
        buf = bytearray(n // traits.blck_size * traits.type_size)
        out = np.empty(n, dtype=np.float32)
        traits.from_float_ref(self.ffi.from_buffer("float[]", x), self.ffi.from_buffer(buf), n)
        traits.to_float(self.ffi.from_buffer(buf), self.ffi.from_buffer("float[]", out), n)
        return out

    def gpu_devices(self) -> int:
        """The local GPU devices ggml has (llama_supports_gpu_offload() is also true for a build
        with the RPC backend, which pyadaq's always has, without any GPU; RPC servers do not count)."""
        gpu = 1  # GGML_BACKEND_DEVICE_TYPE_GPU (CPU 0, GPU 1, IGPU 2, ...)
        count = 0
        for i in range(self.ggml.ggml_backend_dev_count()):
            dev = self.ggml.ggml_backend_dev_get(i)
            # an RPC server (pyadaq.Llama(rpc_servers=...)) is a device of type GPU too
            reg = self.ggml.ggml_backend_dev_backend_reg(dev)
            rpc = self.ffi.string(self.ggml.ggml_backend_reg_name(reg)) == b"RPC"
            count += self.ggml.ggml_backend_dev_type(dev) == gpu and not rpc
        return count

    def type_name(self, type_id: int) -> str | None:
        p = self.base.ggml_type_name(type_id)
        return None if p == self.ffi.NULL else self.ffi.string(p).decode()


@lru_cache(maxsize=1)
def native() -> Native:
    return Native()
