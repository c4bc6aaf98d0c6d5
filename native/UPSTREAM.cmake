# The pinned upstream: llama.cpp as carried by the llama-cpp-python sdist on PyPI.
# The Python dependency in pyproject.toml is pinned to the same version, so that
# llama_cpp's ctypes layer matches the library ABI built from this source.
set(PYADAQ_UPSTREAM_PACKAGE  "llama-cpp-python")
set(PYADAQ_UPSTREAM_VERSION  "0.3.36")
set(PYADAQ_UPSTREAM_SDIST    "llama_cpp_python-0.3.36.tar.gz")
set(PYADAQ_UPSTREAM_SHA256   "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
set(PYADAQ_UPSTREAM_SUBDIR   "vendor/llama.cpp")
