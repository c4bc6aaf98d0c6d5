"""llama.cpp's own tools, installed with the package (pyadaq/bin) and run as `pyadaq tool NAME`:
they load pyadaq's libraries (no second libllama/libggml) and accept pyadaq's cache types."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pyadaq
from pyadaq.tools import TOOLS, bin_dir, tool_command, tool_env, tool_path

PYADAQ = [sys.executable, "-m", "pyadaq"]


def _run(args, timeout=300, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def test_every_tool_is_installed_and_linked_to_pyadaqs_libraries():
    lib = (os.path.dirname(pyadaq.__file__)) + "/lib/"
    for name in TOOLS:
        path = tool_path(name)
        assert path.parent == bin_dir()
        out = _run(["ldd", str(path)], env=tool_env(), timeout=60).stdout
        deps = {line.split()[0]: line.split("=>")[1].split()[0] for line in out.splitlines() if "=>" in line}
        for so in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
            if name == "rpc-server" and so == "libllama.so":
                continue  # rpc-server is ggml only
            assert deps.get(so, "").startswith(lib), f"{name}: {so} -> {deps.get(so)} (ldd: {out})"
        assert not any(d == "not found" for d in deps.values()), out
    # the tools carry no copy of the libraries
    assert not list(bin_dir().glob("lib*.so*"))


def test_tool_lists_and_rejects_unknown_names():
    r = _run([*PYADAQ, "tool"], timeout=120)
    assert r.returncode == 0, r.stderr
    for name in TOOLS:
        assert name in r.stdout
    r = _run([*PYADAQ, "tool", "llama-quantize"], timeout=120)
    assert r.returncode == 2
    assert "unknown tool 'llama-quantize'" in r.stderr and "llama-bench" in r.stderr


def test_embedded_model_is_the_default(monkeypatch, tmp_path):
    # no -m: the embedded model is put first; -m, --model=, -hf or --help leave the arguments alone
    import pyadaq.model.embedded as embedded

    monkeypatch.setattr(embedded, "embedded_model_path", lambda: tmp_path / "m.gguf")
    assert tool_command("llama-bench", ["-p", "8"])[1:] == ["-m", str(tmp_path / "m.gguf"), "-p", "8"]
    for args in (["-m", "x.gguf"], ["--model=x.gguf"], ["-hf", "a/b"], ["--help"]):
        assert tool_command("llama-bench", args)[1:] == args
    assert tool_command("rpc-server", ["-p", "50052"])[1:] == ["-p", "50052"]


def test_llama_bench_runs_with_kvq2_values(tiny_model):
    model = tiny_model(head_dim=64)
    r = _run([*PYADAQ, "tool", "llama-bench", "-m", str(model), "-ctk", "q8_0", "-ctv", "kvq2", "-fa", "1",
              "-p", "32", "-n", "4", "-r", "1", "-t", "2", "-o", "json"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert {(row["type_k"], row["type_v"]) for row in rows} == {("q8_0", "kvq2")}
    assert {row["n_prompt"] for row in rows} == {0, 32} and all(row["avg_ts"] > 0 for row in rows)


@pytest.mark.parametrize("tool", ["llama-bench", "llama-cli"])
def test_calibrated_types_are_refused_with_the_reason(tiny_model, tool):
    model = tiny_model(head_dim=64)
    args = ["-p", "8", "-n", "1"] if tool == "llama-bench" else ["-p", "hi", "-n", "1", "-no-cnv"]
    r = _run([*PYADAQ, "tool", tool, "-m", str(model), "-ctv", "kvt2", "-fa", "1", *args], timeout=120,
             stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "kvt2" in r.stderr and "calibration" in r.stderr, r.stderr[-2000:]
    assert r.returncode != -6, "aborted"


def test_cache_type_help_lists_pyadaqs_types():
    r = _run(tool_command("llama-cli", ["--help"]), env=tool_env(), timeout=60)
    text = " ".join((r.stdout + r.stderr).split())  # the help wraps its lines
    assert "allowed values: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1, kvq2, kvq3" in text
