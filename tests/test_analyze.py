"""pyadaq.eval.analyze and `pyadaq analyze`: the K/V capture against a numpy computation of the
first layer's keys and values, the weight norms against numpy, the verdict, outputs and bad
input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tiny
from pyadaq.cli import main
from pyadaq.eval.analyze import activation_stats, analyze, verdict, weight_norms

TEXT = " ".join(f"Sentence number {i} talks about the weather and the sea." for i in range(400))


def layer0_kv(path, toks):
    """Layer 0 of a tiny llama: h = rms_norm(embedding); K = rope(h W_K^T), V = h W_V^T.
    Rope turns pairs of coordinates, so each key row keeps the norm of h W_K^T."""
    cfg = tiny.read_config(path)
    W = tiny._read_tensors(path)
    h = tiny._rms_norm(W["token_embd.weight"][toks], W["blk.0.attn_norm.weight"], cfg.rms_eps)
    k = h @ W["blk.0.attn_k.weight"].T
    v = h @ W["blk.0.attn_v.weight"].T
    return cfg, k, v


@pytest.mark.parametrize("n_ctx", [64, 1024], ids=["one-ubatch", "two-ubatches"])
def test_capture_matches_numpy(tiny_model, n_ctx):
    """With n_ctx 1024 each chunk runs as two ubatches of 512 tokens (two graphs in one
    llama_decode): the capture holds every token of both."""
    from pyadaq.eval.kl import chunks
    from pyadaq.runtime.context import Model

    path = tiny_model(head_dim=64, n_head_kv=2)
    res = activation_stats(path, TEXT, n_ctx=n_ctx, n_chunks=2, n_threads=1, progress=False)
    m = Model(str(path))
    try:
        toks = m.tokenize(TEXT, add_bos=True)
        parts = chunks(toks, n_ctx, 2, int(toks[0]) if m.adds_bos else None)
    finally:
        m.close()
    allt = np.concatenate(parts)
    assert len(allt) == 2 * n_ctx
    cfg, k, v = layer0_kv(path, allt)
    r0 = res["layers"][0]
    assert res["tokens"] == 2 * n_ctx
    for r in res["layers"]:
        assert r["k"]["tokens"] == 2 * n_ctx and r["v"]["tokens"] == 2 * n_ctx
    assert r0["v"]["n_head"] == 2 and r0["v"]["head_size"] == 64
    D = cfg.head_dim
    for h in range(2):
        vh = v[:, h * D:(h + 1) * D]
        sv = np.linalg.svd(vh, compute_uv=False)
        # f16 weights and activations in llama.cpp's matmul: agreement to ~1e-3
        assert r0["v"]["frobenius"][h] == pytest.approx(np.linalg.norm(vh), rel=5e-3)
        assert r0["v"]["spectral"][h] == pytest.approx(sv[0], rel=5e-3)
        kh = k[:, h * D:(h + 1) * D]
        assert r0["k"]["frobenius"][h] == pytest.approx(np.linalg.norm(kh), rel=5e-3)
    # singular values per token, descending, min <= mean <= max across heads
    sv_mean = np.array(r0["v"]["sv_mean"])
    assert np.all(np.diff(sv_mean) <= 1e-9)
    assert np.all(np.array(r0["v"]["sv_min"]) <= sv_mean + 1e-12)
    assert np.all(sv_mean <= np.array(r0["v"]["sv_max"]) + 1e-12)


def test_weight_norms_match_numpy(tiny_model):
    path = tiny_model(head_dim=64)
    W = tiny._read_tensors(path)
    got = weight_norms(path, progress=False)
    assert len(got) == tiny.read_config(path).n_layer
    for r in got:
        for kind in ("k", "v"):
            w = W[f"blk.{r['layer']}.attn_{kind}.weight"]
            assert r[kind]["frobenius"] == pytest.approx(np.linalg.norm(w), rel=1e-6)
            assert r[kind]["spectral"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-6)


@pytest.mark.embedded
def test_weight_norms_match_gguf_reader(embedded_model):
    """The header reader + per-tensor read give what gguf.GGUFReader's tensor data gives, on
    quantized weights (Gemma 3 270M: Q5_0 K, Q8_0 or Q5_0 V)."""
    import gguf
    from gguf.quants import dequantize

    got = weight_norms(embedded_model, progress=False)
    by_name = {t.name: t for t in gguf.GGUFReader(str(embedded_model)).tensors}
    assert len(got) == max(int(n.split(".")[1]) for n in by_name if n.startswith("blk.")) + 1
    types = set()
    for il in (0, 2, len(got) - 1):
        for kind in ("k", "v"):
            t = by_name[f"blk.{il}.attn_{kind}.weight"]
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1, int(t.shape[0]))
            r = got[il][kind]
            assert r["type"] == t.tensor_type.name and r["shape"] == list(w.shape)
            assert r["frobenius"] == pytest.approx(np.linalg.norm(w), rel=1e-12)
            assert r["spectral"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-12)
            types.add(r["type"])
    assert {"Q5_0", "Q8_0"} <= types


def test_verdict_counts_layers():
    def layer(kf, vf):
        return {"k": {"frobenius_per_token": [kf], "spectral_per_token": [kf]},
                "v": {"frobenius_per_token": [vf], "spectral_per_token": [vf]}}

    res = {"activations": {"layers": [layer(3, 1), layer(2, 1), layer(1, 4)]}}
    v = verdict(res)
    assert v["layers_frobenius"] == 2 and v["layers_spectral"] == 2 and v["holds"]
    assert "2 of 3 layers" in v["text"] and "holds" in v["text"]
    res = {"activations": {"layers": [layer(1, 3), layer(1, 2), layer(4, 1)]}}
    assert not verdict(res)["holds"]


def test_analyze_cli_writes_json_and_plots(tiny_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out_json, out_png = tmp_path / "a.json", tmp_path / "a.png"
    rc = main(["analyze", "--model", str(tiny_model(arch="gemma3", sliding_window=32)), "--text", str(text),
               "--ctx", "64", "--chunks", "2", "--threads", "1", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed
    res = json.loads(out_json.read_text())
    assert len(res["activations"]["layers"]) == res["n_layer"] == len(res["weights"])
    assert res["verdict"]["n_layer"] == res["n_layer"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "a-spectra.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra,message", [
    (["--ctx", "100000"], "must be between 16"),
    (["--chunks", "0"], "--chunks must be at least 1"),
    (["--text", "/nonexistent.txt"], "No such file"),
])
def test_analyze_bad_input(tiny_model, capsys, extra, message):
    rc = main(["analyze", "--model", str(tiny_model()), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_analyze_missing_and_corrupt_model(tmp_path, capsys):
    rc = main(["analyze", "--model", str(tmp_path / "none.gguf")])
    assert rc == 2 and "none.gguf" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    rc = main(["analyze", "--model", str(bad)])
    assert rc == 2 and "bad.gguf" in capsys.readouterr().err


def test_analyze_short_text(tiny_model):
    with pytest.raises(ValueError, match="fewer than one chunk"):
        analyze(tiny_model(), "Too short.", n_ctx=64, n_chunks=1, progress=False)
