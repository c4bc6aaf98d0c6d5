"""pyadaq eval: metric math, config parsing, the stored f16 reference, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyadaq.cli import main
from pyadaq.eval.kl import ReferenceStore, chunks, compare
from pyadaq.eval.metrics import Accumulator, decode_logprobs, encode_logprobs, log_softmax, token_kl
from pyadaq.plan.spec import CalSpec, LayerSpec, parse_configs

TEXT = " ".join(f"The {w} sat on the mat and looked at the {v} for a while." for w, v in
                zip(["cat", "dog", "bird", "fox"] * 60, ["sun", "moon", "tree", "house", "river"] * 48))


def test_metrics_against_direct_numpy():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(7, 50)) * 3
    test = ref + rng.normal(size=(7, 50)) * 0.5
    nxt = rng.integers(0, 50, size=7)
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    q = np.exp(test) / np.exp(test).sum(-1, keepdims=True)
    kl = (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(token_kl(ref, test), kl, rtol=1e-10)
    acc = Accumulator()
    acc.add(ref, test, nxt)
    s = acc.summary()
    rows = np.arange(7)
    assert s["tokens"] == 7
    assert s["kl_mean"] == pytest.approx(kl.mean(), rel=1e-10)
    assert s["ppl"] == pytest.approx(np.exp(-np.log(q[rows, nxt]).mean()), rel=1e-10)
    assert s["top1"] == pytest.approx(np.mean(p.argmax(-1) == q.argmax(-1)))
    assert s["rms_dp"] == pytest.approx(np.sqrt(np.mean((q[rows, nxt] - p[rows, nxt]) ** 2)), rel=1e-10)
    assert s["kl_stderr"] == pytest.approx(kl.std(ddof=1) / np.sqrt(7), rel=1e-10)


def test_stored_logprobs_keep_kl():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 1000)) * 4
    lp = log_softmax(logits)
    back = decode_logprobs(encode_logprobs(lp))
    assert np.abs(back - np.clip(lp, -30, 0)).max() <= 30 / 65535 / 2 + 1e-12
    test = logits + rng.normal(size=logits.shape) * 0.3
    a, b = Accumulator(), Accumulator()
    a.add(logits, test, np.zeros(200, int))
    b.add_logprobs(back, lp.argmax(-1), test, np.zeros(200, int))
    assert b.summary()["kl_mean"] == pytest.approx(a.summary()["kl_mean"], rel=1e-3)


def test_scoring_by_blocks_of_rows_is_exact():
    """Scoring a few rows at a time (row_blocks: temporaries of about 8 MiB; 256 rows of 4096
    here, so 600 rows are three blocks) gives what the whole arrays give, bit for bit: the KL,
    top-1, nll and dp of every row, from logits and from the stored (encoded) reference."""
    from pyadaq.eval.metrics import row_blocks

    rng = np.random.default_rng(2)
    ref = (rng.normal(size=(600, 4096)) * 3).astype(np.float32)
    test = ref + (rng.normal(size=ref.shape) * 0.2).astype(np.float32)
    nxt = rng.integers(0, 4096, size=600)
    assert len(row_blocks(*ref.shape)) == 3
    lp_ref, lp = log_softmax(ref), log_softmax(test)
    rows = np.arange(600)
    kl = np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=-1)
    assert np.array_equal(token_kl(ref, test), kl)
    q = encode_logprobs(lp_ref)
    dq = decode_logprobs(q)
    for acc, want_ref in ((Accumulator(), lp_ref), (Accumulator(), dq)):
        if want_ref is lp_ref:
            acc.add(ref, test, nxt)
        else:
            acc.add_encoded(q, ref.argmax(-1), test, nxt)
        assert acc.kl == np.sum(np.exp(want_ref) * (want_ref - lp), axis=-1).tolist()
        assert acc.top1 == (ref.argmax(-1) == lp.argmax(-1)).tolist()
        assert acc.nll == (-lp[rows, nxt]).tolist()
        assert acc.dp == (np.exp(lp[rows, nxt]) - np.exp(want_ref[rows, nxt])).tolist()


def test_parse_configs():
    assert parse_configs("Q8_0:kvq2, f16:F16") == [("q8_0", "kvq2"), ("f16", "f16")]
    assert parse_configs("budget:3.0,budget:q8_0/2.5+cal,budget:4.5/2.5:spectra") == [
        LayerSpec("budget", "3.0"), CalSpec(LayerSpec("budget", "q8_0/2.5")), LayerSpec("budget", "4.5/2.5:spectra")]
    for bad, msg in [("q8_0", "is not K:V"), ("q8_0:q4_0:f16", "is not K:V"), ("q9_0:f16", "unknown"),
                     ("", "no configs"), ("budget:lots", "not a number"), ("budget:q9_0/2.5", "neither"),
                     ("budget:4.5/2.5/1", "is not K/V"), ("budget:3.0:kll", "sensitivity source")]:
        with pytest.raises(ValueError, match=msg):
            parse_configs(bad)


def test_chunks_replace_first_token_with_bos():
    toks = np.arange(100, 130, dtype=np.int32)
    parts = chunks(toks, 8, 10, bos=1)
    assert len(parts) == 3 and all(p[0] == 1 for p in parts)
    assert list(parts[1][1:]) == list(range(109, 116))
    with pytest.raises(ValueError, match="fewer than one chunk"):
        chunks(toks[:5], 8, 1, bos=1)


def test_reference_is_stored_and_reused(tiny_model, tmp_path):
    model = tiny_model()
    cfgs = [("f16", "f16"), ("q8_0", "kvq2")]

    def run(text=TEXT, n_ctx=128):
        store = ReferenceStore(tmp_path, model_sha256="m", text_sha256=str(hash(text)), n_ctx=n_ctx)
        return compare(str(model), cfgs, text=text, n_ctx=n_ctx, n_chunks=3, n_threads=2, progress=False,
                       store=store)

    first = run()
    assert first["reference"]["misses"] == 3 and first["reference"]["hits"] == 0
    f16 = first["results"][0]
    assert f16["kl_mean"] < 1e-5 and f16["top1"] == 1.0
    again = run()
    assert again["reference"]["hits"] == 3 and again["reference"]["misses"] == 0
    assert again["reference"]["dir"] == first["reference"]["dir"]
    for a, b in zip(first["results"], again["results"]):
        assert a["kl_mean"] == b["kl_mean"] and a["ppl"] == b["ppl"]
    # another text or another context size is another reference
    assert run(text=TEXT + " more")["reference"]["misses"] == 3
    assert run(n_ctx=64)["reference"]["dir"] != first["reference"]["dir"]
    # and the in-memory reference gives the same figures
    mem = compare(str(model), cfgs, text=TEXT, n_ctx=128, n_chunks=3, n_threads=2, progress=False)
    assert mem["results"][1]["kl_mean"] == pytest.approx(first["results"][1]["kl_mean"], rel=1e-3)


def test_eval_cli_end_to_end(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYADAQ_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", "--model", str(tiny_model()), "--text", str(text), "--ctx", "128", "--chunks", "2",
               "--configs", "f16:f16,q8_0:kvq3,q4_0:kvq2", "--threads", "2",
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "q4_0:kvq2" in printed and "KL mean" in printed
    res = json.loads(out_json.read_text())
    assert res["settings"]["ctx"] == 128 and len(res["settings"]["model_sha256"]) == 64
    assert [(r["k"], r["v"]) for r in res["results"]] == [("f16", "f16"), ("q8_0", "kvq3"), ("q4_0", "kvq2")]
    assert res["results"][2]["bits_per_value"] == 3.5
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra,message", [
    (["--configs", "q8_0:kvq9"], "unknown KV-cache type 'kvq9'"),
    (["--configs", "q8_0"], "is not K:V"),
    (["--ctx", "8192"], "larger than the model's training context"),
    (["--text", "/nonexistent/file.txt"], "No such file"),
    (["--text", "/"], "Is a directory"),
    (["--text", "SHORT"], "fewer than one chunk"),
    (["--chunks", "0"], "--chunks must be at least 1"),
])
def test_eval_bad_input(tiny_model, tmp_path, capsys, extra, message):
    if "SHORT" in extra:
        short = tmp_path / "short.txt"
        short.write_text("Too short.")
        extra = ["--text", str(short)]
    rc = main(["eval", "--model", str(tiny_model()), "--ctx", "128", "--chunks", "1", "--no-cache", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err


def test_eval_missing_model(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "none.gguf")])
    assert rc == 2 and "none.gguf" in capsys.readouterr().err


def test_results_render_states_the_winner():
    from pyadaq.cli.results import MATRIX, render

    def row(k, v, kl):
        return {"k": k, "v": v, "kl_mean": kl, "ppl": 10 + kl, "top1": 1 - kl, "bits_per_value": 3.5}

    results = [row(k, v, 0.01 * (i + 1)) for i, (k, v) in enumerate((k, v) for k in MATRIX for v in MATRIX)]
    by = {(r["k"], r["v"]): r for r in results}
    by[("q4_0", "kvq2")]["kl_mean"], by[("kvq2", "q4_0")]["kl_mean"] = 0.1, 0.5
    settings = {"model": "m.gguf", "model_sha256": "0" * 64, "ctx": 512, "text": "t", "attn_rot": True,
                "machine": "x", "native": "n", "date": "d", "seconds_quality": 1.0}
    md = render({"settings": settings, "chunks": 2, "results": results, "passkey": None}, "r.json")
    assert "K=q4_0 with V=kvq2 against K=kvq2 with V=q4_0" in md
    assert "More bits for keys wins: 5.0 times less KL divergence." in md
    assert md.count("| **kvq2** |") == 4  # one row in each of the four grids
