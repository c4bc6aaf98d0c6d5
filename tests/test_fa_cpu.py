"""The CPU flash-attention path for pyadaq's types (native/src/pyadaq-fa-cpu.c, patch 0006):
K and V converted to f16 once per op, then upstream's tiled path, for batches of at least a
tile of queries (prompt processing). Checked against the per-row path it replaces
(PYADAQ_FA_CONVERT=0, in a child process): the same logits up to f16 rounding, far below the
quantization error itself; and the conversion really runs where it should, and only there."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pyadaq
from pyadaq.logits import Context, Model, default_gpu_layers, quiet_native_logs
from pyadaq.metrics import token_kl

# the CPU backend's flash attention; with the layers on a GPU (scripts/gpu-check.sh) it never runs
pytestmark = pytest.mark.skipif(default_gpu_layers() > 0, reason="PYADAQ_GPU_LAYERS: attention runs on the GPU")


quiet_native_logs()

CHILD = """
import sys, numpy as np
from pyadaq.logits import Context, Model, quiet_native_logs
quiet_native_logs()
m = Model(sys.argv[1])
x = np.load(sys.argv[2])
c = Context(m, sys.argv[3], sys.argv[4], 1024, 1)
np.save(sys.argv[5], c.logits(x, 0))
"""


def converted() -> int:
    return int(pyadaq.native().cpu.pyadaq_cpu_fa_converted())


def tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([[1], rng.integers(259, 512, n - 1)]).astype(np.int32)


@pytest.mark.parametrize("kv", [("kvq2", "kvq2"), ("q8_0", "kvq2"), ("kvq3", "q4_0"), ("f16", "kvq3")])
def test_converted_path_matches_per_row_path(tiny_model, tmp_path, child_env, kv):
    path = tiny_model(head_dim=64)
    x = tokens(200, seed=2)
    np.save(tmp_path / "x.npy", x)
    m = Model(str(path))
    try:
        ref = Context(m, "f16", "f16", 1024, 1)
        f16 = ref.logits(x, 0)
        ref.close()
        before = converted()
        c = Context(m, kv[0], kv[1], 1024, 1)
        fast = c.logits(x, 0)
        c.close()
        assert converted() > before  # a 200-query batch: the conversion ran
    finally:
        m.close()
    env = child_env(PYADAQ_FA_CONVERT="0")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "x.npy"), kv[0], kv[1],
                           str(tmp_path / "slow.npy")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    slow = np.load(tmp_path / "slow.npy")
    quant = float(token_kl(f16, slow).mean())
    paths = float(token_kl(slow, fast).mean())
    assert np.isfinite(fast).all()
    # the per-row path rounds Q to the K type's dot-product type (8-bit for the quantized K
    # types), the converted one to f16: the two differ by a few percent of the quantization
    # error, and the converted path is no further from f16
    assert paths < 0.05 * quant, (paths, quant)
    assert float(token_kl(f16, fast).mean()) < 1.02 * quant


def test_no_conversion_for_upstream_types_or_short_batches(tiny_model):
    m = Model(str(tiny_model(head_dim=64)))
    try:
        before = converted()
        c = Context(m, "q8_0", "q4_0", 256, 1)  # upstream types: untouched
        c.logits(tokens(100), 0)
        c.close()
        c = Context(m, "q8_0", "kvq2", 256, 1)  # 10 queries, 256 cells: the per-row path stays
        c.logits(tokens(10), 0)
        c.close()
        assert converted() == before
    finally:
        m.close()


def test_generation_keeps_the_per_row_path(tiny_model):
    """One query at a time (generation), even against 512+ cells: no conversion (converting
    the whole cache for every token costs more than the per-row path)."""
    from pyadaq.passkey import generate

    m = Model(str(tiny_model(head_dim=64)))
    try:
        c = Context(m, "q8_0", "kvq2", 1024, 1)
        prompt = tokens(600, seed=4)
        generate(c, prompt[:560], n_gen=1, stop_when_settled=False)  # batches of 512 and 48
        after_prompt = converted()
        out = generate(c, prompt, n_gen=6, stop_when_settled=False)
        c.close()
        n_layer = 2
        # the second prompt converts in its two batches (512 and 88 tokens, both a tile or
        # more: one op per layer each); the six generated tokens do not
        assert len(out) == 6
        assert converted() - after_prompt == 2 * n_layer
    finally:
        m.close()
