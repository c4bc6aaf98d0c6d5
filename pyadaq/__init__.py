"""pyadaq: low-bit and per-layer KV-cache quantization for llama.cpp.

Importing pyadaq points llama_cpp at pyadaq's patched libllama, so import pyadaq before
llama_cpp.
"""

from ._native import NativeLibraryError, native
from ._version import __version__

native()  # load and check the libraries now, before anyone imports llama_cpp on their own

from .types import CacheType, cache_type, cache_types  # noqa: E402
from .gguf_info import ModelFileError, ModelInfo, read_model_info  # noqa: E402
from .embedded import EmbeddedModelError, embedded_model_path  # noqa: E402
from .offload import KVOffloadError  # noqa: E402
from .llama import Llama, estimate_kv_cache_bytes, validate_cache_types  # noqa: E402

__all__ = [
    "CacheType", "NativeLibraryError", "cache_type", "cache_types", "native", "__version__",
    "EmbeddedModelError", "KVOffloadError", "Llama", "ModelFileError", "ModelInfo", "embedded_model_path",
    "estimate_kv_cache_bytes", "read_model_info", "validate_cache_types",
]
