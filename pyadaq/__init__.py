"""pyadaq: low-bit and per-layer KV-cache quantization for llama.cpp.

Importing pyadaq points llama_cpp at pyadaq's patched libllama, so import pyadaq before
llama_cpp.

The package's layers, each importing only those below it (tests/test_layers.py checks):

* ``pyadaq.cli``: the commands, thin over the layers below; ``pyadaq.llama``: the public Llama;
* ``pyadaq.plan``: config specs, the planner and calibration; ``pyadaq.eval``: KL, metrics,
  pass-key, bench, norm analysis;
* ``pyadaq.runtime``: contexts and batches, per-layer types, plans as validated values, the
  offload check, the runtime's Llama;
* ``pyadaq.types`` (cache types), ``pyadaq.quants_ref`` (numpy twins), ``pyadaq.model`` (GGUF
  header, embedded model), ``pyadaq.report`` (plots, Markdown, machine description);
* ``pyadaq._native``: the native libraries.
"""

from pyadaq._native import NativeLibraryError, native
from pyadaq._version import __version__

native()  # load and check the libraries now, before anyone imports llama_cpp on their own

from pyadaq.llama import Llama
from pyadaq.model.embedded import EmbeddedModelError, embedded_model_path
from pyadaq.model.header import ModelFileError, ModelInfo, read_model_info
from pyadaq.runtime import layer_types
from pyadaq.runtime.llama import estimate_kv_cache_bytes, validate_cache_types
from pyadaq.runtime.offload import KVOffloadError
from pyadaq.types import CacheType, cache_type, cache_types

__all__ = [
    "CacheType",
    "EmbeddedModelError",
    "KVOffloadError",
    "Llama",
    "ModelFileError",
    "ModelInfo",
    "NativeLibraryError",
    "__version__",
    "cache_type",
    "cache_types",
    "embedded_model_path",
    "estimate_kv_cache_bytes",
    "layer_types",
    "native",
    "read_model_info",
    "validate_cache_types",
]
