# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine:
# they create .venv, install llama-cpp-python's Python layer without building its own
# libllama, then build and install pyadaq (which builds the patched llama.cpp).
#
# Extra CMake options for pyadaq's build go in CMAKE_ARGS, e.g.
#   make install CMAKE_ARGS="-DGGML_CUDA=ON"

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
STAMP  := $(VENV)/.pyadaq-installed
SOURCES := pyproject.toml CMakeLists.txt $(shell find native pyadaq -type f \( -name '*.py' -o -name '*.c' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cmake' -o -name '*.patch' -o -name '*.in' -o -name '*.pth' \) 2>/dev/null)

.PHONY: install demo test lint formats cuda-check clean

$(VENV)/.llama-cpp-python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the Python layer only: pyadaq provides the libraries
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install --quiet "$(LLAMA_CPP_PYTHON)"
	touch $@

$(STAMP): $(VENV)/.llama-cpp-python $(SOURCES)
	$(PIP) install ".[test]"
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/pyadaq demo

# Tests run from tests/ so that the source tree's pyadaq/ (no built libraries) cannot shadow
# the installed package.
test: install
	cd tests && ../$(PY) -m pytest

# ruff with the rule set in pyproject.toml (installed by the test extra)
lint: install
	$(VENV)/bin/ruff check pyadaq tests scripts models

formats: install
	$(VENV)/bin/pyadaq formats --out docs

# Compile pyadaq's CUDA sources and the upstream CUDA files it patches with nvcc for one
# architecture (CUDA_ARCH, default 90): no GPU or cuBLAS library needed. See the script.
CUDA_ARCH ?= 90
cuda-check:
	bash native/scripts/cuda-compile-check.sh $(CUDA_CHECK_FLAGS) $(CUDA_ARCH)

clean:
	rm -rf build $(VENV)
