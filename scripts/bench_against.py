#!/usr/bin/env python3
"""Speed of this pyadaq against another build of it, measured in one run.

The two installs take turns: each round runs `pyadaq bench` once with this checkout's
installed pyadaq and once with the other (a directory holding another pyadaq package, with its
libraries, put first on PYTHONPATH), in alternating order, at one depth with one repetition. Per
config it reports the ratio to f16/f16 of the same process (mean ± standard error over the
rounds) for both, and the ratio of the two: noise that slows the whole machine cancels in the
ratios, and drift over the run hits both installs alike.

    scripts/bench_against.py --other /tmp/oldpkg --configs q8_0:kvq2,q4_0:kvq2,q8_0:q4_0 \
        --depth 4096 --rounds 6 --json docs/bench-against.json --markdown docs/BENCHMARKS.md

With --markdown the table goes into that file as the section "## Against the previous build"
(--title to name it otherwise).

--other-env VAR=VALUE (repeatable) instead of --other: the other side is this same install run with
those environment variables, e.g. PYADAQ_FA_TILED=0 for upstream's flash-attention paths against
pyadaq's kernels:

    scripts/bench_against.py --other-env PYADAQ_FA_TILED=0 --configs q8_0:kvq2,kvt4s:kvt2+cal \
        --depth 4096 --rounds 4 --n-prompt 0 --n-gen 32 --json docs/bench-decode-kernel.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(pythonpath: str | None, configs: str, depth: int, n_prompt: int, n_gen: int,
          extra_env: dict | None = None) -> tuple:
    """({config: (pp ratio to f16, tg ratio to f16)}, the build description) of one bench process
    (a ratio is None for a test that was skipped)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.json"
        cmd = [sys.executable, "-m", "pyadaq", "bench", "--configs", configs, "--depths", str(depth),
               "--reps", "1", "--n-prompt", str(n_prompt), "--n-gen", str(n_gen), "--json", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise SystemExit(f"bench failed ({'other' if pythonpath else 'this'} install):\n{proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
    return {r["config"]: (r["pp_vs_f16"], r["tg_vs_f16"]) for r in res["results"]}, res["settings"]["native"]


def mean_se(xs: list) -> tuple:
    if not xs or any(x is None for x in xs):
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def fmt(m: float | None, se) -> str:
    if m is None:
        return "–"
    return f"{m:.3f}" if se is None else f"{m:.3f} ± {se:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", help="directory with the other pyadaq package (put on PYTHONPATH)")
    ap.add_argument("--other-env", action="append", default=[], metavar="VAR=VALUE",
                    help="instead of --other: run this install with these environment variables as the other side")
    ap.add_argument("--configs")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--from-json", help="write the table (and --markdown) from a saved --json run")
    ap.add_argument("--title", default="Against the previous build", help="the section's title")
    args = ap.parse_args()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        if not (args.other or args.other_env) or not args.configs:
            ap.error("--other or --other-env, and --configs, are needed to measure (or --from-json to render)")
        if any("=" not in e for e in args.other_env):
            ap.error("--other-env takes VAR=VALUE")
        result = measure(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    text = render(result, args.title)
    print(text)
    if args.markdown:
        from pyadaq.report.markdown import upsert_section  # the installed package

        p = Path(args.markdown)
        p.write_text(upsert_section(p.read_text() if p.exists() else "", text))
    return 0


def measure(args) -> dict:
    runs: dict = {"this": [], "other": []}
    natives = {}
    other_env = dict(e.split("=", 1) for e in args.other_env)
    for i in range(args.rounds):
        order = ("this", "other") if i % 2 == 0 else ("other", "this")
        for which in order:
            ratios, native = bench(args.other if which == "other" else None, args.configs, args.depth,
                                   args.n_prompt, args.n_gen, other_env if which == "other" else None)
            runs[which].append(ratios)
            natives[which] = native
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = []
    for cfg in runs["this"][0]:
        if cfg == "f16:f16":
            continue
        row = {"config": cfg}
        for key, idx in (("pp", 0), ("tg", 1)):
            this = [r[cfg][idx] for r in runs["this"]]
            other = [r[cfg][idx] for r in runs["other"]]
            row[f"{key}_this"] = mean_se(this)
            row[f"{key}_other"] = mean_se(other)
            row[f"{key}_this_over_other"] = mean_se([None if a is None or b is None else a / b
                                                     for a, b in zip(this, other)])
        rows.append(row)
    command = " ".join(["scripts/bench_against.py", *sys.argv[1:]])
    from pyadaq.report.machine import machine

    return {"machine": machine(), "depth": args.depth, "rounds": args.rounds, "n_prompt": args.n_prompt,
            "n_gen": args.n_gen, "this": natives["this"], "other": natives["other"], "other_env": other_env,
            "rows": rows, "runs": runs, "command": command}


def render(result: dict, title: str = "Against the previous build") -> str:
    """The Markdown section of a measure() result."""
    rows = result["rows"]
    env = result.get("other_env") or {}
    other = (f"the same build run with {', '.join(f'{k}={v}' for k, v in env.items())}" if env
             else f"`{result['other']}`")
    label = "other" if env else "previous"
    rerun = ("" if env else ", with the other build installed in the `--other` directory (`git worktree add /tmp/old "
             "<commit>`, then `pip install --no-deps --target /tmp/oldpkg /tmp/old`)")
    lines = [
        f"## {title}",
        "",
        (f"Ratios to f16/f16 at depth {result['depth']} (pp{result['n_prompt']}, tg{result['n_gen']}), mean ± "
         f"standard error over {result['rounds']} rounds in which the two builds took turns (one `pyadaq bench` "
         f"process each, one repetition): this build `{result['this']}` against {other}."),
        "",
        f"Rerun: `{result.get('command', 'scripts/bench_against.py')}`{rerun}.",
        "",
        (f"| config | pp / f16, this | pp / f16, {label} | this / {label} | tg / f16, this | tg / f16, {label} "
         f"| this / {label} |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['config']} | {fmt(*r['pp_this'])} | {fmt(*r['pp_other'])} | "
                     f"{fmt(*r['pp_this_over_other'])} | {fmt(*r['tg_this'])} | {fmt(*r['tg_other'])} | "
                     f"{fmt(*r['tg_this_over_other'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
