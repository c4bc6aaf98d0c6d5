#!/usr/bin/env python3
"""Load on `pyadaq serve` (the bundled llama-server) over real HTTP on localhost.

  throughput  the same requests sent one at a time and then from N clients at once, in
              alternating rounds: aggregate generated tokens per second of each, and their ratio
  soak        a bounded mixed load: valid, malformed, streamed and dropped-midway requests from
              N clients; every valid request must be answered completely, the server's resident
              memory at the end must be within 5 % of its size after the first 50 requests, and no
              slot may be left busy

Both start `pyadaq serve` themselves (model, slots and cache types from the options; the embedded
model by default), write their figures as JSON and, with --markdown, as a section of that file.
Exit status 1 when a soak check fails. Not part of the test suite (minutes of load).

Usage:
  scripts/serve_load.py throughput [--rounds 3] [--json F] [--markdown docs/BENCHMARKS.md]
  scripts/serve_load.py soak [--requests 500] [--json F] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

TOPICS = ["the sea", "a library", "winter", "a train journey", "an old map", "bread", "a lighthouse", "the moon",
          "a garden", "a clock", "mountains", "a letter", "rain", "a market", "bees", "a bridge"]


# ------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------


class Server:
    """`pyadaq serve` on a free port, stopped (SIGINT, as Ctrl-C) on exit."""

    def __init__(self, args, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.argv = [sys.executable, "-m", "pyadaq", "serve", "--port", str(self.port), "--parallel",
                     str(args.parallel), "--ctx", str(args.ctx), "--cache-type-k", args.cache_type_k,
                     "--cache-type-v", args.cache_type_v, "--alias", "load"]
        if args.model:
            self.argv += ["--model", str(Path(args.model).resolve())]
        if args.threads:
            self.argv += ["--threads", str(args.threads)]
        self.log = log.resolve()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self._out = open(self.log, "w")
        # from the log's directory: a source checkout's pyadaq/ (no built libraries) must not shadow the
        # installed package
        self.proc = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT, text=True,
                                     cwd=self.log.parent)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pyadaq serve exited: {self.log.read_text()[-3000:]}")
            if "pyadaq serve:" in self.log.read_text():  # printed once /health answers
                return self
            time.sleep(0.2)
        raise RuntimeError("pyadaq serve did not start within 600 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._out.close()

    def llama_server_pid(self) -> int:
        """The llama-server process `pyadaq serve` started."""
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()
                        and _stat_ppid(p.name) == pid]
        if len(children) != 1:
            raise RuntimeError(f"expected one llama-server under pyadaq serve (pid {pid}), found {children}")
        return int(children[0])

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.llama_server_pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc")

    def get(self, path: str, timeout: float = 30):
        return request(self.port, "GET", path, None, timeout=timeout)


def _stat_ppid(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def request(port: int, method: str, path: str, body: bytes | None, timeout: float = 300):
    """(status, decoded body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def completion_body(i: int, max_tokens: int, stream: bool = False, chat: bool = False) -> dict:
    text = f"Write a few sentences about {TOPICS[i % len(TOPICS)]}."
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def streamed(port: int, path: str, body: dict, timeout: float = 300, drop_after: int | None = None):
    """A streamed request read event by event: (status, events, saw [DONE]). With drop_after the
    connection is closed after that many events (a client that left midway)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    events, done = [], False
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return r.status, r.read().decode("utf-8", "replace"), False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            events.append(json.loads(data))
            if drop_after is not None and len(events) >= drop_after:
                conn.sock.shutdown(socket.SHUT_RDWR)
                break
        return r.status, events, done
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------


def _generated(status: int, text: str, max_tokens: int) -> int:
    if status != 200:
        raise RuntimeError(f"request failed with {status}: {text[:300]}")
    res = json.loads(text)
    n = res["usage"]["completion_tokens"]
    if n != max_tokens or res["choices"][0]["finish_reason"] != "length":
        raise RuntimeError(f"incomplete answer: {n} of {max_tokens} tokens, {res['choices'][0]['finish_reason']}")
    return n


def throughput(args) -> dict:
    n, m = args.clients, args.max_tokens
    bodies = [json.dumps(completion_body(i, m)).encode() for i in range(n)]
    rounds = []
    with Server(args, Path(args.log)) as server:
        def one(b):
            return _generated(*request(server.port, "POST", "/v1/completions", b), m)

        one(bodies[0])  # warm-up: the first request pays for page faults and thread start
        bar = tqdm(total=2 * args.rounds, desc="throughput rounds (one at a time, then all at once)")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            toks = sum(one(b) for b in bodies)
            seq = toks / (time.perf_counter() - t0)
            bar.update()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                toks = sum(pool.map(one, bodies))
            conc = toks / (time.perf_counter() - t0)
            bar.update()
            rounds.append({"sequential_tps": seq, "concurrent_tps": conc, "ratio": conc / seq})
        bar.close()
        slots = json.loads(server.get("/slots")[1])
    ratios = [r["ratio"] for r in rounds]
    out = {"clients": n, "max_tokens": m, "rounds": rounds,
           "sequential_tps_mean": statistics.mean(r["sequential_tps"] for r in rounds),
           "concurrent_tps_mean": statistics.mean(r["concurrent_tps"] for r in rounds),
           "ratio_mean": statistics.mean(ratios),
           "ratio_se": statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None,
           "slots_left_busy": sum(bool(s["is_processing"]) for s in slots)}
    print(f"{n} requests of {m} tokens: one at a time {out['sequential_tps_mean']:.1f} tokens/s, {n} clients at once "
          f"{out['concurrent_tps_mean']:.1f} tokens/s: {out['ratio_mean']:.2f}x")
    return out


def throughput_markdown(res: dict) -> str:
    s, t = res["settings"], res["throughput"]
    se = f" ± {t['ratio_se']:.2f}" if t["ratio_se"] is not None else ""
    lines = [
        f"## Concurrent requests on `pyadaq serve`: {s['model_name']}, {s['parallel']} slots", "",
        (f"`pyadaq serve --parallel {s['parallel']} --ctx {s['ctx']} --cache-type-k {s['cache_type_k']} "
        f"--cache-type-v {s['cache_type_v']}` (the bundled llama-server) with `{s['model_name']}` on {s['machine']}; "
        f"{s['pyadaq']}; measured {s['date']}. {t['clients']} completion requests of {t['max_tokens']} generated "
        f"tokens each (greedy, end of text ignored), sent one at a time and then from {t['clients']} clients at once, "
        f"{len(t['rounds'])} rounds taking turns; aggregate generated tokens per second over each batch's wall time."),
        "", f"Rerun: `{s['command']}`", "",
        "| round | one at a time, tokens/s | all at once, tokens/s | ratio |", "|---:|---:|---:|---:|"]
    for i, r in enumerate(t["rounds"], 1):
        lines.append(f"| {i} | {r['sequential_tps']:.1f} | {r['concurrent_tps']:.1f} | {r['ratio']:.2f} |")
    lines += ["", (f"Mean ratio {t['ratio_mean']:.2f}{se} (± standard error over the rounds); slots busy after the "
                  f"run: {t['slots_left_busy']}."), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# soak
# ------------------------------------------------------------------------------------------

MALFORMED = [
    ("POST", "/v1/chat/completions", b""),
    ("POST", "/v1/chat/completions", b"this is not json"),
    ("POST", "/v1/chat/completions", b'{"messages": 5}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 1}]}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": "many"}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 4'),
]
KINDS = ("valid", "streamed", "malformed", "dropped")
WEIGHTS = (0.45, 0.25, 0.15, 0.15)


def _complete(finish_reason, tokens, max_tokens: int) -> bool:
    """The whole answer: all max_tokens tokens (the end of text is ignored), or fewer ended by a
    stop string (the fallback chat template stops at the next 'User:')."""
    if not isinstance(tokens, int):
        return False
    if finish_reason == "length":
        return tokens == max_tokens
    return finish_reason == "stop" and 0 < tokens <= max_tokens


def soak_one(port: int, kind: str, i: int, rng: random.Random) -> dict:
    t0 = time.perf_counter()
    rec = {"kind": kind, "ok": False}
    try:
        if kind == "malformed":
            method, path, raw = MALFORMED[i % len(MALFORMED)]
            status, text = request(port, method, path, raw, timeout=60)
            rec.update(status=status, ok=400 <= status < 500)
        elif kind == "valid":
            m, chat = rng.randint(4, 32), rng.random() < 0.5
            path = "/v1/chat/completions" if chat else "/v1/completions"
            status, text = request(port, "POST", path, json.dumps(completion_body(i, m, chat=chat)).encode())
            res = json.loads(text) if status == 200 else {}
            choice = (res.get("choices") or [{}])[0]
            answer = choice.get("message", {}).get("content") if chat else choice.get("text")
            rec.update(status=status, ok=status == 200 and isinstance(answer, str)
                       and _complete(choice.get("finish_reason"), res.get("usage", {}).get("completion_tokens"), m))
        elif kind == "streamed":
            m = rng.randint(4, 32)
            status, events, done = streamed(port, "/v1/completions", completion_body(i, m, stream=True))
            text = "".join(e["choices"][0].get("text") or "" for e in events if e.get("choices"))
            finish = [e["choices"][0].get("finish_reason") for e in events if e.get("choices")]
            rec.update(status=status, ok=status == 200 and done and bool(text)
                       and finish[-1:] in (["length"], ["stop"]))
        else:  # dropped: a long streamed request whose client leaves after a few tokens
            status, events, _ = streamed(port, "/v1/completions", completion_body(i, 512, stream=True),
                                         drop_after=rng.randint(1, 4))
            rec.update(status=status, ok=status == 200 and len(events) >= 1)
    except Exception as e:  # any failure of a request is a finding, not the end of the run
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["seconds"] = time.perf_counter() - t0
    return rec


def soak(args) -> dict:
    rng = random.Random(args.seed)
    kinds = rng.choices(KINDS, WEIGHTS, k=args.requests)
    records: list = [None] * args.requests
    rss_after_50 = None
    done_count = 0
    lock = threading.Lock()
    t_start = time.perf_counter()
    with Server(args, Path(args.log)) as server:
        rss_start = server.rss_bytes()
        bar = tqdm(total=args.requests, desc=f"soak: {args.requests} requests from {args.clients} clients")

        def run(i):
            nonlocal rss_after_50, done_count
            rec = soak_one(server.port, kinds[i], i, random.Random(args.seed * 100003 + i))
            with lock:
                records[i] = rec
                done_count += 1
                if done_count == 50:
                    rss_after_50 = server.rss_bytes()
                bar.update()

        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(run, range(args.requests)))
        bar.close()
        # dropped requests end on the server when it next writes to their connection
        deadline = time.monotonic() + 60
        while True:
            slots = json.loads(server.get("/slots")[1])
            busy = sum(bool(s["is_processing"]) for s in slots)
            if busy == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        health = server.get("/health")[0]
        rss_end = server.rss_bytes()
        alive = server.proc.poll() is None
    seconds = time.perf_counter() - t_start
    by_kind = {k: {"sent": sum(r["kind"] == k for r in records), "ok": sum(r["kind"] == k and r["ok"]
                                                                             for r in records)} for k in KINDS}
    growth = (rss_end - rss_after_50) / rss_after_50
    checks = {
        "every valid request answered completely": all(r["ok"] for r in records if r["kind"] in ("valid", "streamed")),
        "every malformed request answered 4xx": all(r["ok"] for r in records if r["kind"] == "malformed"),
        "resident memory within 5 % of its size after 50 requests": abs(growth) <= 0.05,
        "no slot left busy": busy == 0,
        "server up and healthy at the end": alive and health == 200,
    }
    failures = [dict(r, index=i) for i, r in enumerate(records) if not r["ok"]][:20]
    out = {"requests": args.requests, "clients": args.clients, "seconds": seconds, "by_kind": by_kind,
           "rss_start_bytes": rss_start, "rss_after_50_bytes": rss_after_50, "rss_end_bytes": rss_end,
           "rss_growth_after_50": growth, "slots_left_busy": busy, "checks": checks, "failures": failures,
           "latency_s": {k: _quantiles([r["seconds"] for r in records if r["kind"] == k]) for k in KINDS}}
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"{args.requests} requests in {seconds:.0f} s; llama-server RSS {rss_after_50 / 2**20:.1f} MiB after 50, "
          f"{rss_end / 2**20:.1f} MiB at the end ({100 * growth:+.2f} %)")
    return out


def _quantiles(xs: list) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {"median": xs[len(xs) // 2], "p95": xs[min(len(xs) - 1, int(0.95 * len(xs)))], "max": xs[-1]}


def soak_markdown(res: dict) -> str:
    s, t = res["settings"], res["soak"]
    lines = [
        "## Soak test of `pyadaq serve`", "",
        (f"`pyadaq serve --parallel {s['parallel']} --ctx {s['ctx']} --cache-type-k {s['cache_type_k']} "
        f"--cache-type-v {s['cache_type_v']}` with `{s['model_name']}` on {s['machine']}; {s['pyadaq']}; measured "
        f"{s['date']}. {t['requests']} requests from {t['clients']} clients on localhost in {t['seconds']:.0f} s: "
        "completions and chat completions of 4-32 greedy tokens, streamed completions, malformed bodies, and "
        "streamed requests of 512 tokens whose client leaves after 1-4 tokens."),
        "", f"Rerun: `{s['command']}`", "",
        "| kind | sent | as expected | latency median / p95 / max, s |", "|---|---:|---:|---|"]
    for k in KINDS:
        q = t["latency_s"].get(k) or {}
        lat = f"{q['median']:.2f} / {q['p95']:.2f} / {q['max']:.2f}" if q else "–"
        lines.append(f"| {k} | {t['by_kind'][k]['sent']} | {t['by_kind'][k]['ok']} | {lat} |")
    lines += ["", (f"llama-server's resident memory: {t['rss_start_bytes'] / 2**20:.1f} MiB at the start, "
                  f"{t['rss_after_50_bytes'] / 2**20:.1f} MiB after the first 50 requests, "
                  f"{t['rss_end_bytes'] / 2**20:.1f} MiB at the end ({100 * t['rss_growth_after_50']:+.2f} %)."), ""]
    lines += [f"- {'passed' if ok else 'FAILED'}: {name}" for name, ok in t["checks"].items()]
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("throughput", "soak"))
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--parallel", type=int, default=4, help="server slots (default 4)")
    p.add_argument("--ctx", type=int, default=4096, help="server context over all slots (default 4096)")
    p.add_argument("--cache-type-k", default="q8_0")
    p.add_argument("--cache-type-v", default="kvq2")
    p.add_argument("--threads", type=int, help="server threads (default: llama-server's)")
    p.add_argument("--clients", type=int, default=8, help="clients at once (default 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="throughput: tokens per request (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="throughput: rounds (default 3)")
    p.add_argument("--requests", type=int, default=500, help="soak: requests (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="the server's output (default: a temporary file)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--markdown", help="write the figures as a section of this Markdown file")
    args = p.parse_args(argv)
    if args.log is None:
        import tempfile

        args.log = os.path.join(tempfile.mkdtemp(prefix="pyadaq-serve-load-"), "serve.log")

    import datetime

    from pyadaq._native import native
    from pyadaq.cli._common import resolve_model, write_json
    from pyadaq.report.machine import machine

    model, _info = resolve_model(args.model)
    settings = {"model_name": Path(model).name, "machine": machine(), "parallel": args.parallel, "ctx": args.ctx,
                "cache_type_k": args.cache_type_k, "cache_type_v": args.cache_type_v,
                "pyadaq": native().build_info["info"],
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": "scripts/serve_load.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    res = {"settings": settings, args.mode: throughput(args) if args.mode == "throughput" else soak(args)}
    if args.json:
        write_json(res, args.json)
    if args.markdown:
        from pyadaq.report.markdown import upsert_section

        md = Path(args.markdown)
        old = md.read_text() if md.exists() else ""
        md.write_text(upsert_section(old, throughput_markdown(res) if args.mode == "throughput"
                                     else soak_markdown(res)))
        print(f"wrote {args.markdown}")
    return 0 if args.mode == "throughput" or all(res["soak"]["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
