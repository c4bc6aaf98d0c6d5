"""pyadaq: low-bit and per-layer KV-cache quantization for llama.cpp.

Importing pyadaq points llama_cpp at pyadaq's patched libllama, so import pyadaq before
llama_cpp.
"""

from ._native import NativeLibraryError, native

__version__ = "0.1.0"

native()  # load and check the libraries now, before anyone imports llama_cpp on their own

from .types import CacheType, cache_type, cache_types  # noqa: E402

__all__ = ["CacheType", "NativeLibraryError", "cache_type", "cache_types", "native", "__version__"]
