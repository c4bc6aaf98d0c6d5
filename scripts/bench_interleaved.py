#!/usr/bin/env python3
"""Speed of KV-cache configs against each other, taking turns in one process.

Every config's context is created and filled to the depth first; then, round after round, each
config in turn generates --n-gen tokens one at a time and processes a --n-prompt batch (each
dropped again, so every round starts at the depth). Per round each config's speed is divided by
the first config's of the same round, and the ratios are averaged over the rounds (mean ±
standard error): on a shared machine whose speed drifts by 5-10 % from one process or minute to
the next, configs measured seconds apart in one process are compared under the same conditions,
which separate `pyadaq bench` runs are not. All contexts are held at once (a small model's
caches; a large model's may not fit).

    scripts/bench_interleaved.py --configs q4_0:kvq2,kvt4s:kvt2+cal,q8_0:kvq2,q8_0:kvt2+cal \
        --depth 4096 --rounds 8 --json docs/bench-interleaved-4096.json \
        --pairs kvt4s:kvt2+cal/q4_0:kvq2,q8_0:kvt2+cal/q8_0:kvq2

--pairs A/B,...: also each A against B, round by round (A and B among the configs); with
--from-json FILE the tables are rendered again from a saved run, without measuring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pyadaq import __version__, embedded_model_path
from pyadaq._native import native
from pyadaq.eval.bench import time_generation, time_prompt
from pyadaq.plan.spec import parse_configs, resolve_configs
from pyadaq.report.machine import machine
from pyadaq.runtime.context import Model, quiet_native_logs
from pyadaq.runtime.kvconfig import config_label, open_context


def mean_se(xs: list) -> tuple:
    m = float(np.mean(xs))
    return m, (float(np.std(xs, ddof=1)) / math.sqrt(len(xs)) if len(xs) > 1 else None)


def measure(args) -> dict:
    quiet_native_logs()
    model_path = str(args.model or embedded_model_path())
    configs = resolve_configs(parse_configs(args.configs), model_path, progress=False)
    labels = [config_label(c) for c in configs]
    model = Model(model_path, n_gpu_layers=0)
    rng = np.random.default_rng(args.seed)
    n_ctx = args.depth + max(args.n_prompt, args.n_gen) + 1
    contexts = []
    speeds = {label: {"pp": [], "tg": []} for label in labels}
    try:
        fill = rng.integers(0, model.n_vocab, args.depth)
        for cfg in tqdm(configs, desc=f"filling contexts to {args.depth}"):
            ctx = open_context(model, cfg, n_ctx, args.threads, n_batch=args.batch)
            contexts.append(ctx)
            if args.depth:
                ctx.decode(fill, 0, logits_from=args.depth - 1, step=args.batch)
            # one untimed pass of each test: the first decode of a shape allocates its buffers
            if args.n_prompt:
                time_prompt(ctx, rng.integers(0, model.n_vocab, args.n_prompt), args.depth, args.batch)
            if args.n_gen:
                time_generation(ctx, rng.integers(0, model.n_vocab, 1), args.depth, args.batch)
        for _ in tqdm(range(args.rounds), desc="rounds"):
            for label, ctx in zip(labels, contexts):
                if args.n_prompt:
                    toks = rng.integers(0, model.n_vocab, args.n_prompt)
                    speeds[label]["pp"].append(time_prompt(ctx, toks, args.depth, args.batch))
                if args.n_gen:
                    toks = rng.integers(0, model.n_vocab, args.n_gen)
                    speeds[label]["tg"].append(time_generation(ctx, toks, args.depth, args.batch))
    finally:
        for ctx in contexts:
            ctx.close()
        model.close()
    rows = []
    base = labels[0]
    for label in labels:
        row = {"config": label}
        for test in ("pp", "tg"):
            s = speeds[label][test]
            if not s:
                continue
            ratios = [a / b for a, b in zip(s, speeds[base][test])]
            row[f"{test}_tps"] = s
            row[f"{test}_mean"] = float(np.mean(s))
            row[f"{test}_vs_first"], row[f"{test}_vs_first_se"] = mean_se(ratios)
        rows.append(row)
    return {"model": model_path, "depth": args.depth, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
            "rounds": args.rounds, "threads": args.threads, "first": base, "results": rows,
            "settings": {"pyadaq": __version__, "native": native().build_info["info"], "machine": machine(),
                         "date": datetime.datetime.now().isoformat(timespec="seconds"),
                         "command": "scripts/bench_interleaved.py " + " ".join(sys.argv[1:])}}


def pair_rows(res: dict, pairs: list) -> list:
    """[(a, b, {test: (mean, se)})] of a's speed over b's, round by round."""
    by = {r["config"]: r for r in res["results"]}
    out = []
    for a, b in pairs:
        if a not in by or b not in by:
            raise SystemExit(f"--pairs: {a if a not in by else b} is not among the run's configs {sorted(by)}")
        got = {}
        for test in ("pp", "tg"):
            if f"{test}_tps" in by[a]:
                got[test] = mean_se([x / y for x, y in zip(by[a][f"{test}_tps"], by[b][f"{test}_tps"])])
        out.append((a, b, got))
    return out


def render(res: dict, pairs: list = ()) -> str:
    s = res["settings"]
    first = res["first"]
    title = (f"{Path(res['model']).name}, {s['machine']} ({res['threads']} used), depth {res['depth']}, "
             f"{res['rounds']} rounds ({s['native']})")
    lines = [title,
             f"{'config':22s} {'pp t/s':>8s} {'pp / ' + first:>22s} {'tg t/s':>8s} {'tg / ' + first:>22s}"]
    for r in res["results"]:
        cells = []
        for test in ("pp", "tg"):
            if f"{test}_mean" not in r:
                cells += ["–", "–"]
                continue
            se = r[f"{test}_vs_first_se"]
            cells += [f"{r[f'{test}_mean']:.1f}",
                      f"{r[f'{test}_vs_first']:.3f}" + (f" ± {se:.3f}" if se is not None else "")]
        lines.append(f"{r['config']:22s} {cells[0]:>8s} {cells[1]:>22s} {cells[2]:>8s} {cells[3]:>22s}")
    if pairs:
        lines += ["", f"{'config':22s} {'against':22s} {'pp ratio':>16s} {'tg ratio':>16s}"]
        for a, b, got in pair_rows(res, pairs):
            cells = [f"{got[t][0]:.3f} ± {got[t][1]:.3f}" if t in got and got[t][1] is not None
                     else (f"{got[t][0]:.3f}" if t in got else "–") for t in ("pp", "tg")]
            lines.append(f"{a:22s} {b:22s} {cells[0]:>16s} {cells[1]:>16s}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", help="as eval's and bench's --configs; the first is the reference")
    ap.add_argument("--model", help="GGUF model (default: the embedded model)")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", default="", help="A/B,...: each A's speed over B's, round by round")
    ap.add_argument("--json")
    ap.add_argument("--from-json", help="render the tables of a saved --json run instead of measuring")
    args = ap.parse_args()
    pairs = [tuple(p.split("/", 1)) for p in args.pairs.split(",") if p]
    if any(len(p) != 2 for p in pairs):
        ap.error("--pairs takes A/B,... (configs of the run)")
    if args.from_json:
        print(render(json.loads(Path(args.from_json).read_text()), pairs))
        return 0
    if not args.configs:
        ap.error("--configs is needed to measure")
    if args.rounds < 1 or args.depth < 0 or args.n_prompt < 0 or args.n_gen < 0 or args.n_prompt + args.n_gen == 0:
        ap.error("--rounds must be >= 1, --depth, --n-prompt and --n-gen >= 0, and one of the tests must run")
    res = measure(args)
    print(render(res, pairs))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
