"""The CPU flash-attention path for quantized caches (native/src/pyadaq-fa-cpu.cpp, patch 0006):
pyadaq's tiled kernel, which walks each KV tile once for a unit of query tiles sharing its K and V
heads and dequantizes each K and V row into the tile buffer as the tile is packed, for batches of
at least a tile of queries (prompt processing), for pyadaq's and upstream's quantized types in any
pairing. Checked against the per-row path it replaces (PYADAQ_FA_TILED=0, in a child process): the
same logits up to the rounding of Q, far below the quantization error itself; the tiled path
really runs where it should, and only there; and its scratch does not grow with the context."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pyadaq
from pyadaq.eval.metrics import token_kl
from pyadaq.runtime.context import Context, Model, default_gpu_layers, quiet_native_logs

# the CPU backend's flash attention; with the layers on a GPU (scripts/gpu-check.sh) it never runs
pytestmark = pytest.mark.skipif(default_gpu_layers() > 0, reason="PYADAQ_GPU_LAYERS: attention runs on the GPU")


quiet_native_logs()

CHILD = """
import sys, numpy as np
from pyadaq.runtime.context import Context, Model, quiet_native_logs
quiet_native_logs()
m = Model(sys.argv[1])
x = np.load(sys.argv[2])
c = Context(m, sys.argv[3], sys.argv[4], 1024, 1)
np.save(sys.argv[5], c.logits(x, 0))
"""


# KL between the per-row path with K=q8_0 and the tiled one on this tiny model: what rounding Q
# to 8 bits for the K.Q product costs (measured 2.7e-4 for q8_0/q8_0)
Q8_ROUNDING_KL = 5e-4


def tiled() -> int:
    """Flash-attention ops with a quantized K or V that ran on the tiled path so far."""
    return int(pyadaq.native().cpu.pyadaq_cpu_fa_tiled())


def tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([[1], rng.integers(259, 512, n - 1)]).astype(np.int32)


@pytest.mark.parametrize("kv", [("kvq2", "kvq2"), ("q8_0", "kvq2"), ("kvq3", "q4_0"), ("f16", "kvq3"),
                                ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_tiled_path_matches_per_row_path(tiny_model, tmp_path, child_env, kv):
    path = tiny_model(head_dim=64)
    x = tokens(200, seed=2)
    np.save(tmp_path / "x.npy", x)
    m = Model(str(path))
    try:
        ref = Context(m, "f16", "f16", 1024, 1)
        f16 = ref.logits(x, 0)
        ref.close()
        before = tiled()
        c = Context(m, kv[0], kv[1], 1024, 1)
        fast = c.logits(x, 0)
        c.close()
        assert tiled() > before  # a 200-query batch: the tiled path ran
    finally:
        m.close()
    env = child_env(PYADAQ_FA_TILED="0")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "x.npy"), kv[0], kv[1],
                           str(tmp_path / "slow.npy")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    slow = np.load(tmp_path / "slow.npy")
    quant = float(token_kl(f16, slow).mean())
    paths = float(token_kl(slow, fast).mean())
    assert np.isfinite(fast).all()
    # the per-row path rounds Q to the K type's dot-product type (8-bit for the quantized K
    # types), the tiled one keeps it in f32: the two differ by a few percent of the quantization
    # error, and the tiled path is no further from f16
    # (plus what rounding Q to 8 bits alone costs: with q8_0 K that is most of the difference)
    assert paths < 0.05 * quant + Q8_ROUNDING_KL, (paths, quant)
    assert float(token_kl(f16, fast).mean()) < 1.02 * quant


def test_short_batches_and_f16_keep_their_paths(tiny_model):
    m = Model(str(tiny_model(head_dim=64)))
    try:
        before = tiled()
        c = Context(m, "f16", "f16", 256, 1)  # f16/f16: upstream's own tiled path, not counted
        c.logits(tokens(100), 0)
        c.close()
        c = Context(m, "q8_0", "kvq2", 256, 1)  # 10 queries: less than a tile, the per-row path stays
        c.logits(tokens(10), 0)
        c.close()
        assert tiled() == before
    finally:
        m.close()


def test_generation_keeps_the_per_row_path(tiny_model):
    """One query at a time (generation), even against 512+ cells: the per-row path (faster
    for one query than packing tiles)."""
    from pyadaq.eval.passkey import generate

    m = Model(str(tiny_model(head_dim=64)))
    try:
        c = Context(m, "q8_0", "kvq2", 1024, 1)
        prompt = tokens(600, seed=4)
        generate(c, prompt[:560], n_gen=1, stop_when_settled=False)  # batches of 512 and 48
        after_prompt = tiled()
        out = generate(c, prompt, n_gen=6, stop_when_settled=False)
        c.close()
        n_layer = 2
        # the second prompt is tiled in its two batches (512 and 88 tokens, both a tile or
        # more: one op per layer each); the six generated tokens are not
        assert len(out) == 6
        assert tiled() - after_prompt == 2 * n_layer
    finally:
        m.close()


_RSS_CHILD = """
import sys, numpy as np
from pyadaq.eval.bench import PeakRSS
from pyadaq.runtime.context import Context, Model, quiet_native_logs
quiet_native_logs()
m = Model(sys.argv[1])
rng = np.random.default_rng(0)
x = np.concatenate([[1], rng.integers(259, 512, 8191)]).astype(np.int32)
rss = PeakRSS()
out = []
for n_ctx in (1024, 8192):
    rss.reset()
    c = Context(m, sys.argv[2], sys.argv[2], n_ctx, 1)
    c.logits(x[:n_ctx], n_ctx - 1)
    out += [c.kv_cache_bytes, rss.growth()]
    c.close()
print(*out)
"""


def test_scratch_does_not_grow_with_context(tiny_model, child_env):
    """Peak memory over a whole prompt at 1024 and at 8192 tokens (8 KV heads of 128: one
    layer's K and V in f16 are 32 MiB at 8192). From 1024 to 8192, a kvq2 context grows by its
    cache's growth plus what an f16 context grows by beyond its cache (the mask and other
    compute buffers), not by f16 copies of a layer's K and V (the landed tree's scratch)."""
    path = tiny_model(head_dim=128, n_head=8, n_head_kv=8, n_ctx_train=8192)
    beyond_cache = {}
    for t in ("kvq2", "f16"):
        proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), t], env=child_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        kv_small, peak_small, kv_large, peak_large = map(int, proc.stdout.split())
        assert peak_large >= kv_large > 7 * kv_small
        beyond_cache[t] = (peak_large - peak_small) - (kv_large - kv_small)
    one_layer_f16 = 8192 * 8 * 128 * 2 * 2
    assert beyond_cache["kvq2"] < beyond_cache["f16"] + one_layer_f16 // 4, \
        {t: v / 2**20 for t, v in beyond_cache.items()}
