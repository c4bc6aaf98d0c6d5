"""ggml's RPC backend: the embedded model's layers and KV cache on two `pyadaq tool rpc-server`
processes on 127.0.0.1, started and stopped here. Generation runs in a child process (ggml's RPC
client ends its process when a server goes away) that prints JSON and llama.cpp's log."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

import pyadaq
from pyadaq.runtime import rpc

PAIRS = [("q8_0", "kvq2"), ("q8_0", "q4_0"), ("q5_0", "q4_1"), ("kvq3", "kvq3")]

# one pair per line of argv[3:]: "K V"; for each, greedy tokens through the servers (argv[2]),
# then the same locally in the same process, which must not touch the servers; the logits of
# every step are compared
CHILD = r"""
import json, sys
import numpy as np
import llama_cpp
import pyadaq

model, servers, n = sys.argv[1], sys.argv[2], 24
out = []
for pair in sys.argv[3:]:
    k, v = pair.split()
    run = {}
    for where in ("rpc", "local"):
        print(f"=== {k}/{v} {where}", file=sys.stderr, flush=True)
        llm = pyadaq.Llama(model, cache_type_k=k, cache_type_v=v, n_ctx=256, n_threads=1, verbose=True,
                           rpc_servers=servers if where == "rpc" else None)
        llm.eval(llm.tokenize(b"The three primary colours are"))
        toks, logits = [], []
        for _ in range(n):
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            logits.append(row.astype(np.float64).tolist())
            toks.append(int(np.argmax(row)))
            llm.eval([toks[-1]])
        run[where] = {"tokens": toks, "logits": logits, "rpc_servers": llm.rpc_servers}
        llm.close()
    out.append({"k": k, "v": v, **run})
print(json.dumps(out))
"""

# generates until killed; one line per token on stdout
LONG = r"""
import sys
import pyadaq

llm = pyadaq.Llama(sys.argv[1], cache_type_k="q8_0", cache_type_v="kvq2", n_ctx=4096, n_threads=1,
                   rpc_servers=sys.argv[2])
for i, _ in enumerate(llm.generate(llm.tokenize(b"Once upon a time"), temp=0.0)):
    print("token", i, flush=True)
    if i > 4000:
        break
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_servers(env, n: int = 2, logs=None):
    procs, endpoints = [], []
    for i in range(n):
        port = _free_port()
        out = open(logs[i], "w") if logs else subprocess.DEVNULL  # noqa: SIM115  (the child holds it)
        procs.append(subprocess.Popen([sys.executable, "-m", "pyadaq", "tool", "rpc-server", "--host", "127.0.0.1",
                                       "--port", str(port), "-t", "1"], env=env, stdout=out,
                                      stderr=subprocess.DEVNULL))
        if logs:
            out.close()  # the child has its own descriptor
        endpoints.append(f"127.0.0.1:{port}")
    deadline = time.time() + 60
    for proc, ep in zip(procs, endpoints):
        while True:
            assert proc.poll() is None, f"rpc-server for {ep} exited with {proc.returncode}"
            try:
                rpc.check_server(ep, timeout=5)
                break
            except rpc.RPCServerError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
    return procs, endpoints


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="module")
def servers(child_env):
    procs, endpoints = _start_servers(child_env())
    yield endpoints
    _stop(procs)


# --- bad input: a Python exception before any native code could abort -----------------------
@pytest.mark.parametrize("spec", ["", "localhost", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000", ":50052"])
def test_bad_endpoints_are_value_errors(spec):
    with pytest.raises(ValueError, match=r"host:port|no RPC server"):
        rpc.parse_servers(spec)


def test_nothing_listening_is_an_error_before_loading(tiny_model):
    port = _free_port()
    with pytest.raises(rpc.RPCServerError, match=rf"127\.0\.0\.1:{port} cannot be reached.*rpc-server"):
        pyadaq.Llama(tiny_model(), rpc_servers=f"127.0.0.1:{port}", n_ctx=256)


def test_a_server_that_is_not_rpc_is_an_error(tiny_model):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def answer_http():
        conn, _ = listener.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer_http, daemon=True)
    t.start()
    try:
        with pytest.raises(rpc.RPCServerError, match="not a ggml RPC server"):
            pyadaq.Llama(tiny_model(), rpc_servers=f"127.0.0.1:{port}", n_ctx=256)
    finally:
        t.join(5)
        listener.close()


def test_a_silent_server_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts (the kernel does), never answers
    try:
        with pytest.raises(rpc.RPCServerError, match="did not answer within"):
            rpc.check_server(f"127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
    finally:
        listener.close()


def test_the_handshake_reads_the_protocol_version(servers):
    assert rpc.check_server(servers[0])[:2] == (rpc.RPC_PROTO_MAJOR, rpc.RPC_PROTO_MINOR)


# --- the model on two servers ------------------------------------------------------------------
def test_generation_through_two_servers_equals_the_local_run(servers, tiny_model, child_env, tmp_path):
    # a model whose weights llama.cpp's CPU backend does not repack: the servers store weights as
    # they are, the local CPU repacks Q4_0/Q4_K/IQ4_NL weights for other kernels (with the
    # embedded Q4_K_M model the logits then differ by up to ~1, see docs/RPC.md)
    model = tiny_model(n_layer=8)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    r = subprocess.run([sys.executable, str(script), str(model), ",".join(servers),
                        *(f"{k} {v}" for k, v in PAIRS)], env=child_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(r.stdout.splitlines()[-1])
    log = r.stderr.split("=== ")
    assert [(run["k"], run["v"]) for run in runs] == PAIRS
    for run in runs:
        k, v = run["k"], run["v"]
        # the same CPU kernels on both sides of the wire: the same tokens, the same logits
        assert run["rpc"]["tokens"] == run["local"]["tokens"], (k, v)
        assert run["rpc"]["logits"] == run["local"]["logits"], (k, v)
        assert run["rpc"]["rpc_servers"] == servers and run["local"]["rpc_servers"] == []
        remote = next(s for s in log if s.startswith(f"{k}/{v} rpc")).splitlines()
        local = next(s for s in log if s.startswith(f"{k}/{v} local"))
        # the weights and the KV cache of the layers on both servers, no KV cache locally
        for ep in servers:
            assert any("model buffer size" in line and ep in line for line in remote), "\n".join(remote[-60:])
            assert any("KV buffer size" in line and ep in line for line in remote), "\n".join(remote[-60:])
        assert not any("KV buffer size" in line and "CPU" in line for line in remote)
        # and the local model after it: none of the servers
        assert "RPC" not in local and "CPU KV buffer size" in local


def test_a_server_killed_mid_generation_ends_the_client_with_an_error(embedded_model, child_env, tmp_path):
    procs, endpoints = _start_servers(child_env())
    script = tmp_path / "long.py"
    script.write_text(LONG)
    child = subprocess.Popen([sys.executable, str(script), str(embedded_model), ",".join(endpoints)],
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.startswith("token 3"):
                break
        else:
            pytest.fail(f"the child never generated: {child.stderr.read()[-3000:]}")
        procs[1].kill()
        t0 = time.monotonic()
        _, err = child.communicate(timeout=120)
        took = time.monotonic() - t0
        assert child.returncode != 0, "the client went on without its server"
        assert "Remote RPC server crashed" in err, err[-3000:]
        assert took < 60, f"the client needed {took:.0f} s to notice"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        _stop(procs)


# --- pyadaq serve --rpc ------------------------------------------------------------------------
def test_serve_puts_the_layers_on_the_servers(tiny_model, child_env, tmp_path):
    from test_serve import _request, _start
    from test_serve import _stop as _stop_serve

    logs = [tmp_path / "rpc-0.log", tmp_path / "rpc-1.log"]
    procs, servers = _start_servers(child_env(), logs=logs)
    log = tmp_path / "serve.log"
    try:
        base, _, proc, out = _start(child_env(), "--model", str(tiny_model(n_layer=8)), "--ctx", "512",
                                    "--parallel", "2", "--threads", "1", "--rpc", ",".join(servers), log=log)
        try:
            status, text = _request(base + "/v1/completions", {"prompt": "hello", "max_tokens": 6,
                                                               "temperature": 0, "ignore_eos": True})
            assert status == 200, text
            assert json.loads(text)["usage"]["completion_tokens"] == 6
            assert "layers on 2 RPC server(s)" in log.read_text()
            # llama-server holds a connection to each server while it serves (the handshakes before,
            # pyadaq's and ggml's own short ones at load, came and went)
            for f in logs:
                lines = f.read_text().splitlines()
                assert lines[-1] == "Accepted client connection", lines
        finally:
            _stop_serve(proc, out)
    finally:
        _stop(procs)


def test_serve_with_a_server_that_is_not_there_says_so(tiny_model, child_env):
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "pyadaq", "serve", "--model", str(tiny_model()), "--port",
                        str(_free_port()), "--rpc", f"127.0.0.1:{port}"], env=child_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and f"127.0.0.1:{port} cannot be reached" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
