"""What the measuring commands write and say: generated documents carry only the run's figures,
`results` / `formats` write under --out (default ./pyadaq-results, never docs/), long jobs are
announced unless cached, and Ctrl-C stops a command with one line, its cache intact."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pyadaq._atomic import atomic_write, atomic_write_text
from pyadaq.cli import main
from pyadaq.report.markdown import MATRIX

TEXT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog near the river." for i in range(300))


def _bits(t: str) -> float:
    return {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "kvq3": 3.5, "kvq2": 2.5}[t]


def _matrix_run(machine: str = "Test CPU 9000, 7 threads, Linux", seconds: float = 1234.0, scale: float = 1.0):
    """A synthetic `pyadaq eval --json` result of the K x V matrix."""
    results = []
    for i, k in enumerate(MATRIX):
        for j, v in enumerate(MATRIX):
            kl = 0.0 if k == v == "f16" else scale * (0.01 * (i + 1) ** 2 + 0.003 * (j + 1))
            results.append({"config": f"{k}:{v}", "k": k, "v": v, "kl_mean": kl, "kl_stderr": kl / 50,
                            "ppl": 10 + kl, "top1": 1 - kl / 2, "bits_per_value": (_bits(k) + _bits(v)) / 2})
    settings = {"model": "/models/m.gguf", "model_sha256": "ab" * 32, "text": "pydoc_data.topics",
                "text_sha256": "t" * 64, "ctx": 512, "chunks": 4, "attn_rot": True, "machine": machine,
                "native": "pyadaq test build", "date": "2030-01-02T03:04:05", "seconds_quality": seconds}
    return {"settings": settings, "chunks": 4, "results": results, "passkey": None}


def _adaptive_run(res: dict, scale: float = 1.0, analysis=(3, 256), cal_chunks: int = 2):
    """A synthetic `results --adaptive` record for `res`: a 2-layer calibration whose errors are
    0.002 per item in q8_0, more in the smaller types, and plans at one budget."""
    types = ["f16", "q8_0", "q4_0", "kvq3", "kvq2"]
    row = [0.0, 0.002 * scale, 0.02 * scale, 0.05 * scale, 0.2 * scale]
    cal = {"kind": "pyadaq-calibration", "types": types, "errors_k": [list(row), list(row)],
           "errors_v": [[x / 2 for x in row], [x / 2 for x in row]]}
    plan = {"budget": 4.5, "source": "kl", "label": "budget:4.5:kl", "types_k": ["q8_0", "q4_0"],
            "types_v": ["q4_0", "kvq3"], "bits_per_value": 4.5, "bytes_per_token": 100, "predicted": 0.1,
            "greedy_predicted": 0.1, "greedy_same": True,
            "result": {"kl_mean": 0.03 * scale, "kl_stderr": 0.001, "ppl": 11.0, "top1": 0.9}}
    return {
        "settings": {"model": "/models/m.gguf", "model_sha256": "ab" * 32, "ctx": 512, "chunks": 4,
                     "machine": res["settings"]["machine"], "seconds_analysis": 11.0, "seconds_calibration": 22.0,
                     "calibration_cached": False, "seconds_eval": 33.0,
                     "calibration": {"text_sha256": "t" * 64, "n_ctx": 512, "chunks": cal_chunks, "seconds": 77.0,
                                     "runs": 16},
                     "analysis": {"chunks": analysis[0], "n_ctx": analysis[1]}, "types": types},
        "verdict": {"text": "key norm > value norm in 2 of 2 layers"},
        "calibration": cal,
        "plans": [plan, {**plan, "source": "norms", "label": "budget:4.5:norms",
                         "result": {**plan["result"], "kl_mean": 0.05 * scale}}],
    }


# ------------------------------------------------------------------------------------------
# every figure in a generated document comes from the run
# ------------------------------------------------------------------------------------------


def test_results_text_states_the_runs_machine_and_time():
    from pyadaq.cli.results import render

    md = render(_matrix_run(), "r.json", "out")
    assert "Test CPU 9000, 7 threads, Linux" in md and "1234 s of wall time" in md
    assert "two cores" not in md and "other jobs" not in md
    assert "`pyadaq results --out out`" in md and "`pyadaq results --from-json r.json --out out`" in md
    other = render(_matrix_run(machine="Other CPU, 3 threads, Linux", seconds=55.0), "r.json", "out")
    assert "Other CPU, 3 threads, Linux" in other and "55 s of wall time" in other and "7 threads" not in other


def test_adaptive_text_figures_come_from_the_run():
    from pyadaq.cli.adaptive_results import render_adaptive
    from pyadaq.plan.calibrate import calibration_floor

    res = _matrix_run()
    ad = _adaptive_run(res)
    md = render_adaptive(ad, res, "out")
    # none of the figures measured once on Gemma 3 270M and written into the text by hand
    for fixed in ("0.007", "all 36", "−10 %", "+52 %", "−40 %", "a tenth", "reads 4 chunks of 512", "other jobs"):
        assert fixed not in md
    assert "3 chunks of 256 tokens" in md  # the analysis of this run
    assert f"{calibration_floor(ad['calibration']):.4f} nats" in md and "the 4 items" in md
    q8 = next(r for r in res["results"] if r["k"] == r["v"] == "q8_0")["kl_mean"]
    assert f"all 4 items in q8_0 (uniform q8_0/q8_0) cost {q8:.4f}" in md
    assert "so 50% of the evaluation text is in-sample" in md  # 2 of 4 chunks of 512 tokens
    # the prediction's error for q4_0/kvq2: floor + summed excesses against the measured KL
    floor = calibration_floor(ad["calibration"])
    excess_k, excess_v = 2 * (0.02 - floor), 2 * (0.1 - floor)
    measured = next(r for r in res["results"] if (r["k"], r["v"]) == ("q4_0", "kvq2"))["kl_mean"]
    row = next(line for line in md.splitlines() if line.startswith("| **q4_0** |"))
    assert row.split(" | ")[-1].rstrip(" |") == f"{(floor + excess_k + excess_v) / measured - 1:+.0%}"
    assert "`pyadaq results --adaptive --out out`" in md and "77 s" in md
    # other data, other text
    res2 = _matrix_run(scale=3.0)
    md2 = render_adaptive(_adaptive_run(res2, scale=2.0, analysis=(5, 128), cal_chunks=1), res2, "out")
    assert md2 != md and "5 chunks of 128 tokens" in md2 and "so 25% of the evaluation text" in md2
    assert f"{calibration_floor(_adaptive_run(res2, scale=2.0)['calibration']):.4f} nats" in md2


def test_adaptive_text_from_another_text_has_nothing_in_sample():
    from pyadaq.cli.adaptive_results import render_adaptive

    res = _matrix_run()
    ad = _adaptive_run(res)
    ad["settings"]["calibration"]["text_sha256"] = "other"
    assert "none of the evaluation text is in-sample" in render_adaptive(ad, res)


# ------------------------------------------------------------------------------------------
# output paths: --out, default ./pyadaq-results, never docs/
# ------------------------------------------------------------------------------------------


def test_results_writes_under_the_current_directory(tmp_path, monkeypatch, capsys):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_matrix_run()))
    work = tmp_path / "checkout"
    (work / "docs").mkdir(parents=True)
    (work / "docs" / "RESULTS.md").write_text("tracked")
    monkeypatch.chdir(work)
    assert main(["results", "--from-json", str(src)]) == 0
    out = work / "pyadaq-results"
    assert (out / "RESULTS.md").exists() and (out / "results-matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (work / "docs" / "RESULTS.md").read_text() == "tracked"
    assert sorted(p.name for p in (work / "docs").iterdir()) == ["RESULTS.md"]
    assert "wrote pyadaq-results/RESULTS.md" in capsys.readouterr().out
    # an explicit directory; the adaptive figures found there are rendered
    mine = tmp_path / "mine"
    mine.mkdir()
    res = _matrix_run()
    (mine / "results-adaptive.json").write_text(json.dumps(_adaptive_run(res)))
    assert main(["results", "--from-json", str(src), "--out", str(mine)]) == 0
    md = (mine / "RESULTS.md").read_text()
    assert f"`pyadaq results --out {mine}`" in md and "## Adaptive allocation" in md
    assert "![KL divergence against bits per value](results-matrix.png)" in md


def test_results_calibrated_section_is_measured_and_rendered(tiny_model, tmp_path, cache, capsys):
    """`results --from-json M --calibrated` measures the kvt matrix with the model's default
    calibration on M's text, context and chunks, writes its JSON, and RESULTS.md gets a section
    whose figures are that JSON's; rendering again from the saved JSON gives the same section."""
    from pyadaq.cli.calibrated_results import K_TYPES, V_TYPES, v_types
    from pyadaq.model.header import read_model_info

    path = tiny_model(arch="llama", head_dim=64, n_head_kv=2, dtype="f32")
    matrix = tmp_path / "m.json"
    flat = "q8_0:kvq2,q8_0:kvq3,kvq2:q8_0,q4_0:kvq2,q4_0:q4_0"
    assert main(["eval", "--model", str(path), "--ctx", "64", "--chunks", "2", "--threads", "1",
                 "--configs", flat, "--json", str(matrix)]) == 0
    out = tmp_path / "out"
    assert main(["results", "--from-json", str(matrix), "--calibrated", "--out", str(out)]) == 0
    cr = json.loads((out / "results-calibrated.json").read_text())
    assert v_types(read_model_info(path)) == V_TYPES  # heads of 64: no row-trellis columns
    assert [r["config"] for r in cr["results"]] == [f"{k}:{v}+cal" for k in K_TYPES for v in V_TYPES]
    assert cr["calibration"]["held_out"] and cr["chunks"] == 2 and cr["settings"]["ctx"] == 64
    assert len({r["calibration_fingerprint"] for r in cr["results"]}) == 1
    md = (out / "RESULTS.md").read_text()
    section = md[md.index("## Calibrated transform coding"):]
    by = {r["config"]: r for r in cr["results"]}
    kvt = by["kvt4s:kvt2+cal"]
    assert "| **kvt4s** |" in section and f"{kvt['kl_mean']:.4f}" in section
    assert (f"K=kvt4s with V=kvt2 against K=kvt2s with V=kvt4 (both 3.50 bits per value): KL "
            f"{kvt['kl_mean']:.4f}") in section
    q = json.loads(matrix.read_text())["results"]
    kvq2 = next(r for r in q if r["config"] == "q4_0:kvq2")
    assert f"kvt4s:kvt2 (calibrated) against q4_0:kvq2 (3.50 bits per value): KL {kvt['kl_mean']:.4f}" in section
    assert f"{kvq2['kl_mean']:.4f}" in section
    assert "kvt3s:kvt2 (calibrated)" not in section  # kvq3:kvq2 is not in this matrix run
    q8 = by["q8_0:kvt4+cal"]
    assert (f"K=q8_0 with V=kvt4 against K=kvt4s with V=q8_0 (both 6.50 bits per value): "
            f"KL {q8['kl_mean']:.4f}") in section
    capsys.readouterr()
    assert main(["results", "--from-json", str(matrix), "--out", str(out)]) == 0
    again = (out / "RESULTS.md").read_text()
    assert again[again.index("## Calibrated transform coding"):] == section


def test_formats_writes_under_out_and_announces(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["formats", "--model", str(tiny_model()), "--configs", "q8_0:kvq2", "--chunks", "1",
               "--ctx", "128"])
    assert rc == 0
    out = tmp_path / "pyadaq-results"
    assert sorted(p.name for p in out.iterdir()) == ["formats-table.md", "formats.json", "formats.png"]
    assert not (tmp_path / "docs").exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "pyadaq formats: KL divergence of 1 K/V pair on 1 chunk of 128 tokens" in err
    assert "2 forward passes of 128 tokens" in err and "timed just now" in err
    assert "pyadaq-results/formats.json" in err


def test_formats_measures_calibrated_kvt_types(tiny_model, tmp_path, cache, capsys):
    """`formats --configs K:V+cal` runs the kvt types with the model's default calibration; the
    table names each profile and says calibrated; a kvt type without +cal is refused before
    any native code (one line, exit 2)."""
    path = str(tiny_model(arch="llama", head_dim=64, n_head_kv=2, dtype="f32"))
    out = tmp_path / "f"
    assert main(["formats", "--model", path, "--configs", "q8_0:kvt2+cal,kvt4s:q8_0+cal,q8_0:kvq2", "--chunks", "1",
                 "--ctx", "64", "--out", str(out)]) == 0
    res = json.loads((out / "formats.json").read_text())
    assert [r["config"] for r in res["results"]] == ["q8_0:kvt2+cal", "kvt4s:q8_0+cal", "q8_0:kvq2"]
    assert res["results"][0]["calibrated"] and 0 < res["results"][0]["kl_mean"] < 5
    table = (out / "formats-table.md").read_text()
    assert "| q8_0 | kvt2 | 2.50 | bit profile 4,3,3,3,2,2,1,1, block 64, searched scale (calibrated) |" in table
    assert f"{res['results'][0]['kl_mean']:.4f}" in table
    assert "The model's default KV calibration stays cached" in " ".join(capsys.readouterr().err.split())
    assert main(["formats", "--model", path, "--configs", "q8_0:kvt2", "--chunks", "1", "--ctx", "64",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "calibration" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# long jobs are announced, unless their result is cached
# ------------------------------------------------------------------------------------------


def test_plan_announces_a_calibration_unless_cached(tiny_model, tmp_path, cache, capsys):
    args = ["plan", "--model", str(tiny_model()), "--budget", "4.5", "--ctx", "64", "--chunks", "1",
            "--threads", "1", "--out", str(tmp_path / "plan.json")]
    assert main(args) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "pyadaq plan: calibrating the sensitivities" in err
    # 2 layers x K/V x 4 lossy types, one chunk each, and the f16 reference of that chunk
    assert "16 runs on 1 chunk): 17 forward passes of 64 tokens" in err
    assert f"cached in {cache / 'adaptive'}" in err and "--sensitivity norms" in err
    assert main(args) == 0
    assert "calibrating" not in capsys.readouterr().err  # cached now: no notice
    assert main([*args[:-2], "--sensitivity", "norms", "--out", str(tmp_path / "p2.json")]) == 0
    assert "calibrating" not in capsys.readouterr().err  # the fast path needs none


def _pyadaq(env: dict, *args, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyadaq", *args], input=stdin, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_chat_with_a_budget_announces_its_calibration_once(tiny_model, tmp_path, child_env):
    env = child_env(PYADAQ_CACHE_DIR=str(tmp_path / "cache"))
    args = ["chat", "--model", str(tiny_model()), "--ctx", "512", "--kv-budget", "4.5", "--max-tokens", "3",
            "--temperature", "0"]
    first = _pyadaq(env, *args, stdin="hello\n")
    assert first.returncode == 0, first.stderr
    err = " ".join(first.stderr.split())
    assert "pyadaq chat: calibrating the sensitivities" in err
    assert "`pyadaq chat --kv-plan plan.json --kv-calibration" in err
    second = _pyadaq(env, *args, stdin="hello\n")
    assert second.returncode == 0, second.stderr
    assert "calibrating" not in second.stderr


def test_chat_with_a_window(tiny_model, child_env, tmp_path):
    """`pyadaq chat --kv-window N`: the stats line counts the window's memory."""
    env = child_env(PYADAQ_CACHE_DIR=str(tmp_path / "cache"))
    run = _pyadaq(env, "chat", "--model", str(tiny_model()), "--ctx", "256", "--cache-type-k", "q4_0",
                  "--cache-type-v", "kvq2", "--kv-window", "32", "--gpu-layers", "0", "--max-tokens", "3",
                  "--temperature", "0",
                  stdin="hello\n/stats\n")
    assert run.returncode == 0, run.stderr
    assert "the last 32 tokens also in f16" in " ".join((run.stdout + run.stderr).split())


# ------------------------------------------------------------------------------------------
# Ctrl-C: one line, exit status 130, the cache intact
# ------------------------------------------------------------------------------------------


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "entry.json"
    atomic_write_text(target, "old")

    def write(fh):
        fh.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["entry.json"]
    atomic_write(target, lambda fh: np.save(fh, np.arange(3)))
    assert list(np.load(target)) == [0, 1, 2]


def test_gguf_writers_leave_nothing_behind_when_interrupted(tmp_path, monkeypatch):
    """write_calibration and write_dequantized write through atomic_path: a failure half-way
    leaves the old file (or none) and no temporary file."""
    import gguf

    from pyadaq.model.calibration import Calibration, write_calibration

    target = tmp_path / "cal.gguf"
    target.write_bytes(b"old")

    def fail(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    cal = Calibration("0" * 64, "m", "llama", 0, (), (), (), (), "0" * 64, 0, 16, 1, "v", "b", "now", {}, {})
    with pytest.raises(KeyboardInterrupt):
        write_calibration(cal, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["cal.gguf"]


def test_ctrl_c_during_eval_stops_with_one_line(tiny_model, tmp_path, child_env):
    cache = tmp_path / "cache"
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyadaq", "eval", "--model", str(tiny_model()), "--text", str(text), "--ctx", "64",
         "--chunks", "100000", "--threads", "1", "--configs", ",".join(f"q8_0:{v}" for v in MATRIX * 4)],
        env=child_env(PYADAQ_CACHE_DIR=str(cache)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a child started from a shell without job control may inherit SIGINT ignored: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not list(cache.glob("eval-ref/*/chunk0003-top1.npy")):  # the reference is being written
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "chunks x configs" not in ln]
    assert lines == ["pyadaq eval: interrupted; what was already cached is kept"]
    # every stored chunk is whole, no temporary file is left behind
    (ref,) = (cache / "eval-ref").iterdir()
    names = sorted(p.name for p in ref.iterdir())
    assert "meta.json" in names and not [n for n in names if n.endswith(".tmp")]
    json.loads((ref / "meta.json").read_text())
    for p in ref.glob("*.npy"):
        assert np.load(p).shape[0] > 0
    n_lp, n_top1 = len(list(ref.glob("chunk*-lp.npy"))), len(list(ref.glob("chunk*-top1.npy")))
    assert n_top1 >= 4 and n_lp - n_top1 in (0, 1)  # a chunk's top-1 file is written after its log-probs


def test_interrupt_in_any_command_is_one_line(monkeypatch, capsys):
    import pyadaq.cli.formats as formats

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(formats, "run", interrupted)
    assert main(["formats"]) == 130
    assert capsys.readouterr().err == "pyadaq formats: interrupted; what was already cached is kept\n"

