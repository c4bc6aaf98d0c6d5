"""pyadaq's tiled CPU flash attention (native/src/pyadaq-fa-cpu.cpp) as one ggml op, against
attention computed in numpy (float64) from the same dequantized K and V: grouped-query heads,
partial and fully masked tiles, per-head masks, ALiBi slopes, logit soft-capping, attention sinks,
head sizes that differ between K and V, permuted Q, and 1 to 3 threads. The op is built and run
through ggml's C API (ggml_graph_compute_with_ctx), so no model stands between the test and the
kernel; the kernel's own counter says it ran, and did not run for a batch shorter than a tile."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cffi
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import pyadaq
from pyadaq import quants_ref
from pyadaq._native import _lib
from pyadaq.types import cache_type

_CDEF = """
struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; };
struct ggml_context * ggml_init(struct ggml_init_params params);
void ggml_free(struct ggml_context * ctx);
struct ggml_tensor * ggml_new_tensor_4d(struct ggml_context * ctx, int type, int64_t ne0, int64_t ne1,
                                        int64_t ne2, int64_t ne3);
struct ggml_tensor * ggml_permute(struct ggml_context * ctx, struct ggml_tensor * a, int a0, int a1, int a2, int a3);
struct ggml_tensor * ggml_flash_attn_ext(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                         struct ggml_tensor * v, struct ggml_tensor * mask, float scale,
                                         float max_bias, float logit_softcap);
void ggml_flash_attn_ext_add_sinks(struct ggml_tensor * a, struct ggml_tensor * sinks);
void ggml_flash_attn_ext_set_prec(struct ggml_tensor * a, int prec);
struct ggml_cgraph * ggml_new_graph(struct ggml_context * ctx);
void ggml_build_forward_expand(struct ggml_cgraph * cgraph, struct ggml_tensor * tensor);
void * ggml_get_data(const struct ggml_tensor * tensor);
size_t ggml_nbytes(const struct ggml_tensor * tensor);
size_t ggml_quantize_chunk(int type, const float * src, void * dst, int64_t start, int64_t nrows,
                           int64_t n_per_row, const float * imatrix);
void ggml_cpu_init(void);
int ggml_graph_compute_with_ctx(struct ggml_context * ctx, struct ggml_cgraph * cgraph, int n_threads);
int64_t pyadaq_cpu_fa_tiled(void);
int64_t pyadaq_cpu_fa_decode(void);
size_t pyadaq_fa_tiled_work_size(const struct ggml_tensor * node, int n_tasks);
"""

GGML_F32, GGML_F16, GGML_PREC_F32 = 0, 1, 10


@pytest.fixture(scope="module")
def ggml():
    pyadaq.native()  # the libraries pyadaq checked
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    base = ffi.dlopen(str(_lib("ggml-base")))
    cpu = ffi.dlopen(str(_lib("ggml-cpu")))
    cpu.ggml_cpu_init()
    return ffi, base, cpu


@dataclass(frozen=True)
class Case:
    k: str
    v: str
    dk: int = 64
    dv: int = 64
    n_head_kv: int = 2
    gqa: int = 4  # query heads per KV head
    n_q: int = 100
    n_kv: int = 200
    threads: int = 2
    mask: str = "causal"  # "causal", "none", "per-head", "window" (causal, the last 64 positions)
    max_bias: float = 0.0
    softcap: float = 0.0
    sinks: bool = False
    permuted_q: bool = False

    def __str__(self) -> str:
        extra = [f"{f}={getattr(self, f)}" for f in ("max_bias", "softcap", "sinks", "permuted_q")
                 if getattr(self, f)]
        return (f"{self.k}/{self.v}-d{self.dk}x{self.dv}-h{self.n_head_kv}x{self.gqa}-q{self.n_q}"
                f"-kv{self.n_kv}-t{self.threads}-{self.mask}" + "".join("-" + e for e in extra))


CASES = [
    Case("kvq2", "kvq2"),
    Case("q8_0", "kvq2", dk=128, dv=128, n_head_kv=1, gqa=8, n_q=64, n_kv=512, threads=1),
    Case("q4_0", "kvq2", dk=256, dv=256, n_head_kv=1, gqa=4, n_q=257, n_kv=300, threads=3),
    Case("kvq3", "q4_0", n_q=130, n_kv=40),
    Case("f16", "kvq3", dk=128, dv=128, gqa=3, mask="per-head"),
    Case("q8_0", "q8_0", gqa=1, n_q=200, n_kv=333, threads=1),
    Case("q4_0", "q4_0", mask="none"),
    Case("q8_0", "f16", max_bias=8.0),
    Case("f16", "f32", dk=192, dv=128, n_head_kv=2, gqa=2),
    Case("kvq2", "q8_0", dk=128, dv=128, softcap=10.0),
    Case("kvq3", "kvq2", dk=256, dv=256, n_head_kv=1, gqa=4, sinks=True, n_kv=1024, threads=2),
    Case("q4_0", "kvq3", sinks=True, mask="none", permuted_q=True, threads=3),
    # the transform-coded types (block 64)
    Case("kvt4s", "kvt2", dk=128, dv=128),
    Case("kvt3s", "kvt3", dk=256, dv=256, n_head_kv=1, gqa=4, n_q=130, threads=3),
    Case("kvt2s", "kvt1", dk=128, dv=128, n_q=70, threads=2),
    # the row-trellis types (block 256: heads of 256 or 512)
    Case("kvt3r", "kvt2r", dk=256, dv=256, n_head_kv=2, gqa=2, n_q=70, threads=2),
    Case("q8_0", "kvt3r", dk=512, dv=512, n_head_kv=1, gqa=2, n_q=65, n_kv=200, threads=3),
]


def _quantize(ffi, base, type_name: str, x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Rows of x in type_name's bytes, and what those bytes decode to (numpy, not ggml)."""
    t = cache_type(type_name)
    rows, n = x.reshape(-1, x.shape[-1]).shape
    if type_name == "f32":
        return x.astype(np.float32).tobytes(), x.astype(np.float64)
    if type_name == "f16":
        h = x.astype(np.float16)
        return h.tobytes(), h.astype(np.float64)
    src = np.ascontiguousarray(x, dtype=np.float32).reshape(rows, n)
    dst = np.zeros(rows * t.row_bytes(n), dtype=np.uint8)
    base.ggml_quantize_chunk(t.id, ffi.from_buffer("float[]", src), ffi.from_buffer(dst), 0, rows, n, ffi.NULL)
    if t.origin == "pyadaq":
        y = quants_ref.dequantize(type_name, dst, rows * n)
    else:
        y = gguf_dequantize(dst.reshape(rows, -1), GGMLQuantizationType(t.id))
    return dst.tobytes(), np.asarray(y, dtype=np.float64).reshape(x.shape)


def _mask(case: Case, rng) -> np.ndarray | None:
    """(mask heads, n_q, n_kv) of 0 / -inf: a causal window whose queries end the sequence, with
    random holes, a fully masked query row (unless there is only one) and a KV tile that no query of
    the first tile sees."""
    if case.mask == "none":
        return None
    heads = case.n_head_kv * case.gqa if case.mask == "per-head" else 1
    pos_q = case.n_kv - case.n_q + np.arange(case.n_q)
    kv = np.arange(case.n_kv)[None, :]
    seen = kv <= pos_q[:, None]
    if case.mask == "window":  # a sliding window: most of the cache hidden from every query
        seen &= kv > pos_q[:, None] - 64
    m = np.where(seen, 0.0, -np.inf)
    m = np.repeat(m[None], heads, axis=0)
    m[rng.random(m.shape) < 0.1] = -np.inf
    if case.n_q > 1:  # (a single query fully masked would test nothing but zeros)
        m[:, case.n_q // 2, :] = -np.inf
    return m


def _reference(case: Case, q, k, v, mask, sinks) -> np.ndarray:
    """(n_q, n_head, dv) attention in float64, as ggml defines the op."""
    h_q = case.n_head_kv * case.gqa
    scale = 1.0 / math.sqrt(case.dk)
    n_head_log2 = 2 ** math.floor(math.log2(h_q))
    m0 = 2.0 ** (-case.max_bias / n_head_log2)
    m1 = 2.0 ** (-(case.max_bias / 2.0) / n_head_log2)
    out = np.zeros((case.n_q, h_q, case.dv))
    for h in range(h_q):
        kv = h // case.gqa
        s = q[h] @ k[kv].T * scale
        if case.softcap:
            s = case.softcap * np.tanh(s / case.softcap)
        if mask is not None:
            slope = 1.0
            if case.max_bias > 0:
                slope = m0 ** (h + 1) if h < n_head_log2 else m1 ** (2 * (h - n_head_log2) + 1)
            s = s + slope * mask[h % mask.shape[0]]
        mx = s.max(axis=1, keepdims=True)
        if sinks is not None:
            mx = np.maximum(mx, sinks[h])
        with np.errstate(invalid="ignore"):
            p = np.where(np.isfinite(mx), np.exp(s - mx), 0.0)
        den = p.sum(axis=1, keepdims=True)
        if sinks is not None:
            den = den + np.where(np.isfinite(mx), np.exp(sinks[h] - mx), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, h, :] = np.where(den > 0, (p @ v[kv]) / np.where(den > 0, den, 1.0), 0.0)
    return out


def _run(ggml, case: Case, seed: int = 0):
    ffi, base, cpu = ggml
    rng = np.random.default_rng(seed)
    h_q = case.n_head_kv * case.gqa
    q = rng.standard_normal((h_q, case.n_q, case.dk)).astype(np.float32)
    # keys with a per-channel offset and spread, as rotated keys have
    k = (rng.standard_normal((case.n_head_kv, case.n_kv, case.dk)) * 1.5 + 0.3).astype(np.float32)
    v = rng.standard_normal((case.n_head_kv, case.n_kv, case.dv)).astype(np.float32)
    k_bytes, k_ref = _quantize(ffi, base, case.k, k)
    v_bytes, v_ref = _quantize(ffi, base, case.v, v)
    mask = _mask(case, rng)
    sinks = rng.standard_normal(h_q).astype(np.float32) if case.sinks else None

    kv_bytes = len(k_bytes) + len(v_bytes)
    mem = 64 * 2**20 + 4 * (q.size + 2 * case.n_q * h_q * case.dv) + kv_bytes + 2 * case.n_q * case.n_kv * h_q
    ctx = base.ggml_init({"mem_size": mem, "mem_buffer": ffi.NULL, "no_alloc": False})
    assert ctx != ffi.NULL
    try:
        if case.permuted_q:  # stored (n_q, heads, d), viewed as (heads, n_q, d) like llama's Q
            tq = base.ggml_new_tensor_4d(ctx, GGML_F32, case.dk, h_q, case.n_q, 1)
            ffi.memmove(base.ggml_get_data(tq), np.ascontiguousarray(q.transpose(1, 0, 2)).tobytes(), q.nbytes)
            tq = base.ggml_permute(ctx, tq, 0, 2, 1, 3)
        else:
            tq = base.ggml_new_tensor_4d(ctx, GGML_F32, case.dk, case.n_q, h_q, 1)
            ffi.memmove(base.ggml_get_data(tq), q.tobytes(), q.nbytes)
        tk = base.ggml_new_tensor_4d(ctx, cache_type(case.k).id, case.dk, case.n_kv, case.n_head_kv, 1)
        tv = base.ggml_new_tensor_4d(ctx, cache_type(case.v).id, case.dv, case.n_kv, case.n_head_kv, 1)
        assert base.ggml_nbytes(tk) == len(k_bytes) and base.ggml_nbytes(tv) == len(v_bytes)
        ffi.memmove(base.ggml_get_data(tk), k_bytes, len(k_bytes))
        ffi.memmove(base.ggml_get_data(tv), v_bytes, len(v_bytes))
        tm = ffi.NULL
        if mask is not None:
            tm = base.ggml_new_tensor_4d(ctx, GGML_F16, case.n_kv, case.n_q, mask.shape[0], 1)
            ffi.memmove(base.ggml_get_data(tm), mask.astype(np.float16).tobytes(), mask.size * 2)
        out = base.ggml_flash_attn_ext(ctx, tq, tk, tv, tm, 1.0 / math.sqrt(case.dk), case.max_bias, case.softcap)
        base.ggml_flash_attn_ext_set_prec(out, GGML_PREC_F32)
        if sinks is not None:
            ts = base.ggml_new_tensor_4d(ctx, GGML_F32, h_q, 1, 1, 1)
            ffi.memmove(base.ggml_get_data(ts), sinks.tobytes(), sinks.nbytes)
            base.ggml_flash_attn_ext_add_sinks(out, ts)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        before, before_dec = int(cpu.pyadaq_cpu_fa_tiled()), int(cpu.pyadaq_cpu_fa_decode())
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, case.threads) == 0
        ran = int(cpu.pyadaq_cpu_fa_tiled()) - before
        ran_dec = int(cpu.pyadaq_cpu_fa_decode()) - before_dec
        got = np.frombuffer(ffi.buffer(base.ggml_get_data(out), base.ggml_nbytes(out)), dtype=np.float32)
        got = got.reshape(case.n_q, h_q, case.dv).astype(np.float64)
    finally:
        base.ggml_free(ctx)
    return got, _reference(case, q.astype(np.float64), k_ref, v_ref, mask, sinks), ran, ran_dec


# batches shorter than a query tile (generation, short prompts) with a quantized V
DECODE_CASES = [
    # flat types (upstream's and pyadaq's) as well as the transform-coded ones
    Case("q8_0", "kvq2", n_q=1, n_kv=300),
    Case("q4_0", "q4_0", n_q=3, n_kv=200),
    Case("kvq3", "q8_0", dk=256, dv=256, n_head_kv=1, gqa=4, n_q=1, n_kv=777, mask="window", threads=2),
    Case("f16", "kvq2", dk=128, dv=128, n_head_kv=2, gqa=4, n_q=2, n_kv=333, threads=3, mask="per-head"),
    Case("kvt4s", "kvt2", dk=256, dv=256, n_head_kv=1, gqa=4, n_q=40, n_kv=600, threads=2),  # a chat turn
    Case("q4_0", "kvq3", dk=192, dv=128, gqa=8, n_q=63, n_kv=300, mask="window", threads=3),
    Case("kvt2s", "kvt4", n_q=1, n_kv=300),
    Case("kvt4s", "kvt2", dk=256, dv=256, n_head_kv=1, gqa=4, n_q=1, n_kv=1000, threads=2),
    Case("kvt3s", "kvt3", dk=128, dv=128, n_head_kv=2, gqa=2, n_q=3, n_kv=700, threads=3, mask="per-head"),
    Case("f32", "kvt2", n_q=1, n_kv=513, threads=1, mask="none"),
    Case("kvq2", "kvt3", n_q=1, mask="none"),
    Case("q8_0", "kvt2", dk=128, dv=128, n_head_kv=1, gqa=8, n_q=1, n_kv=600, threads=2),
    Case("q4_0", "kvt4", n_q=4, n_kv=257, threads=3, max_bias=8.0),
    Case("f16", "kvt3", n_q=2, n_kv=300, softcap=10.0),
    Case("q8_0", "kvt2", dk=256, dv=256, n_head_kv=1, gqa=4, n_q=1, n_kv=1024, sinks=True, threads=2),
    Case("kvt4s", "q8_0", n_q=16, n_kv=200, sinks=True, mask="none", permuted_q=True, threads=2),
    Case("kvt2s", "kvq2", gqa=3, n_q=5, n_kv=90, threads=3),  # fewer KV rows than a chunk
    Case("q8_0", "kvt1", dk=128, dv=128, n_head_kv=1, gqa=4, n_q=2, n_kv=400, threads=2),  # two 0-bit groups
    # sliding windows: the chunks split the rows any query sees, not the whole cache
    Case("q8_0", "kvt2", dk=256, dv=256, n_head_kv=1, gqa=4, n_q=1, n_kv=1000, mask="window", threads=2),
    Case("kvt3s", "q4_0", n_q=4, n_kv=600, mask="window", threads=3),
    Case("q8_0", "kvt2r", dk=256, dv=256, n_head_kv=1, gqa=4, n_q=1, n_kv=1000, threads=2),
    Case("kvt3r", "kvt3r", dk=256, dv=256, n_head_kv=2, gqa=2, n_q=3, n_kv=700, threads=3, mask="per-head"),
]


def _float_dot(name: str) -> bool:
    """Whether K's dot product takes the query in float (kvt types, f32), or rounds it first."""
    return name == "f32" or name.startswith("kvt")


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_generation_kernel_matches_numpy(ggml, case):
    """Generation with a quantized V runs pyadaq's grouped kernel (the query heads of a GQA group
    share each dequantized row, the KV sequence split among the threads): attention in float64 from
    the same dequantized K and V, to float rounding where K's dot product takes Q in float, within
    what rounding Q to the vec_dot type costs otherwise (upstream's per-row path, the same bound);
    a fully masked query row gives zeros."""
    got, want, ran, ran_dec = _run(ggml, case)
    assert (ran, ran_dec) == (0, 1), "the op did not run on pyadaq's generation kernel"
    assert np.isfinite(got).all()
    err = np.abs(got - want).max()
    bound = 2e-5 if _float_dot(case.k) else 2e-2
    assert err < bound * max(1.0, np.abs(want).max()), f"max abs error {err:.3g}"
    assert np.abs(want).max() > 0.1, "the case must produce output"
    if case.mask != "none" and not case.sinks and case.n_q > 1:
        assert not got[case.n_q // 2].any(), "a fully masked query row must give zeros"


# the op in a child process with PYADAQ_FA_TILED=0 (upstream's paths; the switch is read once)
_PER_ROW_CHILD = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_fa_op as T
np.save(sys.argv[2], T._run(T.ggml.__wrapped__(), T.Case(**eval(sys.argv[3])))[0])
"""


@pytest.mark.parametrize("case", [Case("kvq2", "kvq2", n_q=7, n_kv=120), Case("q8_0", "q8_0", n_q=3, n_kv=300),
                                  Case("q4_0", "kvq2", dk=256, dv=256, n_head_kv=1, gqa=4, n_q=1, n_kv=1000),
                                  Case("q8_0", "kvq3", n_q=16, n_kv=90, mask="window", max_bias=8.0),
                                  Case("kvq2", "kvq2", n_q=40, n_kv=300, threads=3),
                                  Case("q4_0", "q8_0", n_q=63, n_kv=200, mask="per-head")], ids=str)
def test_generation_kernel_matches_upstream_per_row(ggml, case, tmp_path, child_env):
    """Where both compute the same thing (K's dot product with Q in its vec_dot type, V added in
    f32), pyadaq's generation kernel gives what upstream's per-row path gives to float rounding:
    only the order of the additions differs (a softmax step per tile, V added as a GEMM)."""
    got, _, _, ran_dec = _run(ggml, case)
    assert ran_dec == 1
    out = tmp_path / "per_row.npy"
    fields = {f: getattr(case, f) for f in case.__dataclass_fields__}
    proc = subprocess.run([sys.executable, "-c", _PER_ROW_CHILD, str(Path(__file__).parent), str(out), repr(fields)],
                          env=child_env(PYADAQ_FA_TILED="0"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    per_row = np.load(out)
    assert np.abs(got - per_row).max() <= 1e-5 * np.abs(per_row).max()
    assert np.abs(per_row).max() > 0.1


@pytest.mark.parametrize("case", [Case("q8_0", "f16", n_q=1, n_kv=300), Case("kvt4s", "f32", n_q=2)], ids=str)
def test_generation_stays_upstream_without_quantized_values(ggml, case):
    """f16 and f32 values keep upstream's per-row path (which adds f16 values in f16)."""
    got, want, ran, ran_dec = _run(ggml, case)
    assert (ran, ran_dec) == (0, 0)
    assert np.abs(got - want).max() < 2e-2 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tiled_kernel_matches_numpy(ggml, case):
    got, want, ran, _ = _run(ggml, case)
    assert ran == 1, "the op did not run on pyadaq's tiled kernel"
    assert np.isfinite(got).all()
    # float32 GEMMs and expf against float64: a few ulps of the outputs' scale
    err = np.abs(got - want).max()
    assert err < 2e-5 * max(1.0, np.abs(want).max()), f"max abs error {err:.3g}"
    if case.mask != "none" and not case.sinks:
        assert not got[case.n_q // 2].any(), "a fully masked query row must give zeros"


def test_generation_kernel_scratch_is_bounded(ggml):
    """The generation kernel's work buffer for a batch of 63 queries (4 heads per KV head, rows of
    256, 4096 cells, 2 threads): each thread's tile scratch and each unit's partial results (an
    accumulator per query row) stay within 1.5 MiB: a unit with many query rows takes fewer KV
    chunks (with the 8 that one query gets, 2.2 MiB)."""
    ffi, base, cpu = ggml
    ctx = base.ggml_init({"mem_size": 2**20, "mem_buffer": ffi.NULL, "no_alloc": True})
    try:
        def work(n_q: int) -> int:
            q = base.ggml_new_tensor_4d(ctx, GGML_F32, 256, n_q, 4, 1)
            k = base.ggml_new_tensor_4d(ctx, cache_type("q8_0").id, 256, 4096, 1, 1)
            v = base.ggml_new_tensor_4d(ctx, cache_type("kvq2").id, 256, 4096, 1, 1)
            node = base.ggml_flash_attn_ext(ctx, q, k, v, ffi.NULL, 0.0625, 0.0, 0.0)
            base.ggml_flash_attn_ext_set_prec(node, GGML_PREC_F32)
            return int(cpu.pyadaq_fa_tiled_work_size(node, 2))

        one, many = work(1), work(63)
    finally:
        base.ggml_free(ctx)
    assert 0 < one < 2**20
    # at least one unit's partials: 63 x 4 query rows x (max, sum, 256 values)
    assert 63 * 4 * 258 * 4 < many <= 1.5 * 2**20


def test_batches_short_of_a_tile_take_the_generation_kernel(ggml):
    """Up to 63 queries (one short of a query tile) take the generation kernel, which rounds Q to
    the K type's dot-product type as upstream's per-row path does; 64 take the tiled kernel, which
    keeps Q in f32: both close to the exact attention."""
    for n_q, expect in ((32, (0, 1)), (63, (0, 1)), (64, (1, 0))):
        got, want, ran, ran_dec = _run(ggml, Case("q8_0", "kvq2", n_q=n_q, n_kv=150))
        assert (ran, ran_dec) == expect, n_q
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
