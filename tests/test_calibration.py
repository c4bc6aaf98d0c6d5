"""KV calibrations (pyadaq.eval.calibration, pyadaq.model.calibration, `pyadaq calibrate`): the
captured means and covariances against numpy over every token of every ubatch, keys taken after
RoPE; the GGUF file read back exactly; the cache; and every bad file or mismatched model refused
with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from pyadaq.cli import main
from pyadaq.eval.calibration import cached_path, calibrate
from pyadaq.eval.kl import chunks
from pyadaq.model.calibration import (
    CalibrationFileError,
    CalibrationMismatchError,
    check_for_model,
    read_calibration,
    write_calibration,
)
from pyadaq.model.header import read_model_info
from pyadaq.runtime.context import Model

TEXT = " ".join(f"Sentence number {i} talks about the weather and the sea." for i in range(400))


def layer0_kv(path, toks, n_ctx):
    """Layer 0 of a tiny llama per chunk of n_ctx tokens (positions from 0 in each):
    (K before RoPE, K after RoPE, V), each [tokens, heads, d]."""
    cfg = tiny.read_config(path)
    W = tiny._read_tensors(path)
    h = tiny._rms_norm(W["token_embd.weight"][toks], W["blk.0.attn_norm.weight"], cfg.rms_eps)
    k = (h @ W["blk.0.attn_k.weight"].T).reshape(len(toks), cfg.n_head_kv, cfg.head_dim)
    v = (h @ W["blk.0.attn_v.weight"].T).reshape(len(toks), cfg.n_head_kv, cfg.head_dim)
    pos = np.arange(len(toks)) % n_ctx
    return k, tiny._rope(k, pos, cfg.rope_freq_base, "norm"), v


def moments(x):
    mean = x.mean(0)
    c = x - mean
    return mean, np.einsum("thi,thj->hij", c, c) / len(x)


@pytest.fixture()
def model(tiny_model):
    return tiny_model(head_dim=64, n_head_kv=2)


def test_moments_match_numpy_after_rope(model, cache):
    """n_ctx 1024: each chunk runs as two ubatches of 512; the calibration holds every token of
    both chunks, and its keys are the rotated ones that enter the cache."""
    n_ctx = 1024
    cal = calibrate(model, TEXT, n_ctx=n_ctx, n_chunks=2, n_threads=1, progress=False)
    m = Model(str(model))
    try:
        toks = m.tokenize(TEXT, add_bos=True)
        allt = np.concatenate(chunks(toks, n_ctx, 2, int(toks[0]) if m.adds_bos else None))
    finally:
        m.close()
    assert cal.tokens[0] == len(allt) == 2 * n_ctx and cal.chunks == 2
    k_raw, k, v = layer0_kv(model, allt, n_ctx)
    for got, x in ((cal.k[0], k), (cal.v[0], v)):
        mean, cov = moments(x)
        scale = np.abs(cov).max()
        # f16 weights and activations in llama.cpp's matmuls: agreement to ~1e-3
        assert np.abs(got.mean - mean).max() < 5e-3 * np.sqrt(scale)
        assert np.abs(got.covariance() - cov).max() < 5e-3 * scale
        var = np.linalg.eigvalsh(cov)[:, ::-1]
        assert np.allclose(got.var, var, rtol=1e-2, atol=1e-3 * scale)
    # the captured keys are not the ones before RoPE: their means differ by far more than the
    # tolerance above
    raw_mean, _ = moments(k_raw)
    assert np.abs(cal.k[0].mean - raw_mean).max() > 50 * 5e-3 * np.sqrt(np.abs(moments(k)[1]).max())


def test_file_round_trip_and_model_check(model, tiny_model, cache, tmp_path):
    cal = calibrate(model, TEXT, n_ctx=256, n_chunks=2, n_threads=1, progress=False, out=tmp_path / "c.gguf")
    assert cal.path == tmp_path / "c.gguf"
    back = read_calibration(tmp_path / "c.gguf")
    info = read_model_info(model)
    assert back.model_sha256 == info.sha256 and back.n_layer == info.n_layer
    assert back.layers() == list(range(info.n_layer)) and back.n_ctx == 256 and back.chunks == 2
    for il in back.layers():
        for a, b in ((back.k[il], cal.k[il]), (back.v[il], cal.v[il])):
            assert np.array_equal(a.mean, b.mean) and np.array_equal(a.basis, b.basis)
            assert a.basis.shape == (2, 64, 64)
            # orthonormal columns, by descending variance
            assert np.allclose(np.einsum("hji,hjk->hik", a.basis, a.basis), np.eye(64), atol=1e-5)
            assert (np.diff(a.var, axis=1) <= 0).all()
    check_for_model(back, info)
    other = read_model_info(tiny_model(head_dim=64, n_head_kv=2, seed=7))
    with pytest.raises(CalibrationMismatchError, match="another model"):
        check_for_model(back, other)


def test_first_token_rows(model, cache, tmp_path):
    """A calibration records what every sequence that starts with BOS caches at position 0 (layer
    0 against numpy), writes and reads them back; a format-1 file (without them) is still read,
    a later format is refused."""
    import dataclasses

    import gguf

    cal = calibrate(model, TEXT, n_ctx=256, n_chunks=1, n_threads=1, progress=False)
    m = Model(str(model))
    try:
        bos = int(m.tokenize("", add_bos=True)[0])
    finally:
        m.close()
    assert cal.first_token == bos
    _, k, v = layer0_kv(model, np.array([bos]), 256)
    for got, want in ((cal.k_first[0], k[0]), (cal.v_first[0], v[0])):
        assert got.shape == (2, 64)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
    back = read_calibration(cal.path)
    assert back.first_token == bos and back.fingerprint == cal.fingerprint
    for il in cal.layers():
        assert np.array_equal(back.k_first[il], cal.k_first[il]) and np.array_equal(back.v_first[il], cal.v_first[il])

    def with_format(path, version):
        r = gguf.GGUFReader(str(path), "r+")
        r.fields["pyadaq.format"].parts[-1][0] = version
        r.data.flush()
        del r

    old = dataclasses.replace(cal, first_token=None, k_first=None, v_first=None, path=None)
    write_calibration(old, tmp_path / "v1.gguf")
    with_format(tmp_path / "v1.gguf", 1)
    v1 = read_calibration(tmp_path / "v1.gguf")
    assert v1.first_token is None and v1.v_first is None and v1.fingerprint != cal.fingerprint
    assert np.array_equal(v1.v[0].basis, cal.v[0].basis)
    with_format(tmp_path / "v1.gguf", 3)
    with pytest.raises(CalibrationFileError, match="calibration format 3, this pyadaq reads 1, 2"):
        read_calibration(tmp_path / "v1.gguf")


def test_cache_is_used_and_a_damaged_entry_measured_again(model, cache):
    cal = calibrate(model, TEXT, n_ctx=256, n_chunks=1, n_threads=1, progress=False)
    path = cached_path(model, TEXT, 256, 1)
    assert cal.path == path and path.is_relative_to(cache)
    created = cal.created
    again = calibrate(model, TEXT, n_ctx=256, n_chunks=1, n_threads=1, progress=False)
    assert again.created == created  # read, not measured
    path.write_bytes(path.read_bytes()[:100])
    redone = calibrate(model, TEXT, n_ctx=256, n_chunks=1, n_threads=1, progress=False)
    assert np.allclose(redone.k[0].mean, cal.k[0].mean)
    assert read_calibration(path).n_ctx == 256


@pytest.fixture()
def good(model, cache, tmp_path):
    calibrate(model, TEXT, n_ctx=256, n_chunks=1, n_threads=1, progress=False, out=tmp_path / "good.gguf")
    return tmp_path / "good.gguf"


def test_bad_files(good, model, tmp_path):
    with pytest.raises(CalibrationFileError, match="not found"):
        read_calibration(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CalibrationFileError, match="not a readable GGUF"):
        read_calibration(junk)
    data = good.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(CalibrationFileError):
            read_calibration(short)
    with pytest.raises(CalibrationFileError, match="not a pyadaq KV calibration"):
        read_calibration(model)  # a model, not a calibration


def test_corrupt_basis_and_inconsistent_metadata(good, tmp_path):
    cal = read_calibration(good)
    bad = dict(cal.k)
    b = cal.k[1].basis.copy()
    b[0, :, 3] *= 1.5
    bad[1] = type(cal.k[1])(cal.k[1].mean, b, cal.k[1].var)
    write_calibration(type(cal)(**{**cal.__dict__, "k": bad}), tmp_path / "bad.gguf")
    with pytest.raises(CalibrationFileError, match="layer 1 K bases are not orthonormal"):
        read_calibration(tmp_path / "bad.gguf")
    wrong = type(cal)(**{**cal.__dict__, "head_size_v": (32,) * cal.n_layer})
    write_calibration(wrong, tmp_path / "wrong.gguf")
    with pytest.raises(CalibrationFileError, match=r"blk\.0\.v_mean"):
        read_calibration(tmp_path / "wrong.gguf")


def test_cli(model, cache, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "cli.gguf"
    args = ["calibrate", "--model", str(model), "--text", str(text), "--ctx", "256", "--chunks", "1",
            "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "reading 1 chunk of 256 tokens" in first.err
    assert f"calibration: {out}" in first.out and read_calibration(out).text_tokens == 256
    assert main(args) == 0
    assert "reading" not in capsys.readouterr().err  # from the cache
    assert main(["calibrate", "--model", str(model), "--ctx", "8"]) == 2
    assert "--ctx 8 must be between" in capsys.readouterr().err
    missing = tmp_path / "nope.gguf"
    assert main(["calibrate", "--model", str(missing)]) == 2
    assert "not found" in capsys.readouterr().err
    # `pyadaq cache` lists the cached calibration and clears it
    assert main(["cache"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("kv-calibrations"))
    assert " 1 entry" in line
    assert main(["cache", "--clear", "kv-calibrations"]) == 0
    assert not (cache / "kv-calibrations").exists()
