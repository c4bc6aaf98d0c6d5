"""llama.cpp's own tools, installed with the package (pyadaq/bin) and run as `pyadaq tool NAME`:
they load pyadaq's libraries (no second libllama/libggml) and accept pyadaq's cache types."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pyadaq
from pyadaq._native import lib_dir
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


# ------------------------------------------------------------------------------------------
# per-layer plans: --kv-plan in the common argument parser, PYADAQ_KV_PLAN for every program
# ------------------------------------------------------------------------------------------


def _plan(model, types_k, types_v, path):
    from pyadaq.model.header import file_sha256, read_model_info
    from pyadaq.runtime.kvplan import make_plan

    make_plan(read_model_info(model), file_sha256(model), types_k, types_v).save(path)
    return path


def _perplexity(model, tmp_path, *args, env=None):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    # -v: the tools show libllama's own log (the per-layer types, the reasons) only with it
    return _run(tool_command("llama-perplexity", ["-m", str(model), "-f", str(text), "-c", "64", "--chunks", "2",
                                                  "-b", "64", "-t", "2", "-fa", "on", "-v", *args]),
                env=tool_env(env), timeout=300)


def test_plan_file_sets_the_types_of_every_layer(tiny_model, tmp_path):
    model = tiny_model(head_dim=64, n_layer=4)
    plan = _plan(model, ["q8_0", "kvq3", "q4_0", "f16"], ["kvq2", "q8_0", "kvq3", "kvq2"], tmp_path / "plan.json")
    want = "per-layer K/V cache types: q8_0/kvq2 kvq3/q8_0 q4_0/kvq3 f16/kvq2"
    r = _perplexity(model, tmp_path, "--kv-plan", str(plan))
    assert r.returncode == 0, r.stderr[-3000:]
    assert want in r.stderr and "Final estimate: PPL" in r.stdout + r.stderr
    # the same through the environment, for programs without the option (llama-bench, others)
    r = _perplexity(model, tmp_path, env=dict(os.environ, PYADAQ_KV_PLAN=str(plan)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert want in r.stderr
    # and pyadaq's Python ignores the variable (plans there are kv_plan=)
    code = ("import pyadaq, sys; llm = pyadaq.Llama(sys.argv[1], n_ctx=64, cache_type_k='q8_0', cache_type_v='q8_0',"
            " verbose=False); print([t.name for t in sum(llm.context_layer_types(), [])])")
    r = _run([sys.executable, "-c", code, str(model)], env=dict(os.environ, PYADAQ_KV_PLAN=str(plan)), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kvq" not in r.stdout and "q8_0" in r.stdout


def test_bad_plans_are_errors_not_aborts(tiny_model, tmp_path):
    model = tiny_model(head_dim=64, n_layer=4)
    other = _plan(tiny_model(head_dim=64, n_layer=2), ["q8_0"] * 2, ["kvq2"] * 2, tmp_path / "other.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": 1, "types_k": [')
    kvt = tmp_path / "kvt.json"
    d = json.loads(_plan(model, ["q8_0"] * 4, ["kvq2"] * 4, tmp_path / "ok.json").read_text())
    d["types_v"][1] = "kvt2"
    kvt.write_text(json.dumps(d))
    cases = [
        (["--kv-plan", str(other)], None, "was made for a model with 2 layers"),
        (["--kv-plan", str(corrupt)], None, "is not a plan file: it is not valid JSON"),
        (["--kv-plan", str(tmp_path / "missing.json")], None, "plan file not found"),
        (["--kv-plan", str(kvt)], None, "layer 1 of 'types_v': 'kvt2' is one of pyadaq's calibrated types"),
        ([], str(other), "was made for a model with 2 layers"),
        ([], str(corrupt), "PYADAQ_KV_PLAN: "),
    ]
    for args, env_plan, message in cases:
        env = dict(os.environ, PYADAQ_KV_PLAN=env_plan) if env_plan else None
        r = _perplexity(model, tmp_path, *args, env=env)
        assert r.returncode > 0, (args, env_plan, r.returncode, r.stderr[-2000:])
        assert message in " ".join(r.stderr.split()), (args, env_plan, r.stderr[-2000:])


# the log thread of llama.cpp's common library: what a tool logs just before it exits is written
# out (patch 0014), and exiting never waits forever on it
_FULL_LOG_QUEUE = """
import ctypes, os, sys
lib = ctypes.CDLL(os.path.join(sys.argv[1], "libllama-common.so"))
lib._Z15common_log_mainv.restype = ctypes.c_void_p
add = lib._Z14common_log_addP10common_log14ggml_log_levelPKcz
# the log's writer thread is created by the first common_log_main() and inherits this thread's
# policy: on one CPU at SCHED_IDLE it stays off the CPU while this thread logs, so the entries
# pile up to a full queue (capacity 512) before the process exits
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
log = ctypes.c_void_p(lib._Z15common_log_mainv())
os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
for i in range(511):
    add(log, 4, b"entry %d\\n", ctypes.c_int(i))  # GGML_LOG_LEVEL_ERROR: to stderr
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux scheduling policies")
def test_a_full_log_queue_is_written_out_at_exit():
    # upstream's pause() at exit turned a full queue into an empty-looking one and joined a thread
    # that never ended (CI hung in llama-perplexity); each run here hung that way more often than not
    for _ in range(4):
        r = _run([sys.executable, "-c", _FULL_LOG_QUEUE, str(lib_dir())],
                 timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stderr.splitlines() == [f"entry {i}" for i in range(511)]
