"""The CUDA kernels' block arithmetic against the scalar reference, on any machine.

native/cuda/pyadaq-kvq-block.h holds every computation the CUDA backend does on a kvq2/kvq3
block (native/cuda/pyadaq-kvt-block.h on a kvt block, checked the same way at the end): the
quantizer of SET_ROWS and CPY, the two-value dequantization of GET_ROWS, CPY and the f16
conversion used by prompt-processing flash attention, and the packed int8 levels that the flash-
attention vector kernel feeds to dp4a (K) and multiplies by the scale (V). The same header is
compiled for the host (native/cuda/kvq-block-check.cpp); this test runs that build on the bit-
exactness cases of test_kernels.py and requires the reference's exact bytes and floats. What it
cannot check without a GPU (the kernels' indexing, the device intrinsics, the denormal flushing
of -use_fast_math) is checked by scripts/gpu-check.sh with test-backend-ops.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_kernels import bitexact_cases, c_dequantize, c_quantize

import pyadaq
from pyadaq import quants_ref as qr

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "native" / "cuda"
TYPES = [t for t in pyadaq.cache_types() if t.name in ("kvq2", "kvq3")]


@pytest.fixture(scope="module")
def checker(tmp_path_factory) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build native/cuda/kvq-block-check.cpp")
    exe = tmp_path_factory.mktemp("kvq-block") / "kvq-block-check"
    cmd = [cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Werror",
           f"-I{CUDA_DIR}", f"-I{ROOT / 'native' / 'src'}", str(CUDA_DIR / "kvq-block-check.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


def run_checker(exe: Path, bits: int, x: np.ndarray, tmp: Path) -> dict[str, np.ndarray]:
    src = tmp / "in.f32"
    np.ascontiguousarray(x, dtype=np.float32).tofile(src)
    subprocess.run([str(exe), str(bits), str(src), str(tmp / "out")], check=True)
    return {
        "q": np.fromfile(tmp / "out.q", dtype=np.uint8),
        "deq": np.fromfile(tmp / "out.deq", dtype=np.float32),
        "lev": np.fromfile(tmp / "out.lev", dtype="<i4"),
        "f16": np.fromfile(tmp / "out.f16", dtype="<u2"),
    }


@pytest.mark.parametrize("t", TYPES, ids=[t.name for t in TYPES])
def test_cuda_block_arithmetic_matches_reference(t, checker, tmp_path):
    spec = qr.spec(t.name)
    for case, x in bitexact_cases(t).items():
        out = run_checker(checker, spec.bits, x, tmp_path)
        ref_q = c_quantize(t, x)
        assert np.array_equal(out["q"], ref_q), f"{t.name}/{case}: blocks differ from the reference's"

        ref_deq = c_dequantize(t, ref_q, len(x))
        assert np.array_equal(out["deq"].view(np.uint32), ref_deq.view(np.uint32)), \
            f"{t.name}/{case}: dequantized values"

        idx, _ = qr.indices(t.name, ref_q, len(x))
        levels = np.asarray(spec.levels, dtype=np.int8)[idx].reshape(-1, 4)
        assert np.array_equal(out["lev"].view(np.int8).reshape(-1, 4), levels), f"{t.name}/{case}: packed levels"

        with np.errstate(over="ignore"):
            ref_h = x.astype(np.float16).view("<u2")
        nan = np.isnan(x)
        assert np.array_equal(out["f16"][~nan], ref_h[~nan]), f"{case}: fp32 -> fp16 rounding"
        assert np.all((out["f16"][nan] & 0x7C00) == 0x7C00) and np.all(out["f16"][nan] & 0x3FF)



KVT = [t for t in pyadaq.cache_types() if t.name in qr.KVT_TYPES]
KVTR = [t for t in pyadaq.cache_types() if t.name in qr.KVTR_TYPES]


def _run_kvt_checker(checker: Path, t, case: str, x: np.ndarray, tmp: Path):
    """The host build on x for a transform-coded type: its blocks and dequantized values must be
    the reference's; returns (the reference's blocks, its values, the build's unscaled values)."""
    src = tmp / "in.f32"
    x.astype(np.float32).tofile(src)
    subprocess.run([str(checker), str(t.id), str(src), str(tmp / "out")], check=True)
    q = np.fromfile(tmp / "out.q", dtype=np.uint8)
    ref_q = qr.quantize(t.name, x)
    assert np.array_equal(q, ref_q), f"{t.name}/{case}: blocks differ from the reference's"
    ref = qr.dequantize(t.name, ref_q, len(x))
    deq = np.fromfile(tmp / "out.deq", dtype=np.float32)
    assert np.array_equal(deq.view(np.uint32), ref.view(np.uint32)), f"{t.name}/{case}: dequantized values"
    return ref_q, ref, np.fromfile(tmp / "out.lev", dtype=np.float32)


@pytest.mark.parametrize("t", KVT, ids=[t.name for t in KVT])
def test_cuda_kvt_block_arithmetic_matches_reference(t, checker, tmp_path):
    """native/cuda/pyadaq-kvt-block.h (SET_ROWS/CPY quantizer, GET_ROWS/CPY/conversion
    dequantization, the flash-attention kernel's unscaled levels) against the reference
    (native/src/pyadaq-kvt.c): the same bytes, floats and levels, on the twin test's cases."""
    from test_kvt import _cases

    for case, x in _cases(t.id + 300).items():
        ref_q, ref, lev = _run_kvt_checker(checker, t, case, x, tmp_path)
        d = np.repeat(qr.kvt_scales()[ref_q.reshape(len(x) // 64, -1)[:, 0]], 64)
        coded = np.tile(np.repeat(np.array(qr.KVT_TYPES[t.name].widths) > 0, 8), len(x) // 64)
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = d * lev
        assert np.array_equal(scaled[coded].view(np.uint32), ref[coded].view(np.uint32)), f"{t.name}/{case}: levels"
        assert (lev[~coded] == 0).all()


@pytest.mark.parametrize("t", KVTR, ids=[t.name for t in KVTR])
def test_cuda_kvtr_row_arithmetic_matches_reference(t, checker, tmp_path):
    """native/cuda/pyadaq-kvtr-block.h against the reference: the one-warp encoder of SET_ROWS and
    CPY (its 32 lanes run in turn on the host, the same float operations in the same order), the
    window decoder of GET_ROWS, CPY, the conversions and flash attention, and its unscaled values,
    on test_kvtr's rows (every scale, zero rows and sub-blocks, non-finite values, underflow)."""
    from test_kvtr import _rows

    for case, x in _rows(t.id + 300).items():
        ref_q, ref, lev = _run_kvt_checker(checker, t, case, x, tmp_path)
        codes = ref_q.reshape(len(x) // 256, -1)[:, :4]
        d = np.repeat(qr.kvt_scales()[codes].reshape(-1), 64)
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = d * lev
        assert np.array_equal(scaled.view(np.uint32), ref.view(np.uint32)), f"{t.name}/{case}: unscaled values"
