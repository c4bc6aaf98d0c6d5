"""Contexts created from several threads at once: each gets its own K/V types (per-layer types
belong to the call that creates the context), and the process survives.

Run in a child process: on the landed tree before the fix, a uniform pyadaq.Llama built in
one thread while another built one with a plan ended the whole process silently (exit status
0, no output), and per-layer types set for one context could be taken by another thread's.
"""

from __future__ import annotations

import subprocess
import sys

_CHILD = r"""
import sys, threading
import pyadaq
from pyadaq.model.header import read_model_info
from pyadaq.runtime.layer_types import context_layer_types
from pyadaq.runtime.context import Context, Model, quiet_native_logs
from pyadaq.plan.planner import make_plan

quiet_native_logs()
path = sys.argv[1]
info = read_model_info(path)
L = info.n_layer
CONFIGS = [
    ("plan", ["q8_0", "kvq2", "f16", "kvq3"], ["kvq3", "f16", "kvq2", "q4_0"]),
    ("uniform", ["q4_0"] * L, ["kvq2"] * L),
    ("plan", ["kvq3", "kvq3", "q8_0", "q8_0"], ["f16", "kvq2", "kvq2", "f16"]),
    ("uniform", ["f16"] * L, ["f16"] * L),
    ("plan", ["kvq2"] * 2 + ["f16"] * 2, ["q8_0"] * 2 + ["kvq3"] * 2),
    ("uniform", ["q8_0"] * L, ["q8_0"] * L),
]
results, errors = {}, []
start = threading.Barrier(2 * len(CONFIGS))
shared = Model(path)


def names(ts):
    return [t.name for t in ts]


def with_llama(i, kind, tk, tv):
    try:
        start.wait()
        if kind == "plan":
            llm = pyadaq.Llama(path, kv_plan=make_plan(info, "", tk, tv), n_ctx=256)
        else:
            llm = pyadaq.Llama(path, cache_type_k=tk[0], cache_type_v=tv[0], n_ctx=256)
        k, v = llm.context_layer_types()
        results["llama", i] = (names(k), names(v))
        out = llm.create_completion("a b c", max_tokens=3, temperature=0)
        assert out["choices"][0]["text"] is not None
        llm.close()
    except BaseException as e:  # reported by the main thread
        errors.append(f"Llama {i}: {e!r}")


def with_context(i, kind, tk, tv):
    try:
        start.wait()
        lt = (tk, tv) if kind == "plan" else None
        ctx = Context(shared, tk[0], tv[0], 256, n_threads=1, layer_types=lt)
        k, v = context_layer_types(ctx.ptr, L)
        results["context", i] = (names(k), names(v))
        ctx.logits(shared.tokenize("one two three four"), 0)
        ctx.close()
    except BaseException as e:
        errors.append(f"Context {i}: {e!r}")


threads = [threading.Thread(target=f, args=(i, *c)) for i, c in enumerate(CONFIGS) for f in (with_llama, with_context)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for i, (kind, tk, tv) in enumerate(CONFIGS):
    for what in ("llama", "context"):
        got = results.get((what, i))
        if got != (tk, tv):
            errors.append(f"{what} {i} ({kind}): got {got}, asked for {(tk, tv)}")
print("\n".join(errors) if errors else "THREADS-OK", flush=True)
"""


def test_contexts_from_several_threads(tiny_model, child_env):
    path = tiny_model(head_dim=64, n_layer=4)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "THREADS-OK", (proc.returncode, proc.stdout, proc.stderr)
