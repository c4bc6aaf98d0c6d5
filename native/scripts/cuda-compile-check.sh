#!/usr/bin/env bash
# Compile every CUDA source pyadaq adds or patches with nvcc for one GPU architecture, on any
# machine with nvcc (no GPU, no cuBLAS library needed): `make cuda-check`.
#
#   native/scripts/cuda-compile-check.sh [--quick] [ARCH]      (ARCH default 90, e.g. 80, 89, 120a)
#
# What is compiled (object files only; nothing is linked):
#   - native/cuda/pyadaq-cuda.cu                      (CPY f32 <-> kvq)
#   - the generated flash-attention vector-kernel instances for every K/V pair with kvq2/kvq3
#     and the chosen pairs with a kvt type (28 + 39 files x 3 head sizes, 12 row-trellis files x
#     head size 256; --quick: 7 of them, one per kernel path: kvq K with f16, quantized and kvq V,
#     upstream K with kvq V, kvt K with kvq V, upstream K with kvt V, kvt K with a row-trellis V)
#   - the upstream files patch 0007 changes: getrows.cu, set-rows.cu, cpy.cu, convert.cu,
#     fattn.cu, ggml-cuda.cu, and one upstream vector instance (fattn-common.cuh changed)
#   - libllama's pyadaq-llama.cpp with this build's list of compiled pairs
#
# ggml-cuda includes cuBLAS headers. They come from the CUDA toolkit when it has them,
# otherwise from PYADAQ_CUBLAS_INCLUDE_DIR, otherwise from the pinned nvidia-cublas wheel on
# PyPI (fetched once with pip, checked by sha256, headers kept in ~/.cache/pyadaq).
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
quick=0
if [[ ${1:-} == --quick ]]; then
    quick=1
    shift
fi
arch=${1:-90}
build=${PYADAQ_CUDA_CHECK_BUILD:-$here/build/cuda-check}

CUBLAS_WHEEL=nvidia_cublas-13.10.0.20-py3-none-manylinux1_x86_64.manylinux_2_5_x86_64.whl
CUBLAS_PIN=nvidia-cublas==13.10.0.20
CUBLAS_SHA256=dcc6d63884c53d07e267ce7e6feac17b2538cebaafec5db865736c3e28e4dc84

nvcc=$(command -v nvcc || true)
if [[ -z $nvcc && -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
fi
if [[ -z $nvcc ]]; then
    echo "cuda-compile-check: nvcc not found (install the CUDA toolkit or put nvcc on PATH)" >&2
    exit 2
fi
echo "cuda-compile-check: $("$nvcc" --version | tail -1), sm_$arch"

cuda_root=$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)
cublas_inc=${PYADAQ_CUBLAS_INCLUDE_DIR:-}
if [[ -z $cublas_inc ]]; then
    for d in "$cuda_root/include" "$cuda_root/targets/x86_64-linux/include" /usr/local/cuda/include /usr/include; do
        if [[ -f $d/cublas_v2.h ]]; then
            cublas_inc=$d
            break
        fi
    done
fi
if [[ -z $cublas_inc ]]; then
    cache=${PYADAQ_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pyadaq}/cublas-headers-13.10.0.20
    if [[ ! -f $cache/nvidia/cu13/include/cublas_v2.h ]]; then
        echo "cuda-compile-check: no cuBLAS headers in the toolkit; fetching $CUBLAS_PIN (headers only are kept)"
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        python3 -m pip download --quiet --no-deps --only-binary :all: --dest "$tmp" "$CUBLAS_PIN"
        echo "$CUBLAS_SHA256  $tmp/$CUBLAS_WHEEL" | sha256sum -c --quiet -
        mkdir -p "$cache"
        python3 - "$tmp/$CUBLAS_WHEEL" "$cache" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if "/include/" in n])
EOF
        rm -rf "$tmp"
        trap - EXIT
    fi
    cublas_inc=$cache/nvidia/cu13/include
fi
echo "cuda-compile-check: cuBLAS headers from $cublas_inc"

start=$(date +%s)
cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DPYADAQ_CUDA_COMPILE_ONLY=ON -DPYADAQ_TOOLS=OFF -DPYADAQ_CUBLAS_INCLUDE_DIR="$cublas_inc" >"$build.configure.log" 2>&1 || {
    cat "$build.configure.log" >&2
    exit 1
}
grep -E "pyadaq: CUDA flash-attention" "$build.configure.log" || true

targets=$(ninja -C "$build" -t targets all | cut -d: -f1)
pick() { grep -E "$1" <<<"$targets" || { echo "cuda-compile-check: no target matches $1" >&2; exit 1; }; }
objs=$(pick 'ggml-cuda\.dir/.*native/cuda/pyadaq-cuda\.cu\.o$')
objs+=" "$(pick 'ggml-cuda\.dir/(getrows|set-rows|cpy|convert|fattn|ggml-cuda)\.cu\.o$')
objs+=" "$(pick 'ggml-cuda\.dir/template-instances/fattn-vec-instance-q4_0-q4_0\.cu\.o$')
objs+=" "$(pick 'llama\.dir/.*native/src/pyadaq-llama\.cpp\.o$')
if [[ $quick == 1 ]]; then
    objs+=" "$(pick 'pyadaq-cuda/fattn-vec-instance-(kvq2-f16|kvq3-q4_0|q8_0-kvq2|kvq2-kvq3|kvt4s-kvq2|q8_0-kvt2|kvt4s-kvt2r)\.cu\.o$')
else
    objs+=" "$(pick 'pyadaq-cuda/fattn-vec-instance-.*\.cu\.o$')
fi
n=$(wc -w <<<"$objs")
echo "cuda-compile-check: compiling $n objects"
# shellcheck disable=SC2086
ninja -C "$build" $objs
echo "cuda-compile-check: OK, $n objects for sm_$arch in $(( $(date +%s) - start )) s"
