"""The daily tools on tiny generated models: `pyadaq chat` through a pipe, `pyadaq serve` over
real HTTP on localhost, `pyadaq bench`, and their bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import pyadaq
from pyadaq.cli import main

ROOT = Path(__file__).resolve().parent.parent



def _pyadaq(env: dict, *args, stdin: str = "", timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyadaq", *args], input=stdin, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------
# chat
# ------------------------------------------------------------------------------------------


def test_chat_through_a_pipe(tiny_model, child_env):
    model = str(tiny_model())
    proc = _pyadaq(child_env(), "chat", "--model", model, "--ctx", "512", "--threads", "1", "--max-tokens", "6",
                   "--temperature", "0", stdin="hello there\n/stats\nand again\n/reset\nonce more\n")
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.splitlines()
    assert len(answers) == 3  # one line per prompt, nothing else on standard output
    assert "Traceback" not in proc.stderr
    # /stats goes to standard error in pipe mode: types, size against f16, speed of the last answer
    assert "K q8_0, V kvq2" in proc.stderr and "MiB against" in proc.stderr and "t/s" in proc.stderr
    assert "(conversation cleared)" in proc.stderr


def test_chat_keeps_the_conversation_in_the_cache(tiny_model):
    """The second turn evaluates only its new tokens: the first turn's are reused."""
    import io

    from pyadaq.cli.chat_cmd import Chat

    llm = pyadaq.Llama(str(tiny_model()), cache_type_k="q8_0", cache_type_v="kvq2", n_ctx=512, n_threads=1,
                       swa_full=False)
    try:
        chat = Chat(llm, max_tokens=5, temperature=0.0)
        chat.turn("hello there", io.StringIO())
        first = chat.last["prompt_tokens"]
        in_cache = llm.n_tokens
        out = io.StringIO()
        chat.turn("and again", out)
        assert chat.last["prompt_tokens"] < llm.n_tokens - in_cache + 5
        assert chat.last["prompt_tokens"] < first + in_cache
        assert len(chat.messages) == 2 and out.getvalue().endswith("\n")
        chat.reset()
        assert chat.messages == []
    finally:
        llm.close()


@pytest.mark.parametrize("args, message", [
    (["--cache-type-v", "kvq9"], "unknown KV-cache type 'kvq9'"),
    (["--ctx", "999999"], "larger than the model's training context"),
    (["--kv-budget", "1.0"], "outside what the types"),
])
def test_chat_bad_input(tiny_model, capsys, args, message):
    rc = main(["chat", "--model", str(tiny_model()), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_chat_missing_model(tmp_path, capsys):
    rc = main(["chat", "--model", str(tmp_path / "none.gguf")])
    assert rc == 2 and "none.gguf" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# serve
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(tiny_model, child_env, tmp_path_factory):
    pytest.importorskip("uvicorn", reason="the server extra (pip install 'pyadaq[server]') is not installed")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115  (closed at teardown; a pipe nobody reads would fill up)
    proc = subprocess.Popen([sys.executable, "-m", "pyadaq", "serve", "--engine", "python", "--model",
                             str(tiny_model()), "--port", str(port), "--ctx", "512", "--threads", "1"],
                            env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            log.close()
            raise AssertionError(f"pyadaq serve exited: {log_path.read_text()}")
        try:
            if _request(base + "/v1/models")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError("pyadaq serve did not answer within 60 s")
    yield base, port, proc
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def test_serve_models(server, tiny_model):
    base, _, _ = server
    status, text = _request(base + "/v1/models")
    assert status == 200
    assert json.loads(text)["data"][0]["id"] == Path(tiny_model()).name


def test_serve_chat_completion(server, tiny_model):
    base, _, _ = server
    status, text = _request(base + "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0})
    assert status == 200, text
    res = json.loads(text)
    assert res["object"] == "chat.completion" and res["model"] == Path(tiny_model()).name  # not its path
    assert res["usage"]["completion_tokens"] == 4 and res["choices"][0]["message"]["role"] == "assistant"


def test_serve_streamed_completion(server):
    base, _, _ = server
    status, text = _request(base + "/v1/completions", {"prompt": "hello", "max_tokens": 4, "stream": True})
    assert status == 200, text
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 4 and all(c["object"] == "text_completion" for c in chunks)


@pytest.mark.parametrize("raw, code, message", [
    (b'{"messages": 5}', 422, "messages: Input should be a valid list"),
    (b"this is not json", 400, "request body is not JSON"),
    (b"", 400, "request body is empty"),
    (b'{"messages": [{"role": "nobody", "content": 1}]}', 422, "messages.0"),
])
def test_serve_malformed_requests_are_4xx_and_it_stays_up(server, raw, code, message):
    base, _, proc = server
    status, text = _request(base + "/v1/chat/completions", raw=raw)
    assert status == code
    error = json.loads(text)["error"]["message"]
    assert message in error and ".py" not in error and "/" not in error  # no server file paths
    assert proc.poll() is None
    assert _request(base + "/v1/models")[0] == 200


def test_serve_port_in_use(server, tiny_model, capsys):
    _, port, _ = server
    rc = main(["serve", "--model", str(tiny_model()), "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and "in use" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------


def test_bench_on_a_tiny_model(tiny_model, tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--model", str(tiny_model()), "--configs", "q8_0:kvq2,q4_0:kvq3", "--depths", "0,256",
               "--n-prompt", "32", "--n-gen", "4", "--reps", "2", "--threads", "1", "--json", str(out_json),
               "--plot", str(out_png), "--markdown", str(tmp_path / "B.md")])
    assert rc == 0
    assert "tg/f16" in capsys.readouterr().out
    md = (tmp_path / "B.md").read_text()
    assert "| q4_0:kvq3 | 256 |" in md and "Goals" not in md  # the library reports; scripts/ judges
    res = json.loads(out_json.read_text())
    rows = {(r["config"], r["depth"]): r for r in res["results"]}
    assert set(rows) == {(c, d) for c in ("f16:f16", "q8_0:kvq2", "q4_0:kvq3") for d in (0, 256)}
    for r in rows.values():
        assert len(r["pp_tps"]) == 2 and len(r["tg_tps"]) == 2 and r["pp_mean"] > 0 and r["tg_mean"] > 0
    assert rows[("f16:f16", 0)]["tg_vs_f16"] == 1.0
    # the KV bytes are those of each config: 2 bits + 8 bits per value is well under f16's
    assert rows[("q8_0:kvq2", 256)]["kv_bytes"] < 0.4 * rows[("f16:f16", 256)]["kv_bytes"]
    assert res["settings"]["backend"] in ("CPU", "GPU") and res["settings"]["machine"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    # bytes a generated token reads: the weights once, plus the KV cache in use
    for (_cfg, _depth), r in rows.items():
        assert r["tg_bytes_per_token"] >= res["weight_bytes"] > 0
        assert r["tg_gbps"] == pytest.approx(r["tg_mean"] * r["tg_bytes_per_token"] / 1e9)
    assert (rows[("f16:f16", 256)]["tg_bytes_per_token"] - res["weight_bytes"]
            > rows[("q8_0:kvq2", 256)]["tg_bytes_per_token"] - res["weight_bytes"] > 0)
    # peak memory growth over each context's life: at least its KV cache
    for r in rows.values():
        assert r["peak_rss_growth_bytes"] >= r["kv_bytes"] > 0
    # the report again from the saved run: the same document, with the command that measured it
    assert main(["bench", "--from-json", str(out_json), "--markdown", str(tmp_path / "B2.md")]) == 0
    assert (tmp_path / "B2.md").read_text() == md
    # the goals script reads the same JSON
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_speed_goals.py"), str(out_json)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, 1) and "K=q8_0, V=kvq2 generation vs f16/f16 at depth 256" in proc.stdout


def test_bench_interleaved_script(tiny_model, tmp_path, child_env):
    """scripts/bench_interleaved.py: the configs take turns in one process; per config its speed
    over the first config's, round by round; the pairs asked for; the same tables again from the
    saved JSON; a clear message for a pair outside the run's configs."""
    script = str(ROOT / "scripts" / "bench_interleaved.py")
    out = tmp_path / "i.json"

    def run(*args):
        return subprocess.run([sys.executable, script, *args], env=child_env(), capture_output=True, text=True,
                              timeout=300)

    proc = run("--model", str(tiny_model()), "--configs", "f16:f16,q8_0:kvq2,q4_0:q4_0", "--depth", "64",
               "--rounds", "3", "--n-prompt", "16", "--batch", "16", "--n-gen", "2", "--threads", "1",
               "--pairs", "q8_0:kvq2/q4_0:q4_0", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    rows = {r["config"]: r for r in res["results"]}
    assert list(rows) == ["f16:f16", "q8_0:kvq2", "q4_0:q4_0"] and res["first"] == "f16:f16"
    for r in rows.values():
        assert len(r["pp_tps"]) == len(r["tg_tps"]) == 3 and min(r["pp_tps"] + r["tg_tps"]) > 0
    assert rows["f16:f16"]["pp_vs_first"] == rows["f16:f16"]["tg_vs_first"] == 1.0
    q8, q4 = rows["q8_0:kvq2"], rows["q4_0:q4_0"]
    assert q8["tg_vs_first"] == pytest.approx(sum(a / b for a, b in zip(q8["tg_tps"], rows["f16:f16"]["tg_tps"])) / 3)
    # "A  B  pp ± se  tg ± se"
    pair = [line for line in proc.stdout.splitlines() if line.split()[:2] == ["q8_0:kvq2", "q4_0:q4_0"]]
    assert len(pair) == 1
    assert float(pair[0].split()[5]) == pytest.approx(sum(a / b for a, b in zip(q8["tg_tps"], q4["tg_tps"])) / 3,
                                                      abs=1e-3)
    again = run("--from-json", str(out), "--pairs", "q8_0:kvq2/q4_0:q4_0")
    assert again.returncode == 0 and pair[0] in again.stdout.splitlines()
    bad = run("--from-json", str(out), "--pairs", "q8_0:kvq2/kvq2:kvq2")
    assert bad.returncode != 0 and "kvq2:kvq2 is not among the run's configs" in bad.stderr


def test_bench_swa_window_only(tiny_model, tmp_path, capsys):
    # an iSWA model: with --no-swa-full its sliding-window layers cache their window only (as in
    # llama-bench and llama-server), so at depth 1024 the cache is smaller than with the default
    model = tiny_model(arch="gemma3", n_layer=4, sliding_window=64)
    sizes = {}
    for flag in ([], ["--no-swa-full"]):
        out_json = tmp_path / f"b{len(flag)}.json"
        assert main(["bench", "--model", str(model), "--configs", "q8_0:kvq2", "--depths", "1024", "--n-prompt", "16",
                     "--batch", "16", "--n-gen", "2", "--reps", "1", "--threads", "1", "--json", str(out_json),
                     "--markdown", str(tmp_path / f"B{len(flag)}.md"), *flag]) == 0
        res = json.loads(out_json.read_text())
        assert res["swa_full"] is not bool(flag)
        sizes[bool(flag)] = {r["config"]: r["kv_bytes"] for r in res["results"]}
    for cfg in ("f16:f16", "q8_0:kvq2"):
        assert sizes[True][cfg] < 0.7 * sizes[False][cfg], sizes
    assert "only their window (--no-swa-full)" in (tmp_path / "B1.md").read_text()
    assert "only their window" not in (tmp_path / "B0.md").read_text()


def test_bench_one_repetition_has_no_spread(tiny_model, tmp_path, capsys):
    rc = main(["bench", "--model", str(tiny_model()), "--configs", "q8_0:kvq2", "--depths", "0",
               "--n-prompt", "16", "--n-gen", "2", "--reps", "1", "--threads", "1",
               "--markdown", str(tmp_path / "B.md")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "± 0.0" not in out and "1 repetition" in out
    md = (tmp_path / "B.md").read_text()
    assert "± 0.0" not in md and "one repetition, so no spread is given" in md


def test_report_sections_are_replaced_or_added():
    from pyadaq.report.markdown import upsert_section

    doc = "# Title\n\nintro\n\n## Memory\n\nold table\n\n## Other\n\nkept\n"
    new = upsert_section(doc, "## Memory\n\nnew table\n")
    assert new == "# Title\n\nintro\n\n## Memory\n\nnew table\n\n## Other\n\nkept\n"
    assert upsert_section("# Title\n", "## Memory\n\nt\n") == "# Title\n\n## Memory\n\nt\n"


def test_report_preamble_keeps_the_sections():
    """`pyadaq bench --markdown FILE` without --section rewrites the report at the top of FILE
    and keeps its ## sections (the memory table, the comparison with another build)."""
    from pyadaq.report.markdown import upsert_preamble

    doc = "# Title\n\nold intro\n\n## Memory\n\nm\n\n## Against\n\na\n"
    new = upsert_preamble(doc, "# Title\n\nnew intro\n")
    assert new == "# Title\n\nnew intro\n\n## Memory\n\nm\n\n## Against\n\na\n"
    assert upsert_preamble("", "# T\n\nx\n") == "# T\n\nx\n"
    assert upsert_preamble("# T\n\nold\n", "# T\n\nnew\n") == "# T\n\nnew\n"


def test_bench_report_with_a_bandwidth_and_gpu_goals(tmp_path):
    """The report gives tg against the bandwidth bound; scripts/check_speed_goals.py checks
    issue 6's goals for a GPU run, and says which are not met through its exit code."""
    from pyadaq.report.markdown import render_bench

    def row(cfg, pp, tg):
        k, v = cfg.split(":")
        return {"config": cfg, "k": k, "v": v, "depth": 32768, "kv_bytes": 2**20, "pp_mean": pp, "pp_std": 0.0,
                "tg_mean": tg, "tg_std": 0.0, "pp_vs_f16": pp / 1000, "tg_vs_f16": tg / 100,
                "kv_vs_f16": 1.0, "peak_rss_growth_bytes": 3 * 2**20, "memory_vs_f16": 1.0,
                "tg_bytes_per_token": 10**9, "tg_gbps": tg}
    res = {"backend": "GPU", "n_prompt": 512, "n_gen": 64, "n_batch": 512, "reps": 3,
           "settings": {"model_name": "m.gguf", "machine": "x; GPU: H100", "native": "n", "date": "d", "seconds": 1.0},
           "results": [row("f16:f16", 1000, 100), row("q4_0:q4_0", 950, 120), row("q4_0:kvq2", 880, 110)]}
    md = render_bench(res, "pyadaq bench", mem_bandwidth_gbps=1000.0)
    assert ("| q4_0:kvq2 | 32768 | 1.00 | 1.00 | 3.0 | 1.00 | 880.0 ± 0.0 | 0.88 | 110.0 ± 0.0 | 1.10 | 1000.0 | "
            "110.0 | 0.11 |") in md
    (tmp_path / "b.json").write_text(json.dumps(res))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_speed_goals.py"), str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout
    assert "met      K=q4_0, V=kvq2 generation vs f16/f16 at depth 32768: 1.10x (goal >= 1.0)" in proc.stdout
    assert "met      K=q4_0, V=kvq2 generation vs q4_0/q4_0 at depth 32768: 0.92x (goal >= 0.9)" in proc.stdout
    assert "NOT MET  K=q4_0, V=kvq2 prompt processing vs f16/f16 at depth 32768: 0.88x (goal >= 0.9)" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--depths", "0,99999"], "beyond the model's context"),
    (["--depths", "a,b"], "comma-separated integers"),
    (["--configs", "q8_0:kvq9"], "kvq9"),
    (["--reps", "0"], "--reps must be at least 1"),
    (["--n-prompt", "0", "--n-gen", "0"], "not both 0"),
    (["--section", "Memory"], "give --markdown too"),
])
def test_bench_bad_input(tiny_model, capsys, args, message):
    rc = main(["bench", "--model", str(tiny_model()), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


CUDA_PAIRS_SCRIPT = ROOT / "native" / "cmake" / "pyadaq_cuda_pairs.cmake"


def cuda_pairs_from_cmake(*defines: str) -> dict[str, list[str]]:
    """What native/cmake/pyadaq_cuda_pairs.cmake computes for a CUDA build (the types whose
    every pair is compiled, and PYADAQ_CUDA_FA_PAIRS as libllama gets it), in script mode."""
    import shutil

    if shutil.which("cmake") is None:
        pytest.skip("no cmake to run native/cmake/pyadaq_cuda_pairs.cmake")
    proc = subprocess.run(["cmake", *(f"-D{d}" for d in defines), "-P", str(CUDA_PAIRS_SCRIPT)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split("=", 1) for line in proc.stderr.splitlines() if "=" in line)
    return {key: out[key].split(",") for key in ("fa_types", "compiled")}


def test_cuda_tables_are_the_builds():
    """pyadaq.types' CUDA tables are what a CUDA build compiles: CUDA_FA_PAIR_TYPES is the
    build's PYADAQ_CUDA_FA_TYPES, every pair among them and every pair of CUDA_KVT_FA_PAIRS
    (and no other with a kvt type) has a compiled vector kernel (the list
    libllama's offload check gets), and CUDA_CACHE_TYPES is the types of the compiled pairs
    plus f32 (which CUDA converts to f16). This build has no CUDA, so the list comes from the
    build's own CMake code, run as a script."""
    from pyadaq.types import CUDA_CACHE_TYPES, CUDA_FA_PAIR_TYPES, CUDA_KVT_FA_PAIRS

    cm = cuda_pairs_from_cmake()
    assert tuple(cm["fa_types"]) == CUDA_FA_PAIR_TYPES
    compiled = set(cm["compiled"])
    # docs/CUDA.md: 37 upstream + 28 with kvq2/kvq3 + 39 with a kvt type + 12 with a row-trellis value type
    assert len(compiled) == len(cm["compiled"]) == 116
    assert {f"{k}-{v}" for k in CUDA_FA_PAIR_TYPES for v in CUDA_FA_PAIR_TYPES} <= compiled
    assert {p for p in compiled if "kvt" in p} == set(CUDA_KVT_FA_PAIRS)
    in_pairs = {t for pair in compiled for t in pair.split("-")}
    assert in_pairs | {"f32"} == CUDA_CACHE_TYPES
    assert {p for p in compiled if "bf16" in p} == {"bf16-bf16"}  # bf16 only with itself
    # the offload check compares these names with ggml_type_name: they must be the library's
    n = pyadaq.native()
    for name in in_pairs:
        assert n.type_name(pyadaq.cache_type(name).id) == name


def test_cuda_pairs_follow_the_build_options():
    """The list follows GGML_CUDA_FA_QUANTS and PYADAQ_CUDA_FA_TYPES as a build would."""
    assert "q4_0-bf16" in cuda_pairs_from_cmake("GGML_CUDA_FA_QUANTS=all")["compiled"]
    small = cuda_pairs_from_cmake("GGML_CUDA_FA_QUANTS=q8_0-q8_0", "PYADAQ_CUDA_FA_TYPES=f16;kvq2",
                                  "PYADAQ_CUDA_KVT=OFF")
    assert small["fa_types"] == ["f16", "kvq2"]
    assert sorted(small["compiled"]) == ["f16-f16", "f16-kvq2", "kvq2-f16", "kvq2-kvq2", "q8_0-q8_0"]


def test_types_lists_what_runs_on_cuda(capsys):
    """`pyadaq types`: a CUDA column that says yes for exactly the types a CUDA build runs (from
    the build's CMake code), and the compiled pairs' types in its note."""
    cm = cuda_pairs_from_cmake()
    on_cuda = {t for pair in cm["compiled"] for t in pair.split("-")} | {"f32"}
    assert main(["types", "--research"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line[:1].isalnum()
            and not line.startswith(("CUDA", "This"))}
    assert set(rows) == {t.name for t in pyadaq.cache_types(research=True)}
    for name, row in rows.items():
        assert row[5] == ("yes" if name in on_cuda else "-"), name
    assert f"every K/V pair among {', '.join(cm['fa_types'])} has a compiled" in " ".join(out.split())


def test_plots_without_matplotlib_say_how_to_install_it(tiny_model, tmp_path, child_env):
    """matplotlib is the optional extra pyadaq[plots]: without it, a command asked for a plot
    stops before its run with a message that says how to install it."""
    code = ("import sys\n"
            "sys.modules['matplotlib'] = None  # as if it were not installed\n"
            "from pyadaq.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    for cmd in (["eval", "--configs", "q8_0:kvq2", "--ctx", "64", "--chunks", "1"],
                ["bench", "--configs", "q8_0:kvq2", "--depths", "0", "--reps", "1"]):
        proc = subprocess.run([sys.executable, "-c", code, *cmd, "--model", str(tiny_model()),
                               "--plot", str(tmp_path / "p.png")], env=child_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "pip install 'pyadaq[plots]'" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "p.png").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pyadaq {pyadaq.__version__} (pyadaq {pyadaq.__version__}; patchset ")


def test_reference_store_is_bounded(tmp_path, monkeypatch):
    """The f16 reference store evicts whole references, least recently used first, to stay
    under its limit, and never the one in use; `pyadaq cache` shows and clears it."""
    import os

    import numpy as np

    from pyadaq.eval.kl import ReferenceStore

    monkeypatch.setenv("PYADAQ_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "eval-ref"
    logits = np.random.default_rng(0).standard_normal((8, 4096)).astype(np.float32)  # 64 KiB stored
    stores = []
    for i in range(4):
        s = ReferenceStore(root, model_sha256=f"m{i}", text_sha256="t", n_ctx=16, limit=150 << 10)
        s.put(0, logits)
        os.utime(s.dir / "used", (1000 + i, 1000 + i))  # a clear order of use
        stores.append(s)
    left = {d.name for d in root.iterdir()}
    assert left == {stores[2].dir.name, stores[3].dir.name}  # two references fit in 150 KiB
    assert stores[3].contains(0) and not stores[0].contains(0)
    assert main(["cache"]) == 0
    assert main(["cache", "--clear", "references"]) == 0
    assert not root.exists()


def test_small_formatting_things(tiny_model):
    """KL of float-rounding size is never shown as -0.0000; a cache type reads as its name; /stats
    after an answer with no timed tokens says so instead of printing nan."""
    from pyadaq.cli.chat_cmd import Chat
    from pyadaq.report.markdown import fixed, kv_grid

    assert fixed(-1e-9, 4) == "0.0000" and fixed(-0.01, 2) == "-0.01" and fixed(0.25, 3) == "0.250"
    assert "-0.0000" not in "\n".join(kv_grid({("f16", "f16"): {"kl": -3e-9}}, "kl", "{:.4f}"))
    assert repr(pyadaq.cache_type("kvq2")) == "CacheType('kvq2')"
    llm = pyadaq.Llama(str(tiny_model()), cache_type_k="q8_0", cache_type_v="kvq2", n_ctx=256, n_threads=1)
    try:
        chat = Chat(llm, max_tokens=4, temperature=0.0)
        chat.last = {"prompt_tokens": 0, "prompt_ms": 0.0, "gen_tokens": 0, "gen_ms": 0.0, "seconds": 0.1,
                     "interrupted": True}
        text = chat.stats()
        assert "nan" not in text and "no speed measured" in text and "(interrupted)" in text
        k, v = llm.context_layer_types()
        assert repr(k[0]) == "CacheType('q8_0')" and str(v[0]) == "kvq2"
    finally:
        llm.close()


def test_eval_table_has_the_f16_reference(tiny_model, capsys):
    rc = main(["eval", "--model", str(tiny_model()), "--configs", "q8_0:kvq2", "--ctx", "64", "--chunks", "1",
               "--threads", "1", "--no-cache"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(f16 reference)" in out and "1 chunk of 64 tokens" in out and "1 chunks" not in out
