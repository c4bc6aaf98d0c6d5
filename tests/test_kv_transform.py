"""Calibrated K/V transforms in the graph (native/src/pyadaq-kv-transform.cpp, patch 0010): a
context made with a calibration stores K~ = (K - muK) UK and V~ = (V - muV) UV, with Q~ = Q UK
and out = out~ UV^T + muV. The identities: with f32 caches (no flash attention: its CPU kernel
rounds Q to f16) a calibrated context gives the logits of an uncalibrated one to float
rounding, on a GQA llama and on an iSWA gemma3, for the calibration `pyadaq calibrate` makes
and for random orthonormal bases with large means, on a qwen2 with attention biases (a
large key mean), where the calibration also lowers the 2-bit KL, on a gemma2 with
soft-capped attention logits, where the key mean must stay in the keys, and on a gpt-oss
with attention sinks, where both means must stay; with f16 caches and flash attention it is as
close to the f32 reference as the uncalibrated context is. Without a calibration the logits
are the same bit for bit, also while a calibrated context exists. Context shift, several
sequences, per-layer types, state save/load (refused under another calibration), the
transforms' memory and every bad calibration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pyadaq
from pyadaq.eval.calibration import calibrate
from pyadaq.eval.metrics import token_kl
from pyadaq.model.calibration import (
    CalibrationFileError,
    CalibrationMismatchError,
    Components,
    write_calibration,
)
from pyadaq.runtime.context import Batch, Context, Model
from pyadaq.runtime.kv_transform import (
    LayerTransform,
    context_settings,
    coordinates_fingerprint,
    hadamard,
    kv_transforms,
)
from pyadaq.runtime.layer_types import context_transform_layers, next_context, pending

L = pyadaq.native().llama_cpp
THREADS = 2
TEXT = " ".join(f"Sentence number {i} talks about the weather, the sea and the {i % 7} ships." for i in range(300))


def _random_calibration(cal, seed: int, mean_scale: float | None):
    """The same layers with random orthonormal bases, and means of size mean_scale per value
    (None: the calibration's own means)."""
    rng = np.random.default_rng(seed)

    def rand(c: Components) -> Components:
        q = np.stack([np.linalg.qr(rng.standard_normal((c.head_size, c.head_size)))[0] for _ in range(c.n_head)])
        mean = c.mean if mean_scale is None else mean_scale * rng.standard_normal(c.mean.shape)
        return Components(mean.astype(np.float32), q.astype(np.float32), c.var)

    return dataclasses.replace(cal, k={il: rand(c) for il, c in cal.k.items()},
                               v={il: rand(c) for il, c in cal.v.items()}, path=None)


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen2", "gemma2", "gpt-oss"])
def setup(request, tiny_model):
    """(model, {"pca": calibration from the model, "random": random bases and means of 3.0 (the
    identities' stress test), "rotation": random bases with the model's means}). gemma2
    soft-caps its attention logits, so its key means must stay in the keys, and gpt-oss's
    attention sinks keep both means in: the identities with means of 3.0 hold there only if
    they do."""
    kw = {"arch": request.param, "head_dim": 64, "n_head": 4, "n_head_kv": 2, "dtype": "f32"}
    if request.param == "gemma3":
        kw.update(n_layer=3, sliding_window=32)  # layers 0, 1 sliding-window, 2 full: the iSWA cache
    if request.param in ("gemma2", "gpt-oss"):
        kw.update(n_layer=2, sliding_window=32)  # layer 0 sliding-window, 1 full
    path = tiny_model(**kw)
    cal = calibrate(path, TEXT, n_ctx=256, n_chunks=2, n_threads=THREADS, progress=False)
    m = Model(str(path))
    yield m, {"pca": cal, "random": _random_calibration(cal, seed=1, mean_scale=3.0),
              "rotation": _random_calibration(cal, seed=2, mean_scale=None)}
    m.close()


def _logits(m, k, v, toks, *, flash_attn=True, cal=None, layer_types=None):
    c = Context(m, k, v, 512, THREADS, flash_attn=flash_attn, kv_calibration=cal, layer_types=layer_types)
    try:
        if cal is not None:
            assert context_transform_layers(c.ptr) == len(cal.layers())
        return c.logits(toks, 0)
    finally:
        c.close()


def _toks(m, n=300):
    t = m.tokenize(TEXT)
    return t[:n]


def _noop(cal):
    """Identity matrices, and V means of 1e-6: transforms that change the values by about one
    rounding step. How far they move the logits is the model's own sensitivity to rounding (the
    random tiny gemma3 amplifies it about 10^4 times through its many norms: 1.3e-3 of 21)."""
    out = []
    for il in cal.layers():
        for is_v, c in ((False, cal.k[il]), (True, cal.v[il])):
            eye = np.broadcast_to(np.eye(c.head_size, dtype=np.float32), c.basis.shape).copy()
            out.append(LayerTransform(il, is_v, eye, None, np.full_like(c.mean, 1e-6) if is_v else None))
    return out


def _raw_logits(m, toks, transforms):
    """f32 caches, no flash attention, with these transforms given to libllama as they are."""
    ctx = _raw_context(m, "f32", "f32", transforms)
    batch = Batch(512)
    try:
        batch.decode(ctx, toks, 0, logits_from=0)
        return np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(m.n_vocab,)).copy()
                         for i in range(len(toks))])
    finally:
        batch.close()
        L.llama_free(ctx)


def _tolerance(m, toks, ref, cal):
    rounding = float(np.abs(_raw_logits(m, toks, _noop(cal)) - ref).max())
    return max(2e-5 * float(np.abs(ref).max()), 3 * rounding)


@pytest.mark.parametrize("which", ["pca", "random"])
def test_f32_cache_is_exact(setup, which):
    m, cals = setup
    toks = _toks(m)
    ref = _logits(m, "f32", "f32", toks, flash_attn=False)
    got = _logits(m, "f32", "f32", toks, flash_attn=False, cal=cals[which])
    err = float(np.abs(got - ref).max())
    assert err < _tolerance(m, toks, ref, cals[which]), f"max |dlogit| {err}"  # llama: 1e-5 of 27
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("which", ["pca", "rotation"])
def test_f16_cache_with_flash_attention(setup, which):
    """Flash attention on the CPU rounds Q (and an f16 cache K and V) to f16; a calibrated
    context is no further from the exact logits than an uncalibrated one. (Not with the means of
    3.0: keys moved away from zero lose more to f16 rounding, as they would without a
    calibration.)"""
    m, cals = setup
    toks = _toks(m)
    exact = _logits(m, "f32", "f32", toks, flash_attn=False)
    plain = float(token_kl(exact, _logits(m, "f16", "f16", toks)).mean())
    calibrated = float(token_kl(exact, _logits(m, "f16", "f16", toks, cal=cals[which])).mean())
    assert calibrated < 2 * plain + 1e-6, (calibrated, plain)


def test_quantized_cache_runs_calibrated(setup):
    """q8_0 K with kvq2 V (upstream's rotation after the transform): finite logits, and the
    calibration's bases cost no more than the rotation alone."""
    m, cals = setup
    toks = _toks(m)
    exact = _logits(m, "f32", "f32", toks, flash_attn=False)
    plain = float(token_kl(exact, _logits(m, "q8_0", "kvq2", toks)).mean())
    calibrated = float(token_kl(exact, _logits(m, "q8_0", "kvq2", toks, cal=cals["pca"])).mean())
    assert np.isfinite(calibrated) and calibrated < 1.5 * plain + 1e-4, (calibrated, plain)


def test_uncalibrated_context_is_unchanged_bit_for_bit(setup):
    m, cals = setup
    toks = _toks(m, 200)
    before = _logits(m, "q8_0", "kvq2", toks)
    calibrated = Context(m, "f16", "f16", 512, THREADS, kv_calibration=cals["random"])
    try:
        assert context_transform_layers(calibrated.ptr) == len(cals["random"].layers())
        during = _logits(m, "q8_0", "kvq2", toks)
    finally:
        calibrated.close()
    assert np.array_equal(before, during)
    assert np.array_equal(before, _logits(m, "q8_0", "kvq2", toks))


def test_transform_memory(setup):
    """The matrices are [d, d] per KV head and layer, plus the key means, in the cache's buffer
    type: f16 where their cache (K for the keys', V for the values') is quantized and in host
    memory, f32 for f16/f32 caches (and a GPU's); keys of flat types keep only their means
    (keys_by_mean) unless llama.cpp's rotation is off; values get a transform only with a
    transform-coded V type; they go with the context."""
    m, cals = setup
    n = pyadaq.native()
    cal = cals["pca"]
    # else the cache, and its transforms, live on the GPU
    on_host = m.n_gpu_layers == 0 or not pyadaq.native().gpu_devices()

    # gemma2 soft-caps its attention logits, gpt-oss has attention sinks: the means they keep in
    # the keys (both) and values (gpt-oss) take no memory
    k_means = m.info.architecture not in ("gemma2", "gpt-oss")
    v_means = m.info.architecture != "gpt-oss"

    def side_bytes(part, quantized: bool) -> int:
        per = 2 if quantized and on_host else 4
        kept = v_means if part is cal.v else k_means
        return sum(per * part[il].n_head * part[il].head_size ** 2 + 4 * part[il].mean.size * kept
                   for il in cal.layers())

    means = sum(4 * cal.k[il].mean.size for il in cal.layers()) if k_means else 0
    # values with a kvt type: matrix and scales (their mean stays in the cache)
    for k, v, rot, want in (("q8_0", "kvq2", True, means),
                            ("q8_0", "kvq2", False, side_bytes(cal.k, True)),
                            ("q8_0", "kvt2", True, means + side_bytes(cal.v, True)),
                            ("kvt2s", "kvt2", True, side_bytes(cal.k, True) + side_bytes(cal.v, True)),
                            ("f16", "kvt2", True, means + side_bytes(cal.v, True)),
                            ("f16", "kvq2", True, means)):
        # kvt K scales add one vector per head too
        c = Context(m, k, v, 512, THREADS, kv_calibration=cal, attn_rot=rot)
        try:
            got = int(n.llama.pyadaq_kv_transform_bytes(n.ffi.cast("void *", c.ptr)))
            assert want <= got <= want + 4096 * 2 * len(cal.layers()), (k, v, rot, got, want)
            assert got == c.kv_transform_bytes
            ptr = c.ptr
        finally:
            c.close()
        assert int(n.llama.pyadaq_kv_transform_bytes(n.ffi.cast("void *", ptr))) == 0
        assert context_transform_layers(ptr) == 0


def _shifted(m, k, v, x, cal=None, flash_attn=False, transforms=None, n_fill=96, n_drop=48):
    """Fill n_fill tokens, drop the first n_drop, shift the rest down by n_drop (K-shift), decode
    the rest; logits of the rest. transforms: given to libllama as they are, instead of cal."""
    if transforms is not None:
        ptr = _raw_context(m, k, v, transforms, n_ctx=256, flash_attn=flash_attn)
        c = None
    else:
        c = Context(m, k, v, 256, THREADS, flash_attn=flash_attn, kv_calibration=cal)
        ptr = c.ptr
    batch = Batch(256)
    try:
        mem = L.llama_get_memory(ptr)
        batch.decode(ptr, x[:n_fill], 0)
        assert L.llama_memory_can_shift(mem)
        assert L.llama_memory_seq_rm(mem, 0, 0, n_drop)
        L.llama_memory_seq_add(mem, 0, n_drop, -1, -n_drop)
        rest = x[n_fill:]
        batch.decode(ptr, rest, n_fill - n_drop, logits_from=0)
        return np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ptr, i), shape=(m.n_vocab,)).copy()
                         for i in range(len(rest))])
    finally:
        batch.close()
        if c is not None:
            c.close()
        else:
            L.llama_free(ptr)


def _assert_shift_exact(m, cal, x, transforms=None):
    """A K-shift with f32 caches under the calibration cal (or, given, these raw transforms) gives
    the uncalibrated K-shift's logits, within the model's own rounding sensitivity."""
    ref = _shifted(m, "f32", "f32", x)
    rounding = float(np.abs(_shifted(m, "f32", "f32", x, transforms=_noop(cal)) - ref).max())
    got = _shifted(m, "f32", "f32", x, cal=None if transforms is not None else cal, transforms=transforms)
    assert np.abs(got - ref).max() < max(2e-5 * float(np.abs(ref).max()), 3 * rounding)


@pytest.mark.parametrize("which", ["pca", "random"])
def test_context_shift_f32(setup, which):
    """The K-shift of transformed keys (back to model coordinates, RoPE, forward again) gives the
    uncalibrated K-shift's logits."""
    m, cals = setup
    _assert_shift_exact(m, cals[which], _toks(m, 160))


@pytest.mark.parametrize("kv", [("q8_0", "f16"), ("kvq3", "kvq2"), ("f16", "f16")])
def test_context_shift_quantized(setup, kv):
    """With a quantized K (re-quantized by the shift, with the rotation) and flash attention:
    as close to the exact shift as without the calibration."""
    m, cals = setup
    x = _toks(m, 160)
    exact = _shifted(m, "f32", "f32", x)
    plain = float(token_kl(exact, _shifted(m, *kv, x, flash_attn=True)).mean())
    got = float(token_kl(exact, _shifted(m, *kv, x, cal=cals["pca"], flash_attn=True)).mean())
    assert np.isfinite(got) and got < 1.5 * plain + 1e-5, (got, plain)


def test_several_sequences_and_layer_types(setup):
    """Two sequences in one batch (one cache stream each), with per-layer types (layer 0
    q8_0/kvq3, the rest f16): each sequence's logits as in a context of its own."""
    m, cals = setup
    n_layer = m.info.n_layer
    types = (["q8_0"] + ["f16"] * (n_layer - 1), ["kvq3"] + ["f16"] * (n_layer - 1))
    x = _toks(m, 120)
    a, b = x[:60], x[60:]
    alone = [_logits(m, "f16", "f16", s, cal=cals["pca"], layer_types=types) for s in (a, b)]
    p = L.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 512, 512, 512, 2
    p.n_threads = p.n_threads_batch = THREADS
    p.type_k = p.type_v = 1
    p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    transforms, rot = context_settings(cals["pca"], *types)
    with next_context(*types, model_ptr=m.ptr, attn_rot=rot, transforms=transforms):
        ctx = L.llama_init_from_model(m.ptr, p)
    assert ctx
    batch = Batch(512, 2)
    try:
        ra = batch.add(a, 0, 0, logits_from=0)
        rb = batch.add(b, 0, 1, logits_from=0)
        batch.submit(ctx)
        for rows, want in ((ra, alone[0]), (rb, alone[1])):
            got = np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(m.n_vocab,)) for i in rows])
            assert token_kl(want, got).mean() < 1e-4
    finally:
        batch.close()
        L.llama_free(ctx)


def test_state_under_another_calibration_is_refused(setup, tmp_path):
    from pyadaq import Llama

    m, cals = setup
    x = _toks(m, 90).tolist()
    kw = {"n_ctx": 128, "n_batch": 128, "n_threads": THREADS, "logits_all": True,
          "cache_type_k": "q8_0", "cache_type_v": "kvq2"}
    path = write_calibration(cals["random"], tmp_path / "random.gguf")
    a = Llama(m.path, kv_calibration=cals["pca"], **kw)
    b = Llama(m.path, kv_calibration=cals["pca"], **kw)
    other = Llama(m.path, kv_calibration=path, **kw)
    plain = Llama(m.path, **kw)
    try:
        a.eval(x[:60])
        st = a.save_state()
        a.eval(x[60:])
        want = np.array(a.scores[60:90])
        b.load_state(st)
        b.eval(x[60:])
        got = np.array(b.scores[60:90])
        if m.info.has_swa:  # restored SWA cells sit elsewhere: the same sums in another order
            assert token_kl(want, got).mean() < 1e-5
        else:
            assert np.array_equal(got, want)
        if m.info.architecture in ("gemma2", "gpt-oss"):
            # their keys keep their offsets and take no matrix, the kvq2 values none: any
            # calibration stores this cache as it is, and the state loads
            other.load_state(st)
        else:
            with pytest.raises(ValueError, match="coordinates"):
                other.load_state(st)
        with pytest.raises(ValueError, match="coordinates"):
            plain.load_state(st)
        plain.eval(x[:60])
        with pytest.raises(ValueError, match="no calibration"):
            b.load_state(plain.save_state())
        # the same calibration, other coordinates (a pyadaq whose keys took principal directions)
        old = a.save_state()
        old.pyadaq_calibration = coordinates_fingerprint(*context_settings(cals["pca"], ["q8_0"] * m.info.n_layer,
                                                                           ["kvq2"] * m.info.n_layer, False))
        with pytest.raises(ValueError, match="coordinates"):
            b.load_state(old)
        # a state from a pyadaq with other cache formats, or a calibrated one from before the stamp
        for formats in ("0123456789abcdef", None):
            st.pyadaq_formats = formats
            with pytest.raises(ValueError, match="formats differ"):
                b.load_state(st)
        # an uncalibrated state without the stamp (llama_cpp's own) still loads into a plain Llama
        plain_state = plain.save_state()
        del plain_state.pyadaq_formats
        plain.load_state(plain_state)
    finally:
        for llm in (a, b, other, plain):
            llm.close()


def test_bad_calibrations(setup, tiny_model, tmp_path):
    m, cals = setup
    other = tiny_model(arch="llama", head_dim=64, n_head_kv=2, seed=3)
    other_cal = calibrate(other, TEXT, n_ctx=256, n_chunks=1, n_threads=THREADS, progress=False)
    with pytest.raises(CalibrationMismatchError, match="another model"):
        Context(m, "f16", "f16", 256, THREADS, kv_calibration=other_cal)
    with pytest.raises(CalibrationFileError, match="not found"):
        Context(m, "f16", "f16", 256, THREADS, kv_calibration=tmp_path / "missing.gguf")
    good = write_calibration(cals["pca"], tmp_path / "good.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CalibrationFileError):
        pyadaq.Llama(m.path, kv_calibration=cut, n_ctx=128)
    assert pending() == 0
    # past the Python checks (a Calibration object edited by hand): libllama refuses a transform
    # that does not fit a layer, and the context creation fails cleanly
    il = cals["pca"].layers()[0]
    c0 = cals["pca"].k[il]
    wrong = dataclasses.replace(cals["pca"], k={**cals["pca"].k, il: Components(c0.mean[:1], c0.basis[:1], c0.var[:1])})
    with pytest.raises(ValueError, match="could not create a context"):
        Context(m, "f16", "f16", 256, THREADS, kv_calibration=wrong)
    # a value that is not finite: refused in Python, before libllama (which refuses it too:
    # test_flat_keys_take_out_only_their_mean)
    nan = dataclasses.replace(cals["pca"], k={**cals["pca"].k, il: Components(c0.mean * np.nan, c0.basis, c0.var)})
    with pytest.raises(CalibrationFileError, match=f"layer {il} K mean holds values that are not finite"):
        Context(m, "f16", "f16", 256, THREADS, kv_calibration=nan)
    assert pending() == 0
    assert np.isfinite(_logits(m, "f16", "f16", _toks(m, 50), cal=cals["pca"])).all()  # still fine


def _raw_context(m, k, v, transforms, *, n_ctx=512, flash_attn=False):
    p = L.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_ctx, n_ctx
    p.n_threads = p.n_threads_batch = THREADS
    p.type_k, p.type_v = pyadaq.cache_type(k).id, pyadaq.cache_type(v).id
    p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    with next_context(model_ptr=m.ptr, attn_rot=False, transforms=transforms):
        ctx = L.llama_init_from_model(m.ptr, p)
    assert ctx
    return ctx


def test_scaled_transforms_are_exact(setup):
    """What libllama does with every part of a transform, given directly: random orthonormal
    matrices, key and value means of 3.0, scales s (keys and values divided, queries and
    attention's output multiplied), with the layer's GQA grouping: exact with f32 caches."""
    m, cals = setup
    rng = np.random.default_rng(4)
    cal = cals["random"]
    base = [LayerTransform(il, is_v, c.basis, None, c.mean) for il in cal.layers()
            for is_v, c in ((False, cal.k[il]), (True, cal.v[il]))]
    scaled = [LayerTransform(t.layer, t.is_v, t.matrix, np.exp(rng.uniform(-2, 2, t.mean.shape)).astype(np.float32),
                             t.mean) for t in base]
    toks = _toks(m, 200)
    ref = _logits(m, "f32", "f32", toks, flash_attn=False)
    tol = _tolerance(m, toks, ref, cal)
    for transforms in (base, scaled):
        got = _raw_logits(m, toks, transforms)
        assert np.abs(got - ref).max() < tol
        assert (got.argmax(1) == ref.argmax(1)).all()


def test_small_batches_are_exact(setup):
    """A batch of up to 32 tokens (generation) takes the values' transform through out_prod from
    the matrix stored by rows, a larger one through mul_mat with its transposed copy
    (pyadaq-kv-transform.cpp): random matrices, means and scales on keys and values, f32 caches;
    batches of 1 and of 5 tokens after a prompt of 100 give the uncalibrated logits."""
    m, cals = setup
    _check_small_batches(m, cals["random"])


def test_small_batches_one_kv_head(tiny_model):
    """The same with one KV head (as Gemma 3 270M): a batch's keys and values are [d, 1, tokens],
    whose transposed and permuted views are in memory order without a copy; they must still come
    out with the strides llama.cpp's cache writes check (a batch of 5 tokens failed that check)."""
    path = tiny_model(arch="gemma3", head_dim=64, n_head=4, n_head_kv=1, n_layer=2, sliding_window=32, dtype="f32")
    cal = calibrate(path, TEXT, n_ctx=256, n_chunks=1, n_threads=THREADS, progress=False)
    m = Model(str(path))
    try:
        _check_small_batches(m, _random_calibration(cal, seed=3, mean_scale=3.0))
    finally:
        m.close()


def _inverse_transforms(cal, seed: int) -> list:
    """Matrices that are not orthonormal (M = Q diag(e), Q the calibration's random orthonormal
    basis), each with its inverse given, on keys and values."""
    rng = np.random.default_rng(seed)
    out = []
    for il in cal.layers():
        for is_v, c in ((False, cal.k[il]), (True, cal.v[il])):
            e = np.exp(rng.uniform(-1, 1, (c.n_head, c.head_size)))
            mat = c.basis.astype(np.float64) * e[:, None, :]
            inv = np.linalg.inv(mat)
            out.append(LayerTransform(il, is_v, mat.astype(np.float32), None, c.mean,
                                      np.ascontiguousarray(inv, dtype=np.float32)))
    return out


def _small_batch_logits(m, transforms, k="f32", flash_attn=False, v="f32"):
    """(logits of tokens 100..119 decoded in batches of 1 and then 5 after a prompt of 100 with
    these transforms and K and V types; the uncalibrated f32 logits of the same tokens)."""
    toks = _toks(m, 120)
    ref = _logits(m, "f32", "f32", toks, flash_attn=False)
    ctx = _raw_context(m, k, v, transforms, flash_attn=flash_attn)
    batch = Batch(512)
    rows = []
    try:
        batch.decode(ctx, toks[:100], 0)
        for pos, n in [(p, 1) for p in range(100, 105)] + [(p, 5) for p in range(105, 120, 5)]:
            batch.decode(ctx, toks[pos:pos + n], pos, logits_from=0)
            rows += [np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(m.n_vocab,)).copy() for i in range(n)]
    finally:
        batch.close()
        L.llama_free(ctx)
    return np.stack(rows), ref[100:], toks, ref


def test_small_batches_with_an_explicit_inverse(setup):
    """Batches of 1 and 5 tokens (the one-token path multiplies each KV head's group of queries by
    the rows of N at once) with explicit inverses: the uncalibrated f32 logits."""
    m, cals = setup
    got, want, toks, ref = _small_batch_logits(m, _inverse_transforms(cals["random"], seed=7))
    assert np.abs(got - want).max() < _tolerance(m, toks, ref, cals["random"])


def test_f16_key_matrices(setup):
    """With a quantized K cache the keys' matrices (and the queries' N) are f16: generation in
    small batches with explicit inverses stays close to the exact logits: KL 1.4-2.9e-3 measured on
    llama, gemma3 and qwen2, most of it q8_0's rounding in these ill-conditioned random
    coordinates (scales e^-1..e^1); a wrong f16 matrix gives KL of order 1."""
    m, cals = setup
    got, want, _, _ = _small_batch_logits(m, _inverse_transforms(cals["random"], seed=7), k="q8_0", flash_attn=True)
    assert token_kl(want, got).mean() < 1e-2
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.9


def _f16_against_f32_values(m, cal, monkeypatch, means=True, seed=11):
    """(KL between f16 and f32 value matrices, KL of the f32 ones against the exact logits) for
    generation in batches of 1 and 5 with orthonormal transforms (values stored by rows) and q8_0
    values; asserts the f16 run differs from the f32 one (the matrices were f16)."""
    rng = np.random.default_rng(seed)
    transforms = [LayerTransform(il, is_v, c.basis, np.exp(rng.uniform(-1, 1, c.mean.shape)).astype(np.float32),
                                 c.mean if means else None)
                  for il in cal.layers() for is_v, c in ((False, cal.k[il]), (True, cal.v[il]))]
    with monkeypatch.context() as mp:
        mp.delenv("PYADAQ_TF_F16", raising=False)
        got, want, _, _ = _small_batch_logits(m, transforms, k="f32", v="q8_0", flash_attn=True)
        mp.setenv("PYADAQ_TF_F16", "0")
        f32, _, _, _ = _small_batch_logits(m, transforms, k="f32", v="q8_0", flash_attn=True)
    assert not np.array_equal(got, f32), "PYADAQ_TF_F16=0 changed nothing: the matrices were not f16"
    assert token_kl(want, got).mean() < 1e-2  # the exact logits, as for the keys' f16 matrices
    return token_kl(f32, got).mean(), token_kl(want, f32).mean()


def test_f16_value_matrices(setup, monkeypatch):
    """With a quantized V cache on the host the values' matrices are f16 too, and batches of up
    to 32 tokens take x . M from M's f16 rows through pyadaq's CPU op
    (native/src/pyadaq-tf-cpu.cpp): generation in batches of 1 and 5 with orthonormal value
    transforms (M stored by rows, no explicit inverse) and q8_0 values gives what the same context
    with f32 matrices (PYADAQ_TF_F16=0: ggml's out_prod) gives, to f16's rounding of M and of the
    attention output: KL 3.6e-4 between the two on these random models, about an eighth of what
    the q8_0 values cost in these ill-conditioned coordinates (a wrong product: order 1). Head
    sizes of 256, four column chunks per row: tests/test_embedded.py (calibrated generation)."""
    m, cals = setup
    kl, quantized = _f16_against_f32_values(m, cals["random"], monkeypatch)
    assert kl < 0.3 * quantized, (kl, quantized)


def test_f16_value_matrices_partial_chunk(tiny_model, monkeypatch):
    """The same with a head size of 96 (the op's units are 64 columns: one full, one of 32) and no
    value means (the op reads the values as the graph gives them, without the mean's copy)."""
    path = tiny_model(arch="llama", head_dim=96, n_head=4, n_head_kv=2, dtype="f32")
    m = Model(str(path))
    try:
        cal = _random_calibration(calibrate(path, TEXT, n_ctx=256, n_chunks=1, n_threads=THREADS, progress=False),
                                  seed=3, mean_scale=None)
        kl, quantized = _f16_against_f32_values(m, cal, monkeypatch, means=False, seed=12)
    finally:
        m.close()
    assert kl < 0.3 * quantized, (kl, quantized)


def _check_small_batches(m, cal):
    rng = np.random.default_rng(5)
    transforms = [LayerTransform(il, is_v, c.basis, np.exp(rng.uniform(-2, 2, c.mean.shape)).astype(np.float32),
                                 c.mean) for il in cal.layers() for is_v, c in ((False, cal.k[il]), (True, cal.v[il]))]
    got, want, toks, ref = _small_batch_logits(m, transforms)
    assert np.abs(got - want).max() < _tolerance(m, toks, ref, cal)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_hadamard_blocks():
    for d, first in ((64, 64), (96, 64), (128, 128), (80, 64), (256, 256)):
        h = hadamard(d)
        assert np.allclose(h @ h.T, np.eye(d))
        assert np.allclose(np.abs(h[:first, :first]), 1 / np.sqrt(first))  # every value spread over the block
        assert np.allclose(h[:first, first:], 0)


def test_quantized_layers_get_the_rotation(setup):
    """A calibrated q4_0 layer: principal directions, then the Hadamard blocks; an f16 layer:
    the principal directions alone; values only with a kvt V type somewhere (then in the
    directions of their second moment about 0, their mean kept). Where the model keeps the keys'
    offset in (gemma2's soft-capped logits, gpt-oss's sinks) the keys' directions too are
    those about 0, and they take nothing out."""
    from pyadaq.runtime.kv_transform import _about

    m, cals = setup
    cal = cals["pca"]
    n = m.info.n_layer
    tf = {(t.layer, t.is_v): t for t in kv_transforms(cal, ["q4_0"] + ["f16"] * (n - 1), ["f16"] * n)}
    il0 = cal.layers()[0]
    keys_kept = (il0, False) in cal.offsets_kept
    assert keys_kept == (m.info.architecture in ("gemma2", "gpt-oss"))
    k0 = _about(cal.k[il0], np.zeros_like(cal.k[il0].mean)) if keys_kept else cal.k[il0]
    assert np.allclose(tf[(il0, False)].matrix, k0.basis @ hadamard(cal.k[il0].head_size), atol=1e-6)
    assert (il0, True) not in tf
    tf = {(t.layer, t.is_v): t for t in kv_transforms(cal, ["q4_0"] + ["f16"] * (n - 1), ["kvt2"] + ["f16"] * (n - 1))}
    zero = np.zeros_like(cal.v[il0 + 1].mean)
    assert np.allclose(tf[(il0 + 1, True)].matrix, _about(cal.v[il0 + 1], zero).basis)
    assert tf[(il0, False)].scale is None
    if keys_kept:
        assert tf[(il0, False)].mean is None
    else:
        assert np.array_equal(tf[(il0, False)].mean, cal.k[il0].mean)
    assert tf[(il0 + 1, True)].mean is None
    # a kvt part takes out the first token's row (when the model adds BOS and lets it out), else
    # nothing for values
    if cal.v_first is not None and (il0, True) not in cal.offsets_kept:
        assert np.array_equal(tf[(il0, True)].mean, cal.v_first[il0])
    else:
        assert tf[(il0, True)].mean is None


def test_flat_keys_take_out_only_their_mean(setup, monkeypatch):
    """Without a transform-coded K type the keys keep llama.cpp's rotation and only lose their
    mean (no matrix: nothing multiplies the queries and keys); a kvt K type anywhere, or the
    rotation turned off, brings back the principal directions (followed by the Hadamard blocks
    for quantized layers). The identity part with f16 caches stays exact, and with q8_0 keys
    it is the rotated q8_0 cache with the mean out."""
    from pyadaq.runtime.kv_transform import keys_by_mean

    m, cals = setup
    cal = cals["pca"]
    n = m.info.n_layer
    assert keys_by_mean(cal, ["q8_0"] * n) and keys_by_mean(cal, ["f16"] * n) and keys_by_mean(cal, ["q4_0"] * n, True)
    assert not keys_by_mean(cal, ["q8_0"] * n, attn_rot=False)
    assert keys_by_mean(cal, ["f16"] * n, attn_rot=False)  # nothing to rotate
    assert not keys_by_mean(cal, ["kvt2s"] + ["q8_0"] * (n - 1))
    with monkeypatch.context() as mp:  # llama.cpp's own switch: no rotation, so the directions stay
        mp.setenv("LLAMA_ATTN_ROT_DISABLE", "1")
        assert not keys_by_mean(cal, ["q8_0"] * n) and keys_by_mean(cal, ["f16"] * n)
    tfs, rot = context_settings(cal, ["q8_0"] * n, ["kvt2"] * n)
    keys = [t for t in tfs if not t.is_v]
    assert rot == (None, False) and len(keys) == len(cal.layers())
    # (zero where the model keeps the keys' offset in: soft-capped logits, sinks)
    assert all(t.matrix is None and t.scale is None and
               np.array_equal(t.mean, 0 * cal.k[t.layer].mean if (t.layer, False) in cal.offsets_kept
                              else cal.k[t.layer].mean) for t in keys)
    tfs, rot = context_settings(cal, ["kvt2s"] * n, ["kvq2"] * n)
    assert rot == (False, None) and all(t.matrix is not None for t in tfs) and not any(t.is_v for t in tfs)
    # the native side: an identity part takes a mean and nothing else
    nat = pyadaq.native()
    err = nat.ffi.new("char[]", 256)
    d = cal.k[cal.layers()[0]].head_size
    ones = np.ones((1, d), dtype=np.float32)
    for mean, scale in ((None, None), (ones, ones)):
        rc = nat.llama.pyadaq_next_context_kv_transform(
            0, 0, 1, d, nat.ffi.NULL, nat.ffi.NULL if scale is None else nat.ffi.from_buffer("float[]", scale),
            nat.ffi.NULL if mean is None else nat.ffi.from_buffer("float[]", mean), nat.ffi.NULL, err, 256)
        assert rc == -1 and b"identity" in nat.ffi.string(err)
    nan = nat.ffi.from_buffer("float[]", ones * np.nan)
    rc = nat.llama.pyadaq_next_context_kv_transform(0, 0, 1, d, nat.ffi.NULL, nat.ffi.NULL, nan, nat.ffi.NULL, err, 256)
    assert rc == -1 and b"not finite" in nat.ffi.string(err)
    assert pending() == 0


def test_whitening_exponent(setup, monkeypatch):
    """The same directions and groups for both profiles, each direction divided by its standard
    deviation; a WHITENING exponent of 0.5 for kvt2 divides by the square root of that
    (pyadaq.runtime.kv_transform.WHITENING, scripts/chat_kl.py --values-whitening)."""
    from pyadaq.runtime import kv_transform
    from pyadaq.runtime.kv_transform import matrix_and_scale, part_components

    _, cals = setup
    cal = cals["pca"]
    comps = part_components(cal, cal.layers()[0], True, "kvt2")
    mk, sk = matrix_and_scale(comps, pyadaq.cache_type("kvt2s"))
    mv, sv = matrix_and_scale(comps, pyadaq.cache_type("kvt2"))
    assert np.array_equal(mk, mv) and np.array_equal(sk, sv)
    assert sk.min() > 0 and sk.max() > 2 * sk.min()  # the calibration's spectrum, not ones
    monkeypatch.setitem(kv_transform.WHITENING, "kvt2", 0.5)
    mh, sh = matrix_and_scale(comps, pyadaq.cache_type("kvt2"))
    assert np.array_equal(mh, mk) and np.allclose(sh, np.sqrt(sk))


def test_first_token_is_stored_exactly(setup):
    """With the first-token rows of the calibration, kvt caches store BOS's key and value as
    zeros, which they keep exactly: at position 0 (BOS attends to itself alone) the logits are
    the f32 ones; a calibration without those rows (format 1) quantizes BOS like any token."""
    m, cals = setup
    cal = cals["pca"]
    if not m.adds_bos:
        assert cal.first_token is None and cal.v_first is None
        return
    toks = _toks(m, 64)
    assert int(toks[0]) == cal.first_token
    ref = _logits(m, "f32", "f32", toks, flash_attn=False)[0]
    new = np.abs(_logits(m, "kvt2s", "kvt2", toks, cal=cal)[0] - ref).max()
    old = np.abs(_logits(m, "kvt2s", "kvt2", toks, cal=dataclasses.replace(cal, first_token=None, k_first=None,
                                                                           v_first=None))[0] - ref).max()
    if all((il, True) in cal.offsets_kept for il in cal.layers()):
        # gpt-oss: its sinks keep the values' offsets in, so nothing is stored relative to BOS
        # (the rows are kept about zero, as without them: once they were stored about offsets
        # that were not taken out, and position 0 came out 14.6 off where this is 2.5)
        assert new == old
    else:
        assert new < 0.02 * old, (new, old)


def test_context_shift_with_scales_and_means(setup):
    """The K-shift undoes and redoes every part of a key transform (matrix, mean, scales)."""
    m, cals = setup
    rng = np.random.default_rng(5)
    cal = cals["random"]
    transforms = [LayerTransform(il, is_v, c.basis, np.exp(rng.uniform(-2, 2, c.mean.shape)).astype(np.float32),
                                 c.mean) for il in cal.layers() for is_v, c in ((False, cal.k[il]), (True, cal.v[il]))]
    _assert_shift_exact(m, cal, _toks(m, 160), transforms=transforms)


def test_eval_cli_with_calibrated_configs(tiny_model, tmp_path, cache, capsys):
    """`+cal` configs run with --kv-calibration's file, or the model's default calibration
    (made and cached); the rows say so; a bad or mismatched file is one clear line, exit 2."""
    import json

    from pyadaq.cli import main

    path = tiny_model(arch="llama", head_dim=64, n_head_kv=2, dtype="f32")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "e.json"
    common = ["eval", "--model", str(path), "--text", str(text), "--ctx", "64", "--chunks", "2", "--threads", "1"]
    assert main([*common, "--configs", "f16:f16+cal,q4_0:q4_0,q4_0:q4_0+cal", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["config"] for r in rows] == ["f16:f16+cal", "q4_0:q4_0", "q4_0:q4_0+cal"]
    assert rows[0]["calibrated"] and rows[0]["kl_mean"] < 1e-3 and "calibrated" not in rows[1]
    assert rows[2]["calibration_fingerprint"] == rows[0]["calibration_fingerprint"]
    cal = calibrate(path, TEXT, n_ctx=64, n_chunks=2, n_threads=1, progress=False)
    f = write_calibration(cal, tmp_path / "mine.gguf")
    assert main([*common, "--configs", "q4_0:q4_0", "--kv-calibration", str(f), "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["config"] == "q4_0:q4_0+cal" and row["calibration_fingerprint"] == cal.fingerprint
    capsys.readouterr()
    other = tiny_model(arch="llama", head_dim=64, n_head_kv=2, seed=3)
    wrong = write_calibration(calibrate(other, TEXT, n_ctx=64, n_chunks=1, n_threads=1, progress=False),
                              tmp_path / "other.gguf")
    for bad, message in ((wrong, "another model"), (tmp_path / "none.gguf", "not found"), (text, "GGUF")):
        assert main([*common, "--configs", "q8_0:q8_0+cal", "--kv-calibration", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert main(["chat", "--model", str(path), "--kv-calibration", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_transforms_with_an_explicit_inverse(setup):
    """A matrix that is not orthonormal (M = Q diag(e) with a random orthonormal Q) with its
    inverse given: queries become q N^T s, the output goes back through N; exact with f32
    caches, in decoding and through a K-shift."""
    m, cals = setup
    cal = cals["random"]
    out = _inverse_transforms(cal, seed=6)
    toks = _toks(m, 200)
    ref = _logits(m, "f32", "f32", toks, flash_attn=False)
    got = _raw_logits(m, toks, out)
    assert np.abs(got - ref).max() < _tolerance(m, toks, ref, cal)
    _assert_shift_exact(m, cal, _toks(m, 160), transforms=out)


def test_bench_cli_with_a_calibrated_config(tiny_model, tmp_path, cache, capsys):
    import json

    from pyadaq.cli import main

    path = tiny_model(arch="llama", head_dim=64, n_head_kv=2, dtype="f32")
    f = write_calibration(calibrate(path, TEXT, n_ctx=64, n_chunks=1, n_threads=1, progress=False),
                          tmp_path / "c.gguf")
    out = tmp_path / "b.json"
    assert main(["bench", "--model", str(path), "--configs", "q8_0:kvt2+cal", "--kv-calibration", str(f),
                 "--depths", "0", "--n-prompt", "16", "--n-gen", "2", "--reps", "1", "--threads", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert any(r["config"] == "q8_0:kvt2+cal" and r.get("calibrated") for r in rows)
    capsys.readouterr()
    assert main(["bench", "--model", str(path), "--configs", "q8_0:kvt2"]) == 2
    assert "+cal" in capsys.readouterr().err


def test_qwen2_biases_calibrated(tiny_model):
    """A tiny qwen2 (attention biases: a key bias of std 3 per channel, GQA, head size 64): the
    generated model is what llama.cpp computes (numpy reference), and the calibration, which takes
    the key mean out and stores principal coordinates, lowers the KL of 2-bit keys (kvq2 with
    llama.cpp's rotation: ~0.28; kvt2s calibrated: ~0.05) and of 2-bit values (kvq2 ~0.16, kvt2
    calibrated ~0.02) against the exact logits."""
    import tiny

    path = tiny_model(arch="qwen2", head_dim=64, n_head=4, n_head_kv=2, dtype="f32")
    cal = calibrate(path, TEXT, n_ctx=256, n_chunks=2, n_threads=THREADS, progress=False)
    m = Model(str(path))
    try:
        toks = _toks(m)
        exact = _logits(m, "f32", "f32", toks, flash_attn=False)
        assert float(token_kl(tiny.reference_logits(path, toks), exact).mean()) < 1e-8

        def kl(k, v, c=None):
            return float(token_kl(exact, _logits(m, k, v, toks, cal=c)).mean())

        assert kl("kvt2s", "f16", cal) < 0.5 * kl("kvq2", "f16")
        assert kl("q8_0", "kvt2", cal) < 0.5 * kl("q8_0", "kvq2")
        assert kl("q4_0", "f16", cal) < kl("q4_0", "f16")
    finally:
        m.close()


def test_offsets_the_model_keeps(setup, tmp_path):
    """A calibration records, from libllama, the layers whose offsets stay in the data: the keys'
    where the logits are soft-capped (gemma2), keys' and values' where sinks take part of the
    attention (gpt-oss), none elsewhere; the file keeps them, the fingerprint covers them, and a
    file that names a layer the model lacks is refused."""
    from pyadaq.model.calibration import read_calibration

    m, cals = setup
    cal = cals["pca"]
    layers = cal.layers()
    want = {"gemma2": {(il, False) for il in layers},
            "gpt-oss": {(il, is_v) for il in layers for is_v in (False, True)}}.get(m.info.architecture, set())
    assert cal.offsets_kept == want
    back = read_calibration(write_calibration(cal, tmp_path / "c.gguf"))
    assert back.offsets_kept == cal.offsets_kept and back.fingerprint == cal.fingerprint
    if want:
        assert dataclasses.replace(cal, offsets_kept=frozenset()).fingerprint != cal.fingerprint
    # numpy ints and 0/1 are the same record (and write as plain ints)
    loose = dataclasses.replace(cal, offsets_kept={(np.int64(il), int(v)) for il, v in want})
    assert loose.fingerprint == cal.fingerprint
    assert read_calibration(write_calibration(loose, tmp_path / "loose.gguf")).offsets_kept == want
    bad = write_calibration(dataclasses.replace(cal, offsets_kept=frozenset({(m.info.n_layer, True)})),
                            tmp_path / "bad.gguf")
    with pytest.raises(CalibrationFileError, match=r"offsets_kept\.v"):
        read_calibration(bad)
    # a file made before the record (offsets_kept None) in calibrate()'s cache is filled in
    # from the model, and the cache rewritten with it
    from pyadaq.eval.calibration import cached_path

    cached = cached_path(m.path, TEXT, n_ctx=256, n_chunks=2)
    assert cached.exists()
    write_calibration(dataclasses.replace(cal, offsets_kept=None), cached)
    assert read_calibration(cached).offsets_kept is None
    again = calibrate(m.path, TEXT, n_ctx=256, n_chunks=2, n_threads=THREADS, progress=False)
    assert again.offsets_kept == want and read_calibration(cached).offsets_kept == want
    assert again.fingerprint == cal.fingerprint


@pytest.mark.parametrize("arch", ["gemma2", "gpt-oss"])
def test_parts_about_zero_where_offsets_stay(tiny_model, arch):
    """Where the model keeps an offset in the data (gemma2's keys, gpt-oss's keys and values), the
    transform-coded parts are fitted about zero, as they are stored: KL against the exact logits
    with 2-bit kvt keys or values, and with the parts fitted about the offsets libllama does not
    take out (offsets_kept emptied: how they were stored before), measured gemma2 kvt2s:f16 0.011
    against 0.020, gpt-oss q8_0:kvt2 0.035 against 2.5 (q8_0:kvq2 0.22) and kvt2s:f16 0.086 against
    0.36."""
    path = tiny_model(arch=arch, head_dim=64, n_head=4, n_head_kv=2, n_layer=2, sliding_window=32, dtype="f32")
    cal = calibrate(path, TEXT, n_ctx=256, n_chunks=2, n_threads=THREADS, progress=False)
    before = dataclasses.replace(cal, offsets_kept=frozenset())
    m = Model(str(path))
    try:
        toks = _toks(m)
        exact = _logits(m, "f32", "f32", toks, flash_attn=False)

        def kl(k, v, c=None):
            return float(token_kl(exact, _logits(m, k, v, toks, cal=c)).mean())

        assert kl("kvt2s", "f16", cal) < 0.7 * kl("kvt2s", "f16", before)
        assert kl("q8_0", "kvt2", cal) < 0.5 * kl("q8_0", "kvq2")
        if arch == "gpt-oss":
            assert 10 * kl("q8_0", "kvt2", cal) < kl("q8_0", "kvt2", before)
    finally:
        m.close()


def test_gemma2_soft_cap(tiny_model):
    """The tiny gemma2 is what llama.cpp computes (numpy reference, with and without flash
    attention, whose CPU kernel soft-caps in its own loop), and its cap of 5 bites: without it
    the logits move by KL ~0.03. (The identities on it are the setup fixture's.)"""
    import tiny

    path = tiny_model(arch="gemma2", head_dim=64, n_head=4, n_head_kv=2, n_layer=2, sliding_window=32, dtype="f32")
    assert tiny.read_config(path).attn_softcap == 5.0
    m = Model(str(path))
    try:
        toks = _toks(m)
        ref = tiny.reference_logits(path, toks)
        assert float(token_kl(ref, _logits(m, "f32", "f32", toks, flash_attn=False)).mean()) < 1e-6
        assert float(token_kl(ref, _logits(m, "f16", "f16", toks)).mean()) < 1e-5
        assert float(token_kl(ref, tiny.reference_logits(path, toks, attn_softcap=0.0)).mean()) > 1e-2
    finally:
        m.close()
