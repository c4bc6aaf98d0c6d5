#!/usr/bin/env python3
"""`pyadaq bench` against the bundled llama-bench, on the same configs, depths and test sizes, in
one run: for each K/V pair, llama-bench (`pyadaq tool llama-bench ... -o json`, one process per
pair) and pyadaq bench's measurement (pyadaq.eval.bench.run_bench, in this process) take turns,
over --rounds rounds (which goes first alternates from pair to pair and from round to round, so
that a drift of the machine's speed does not fall on one side). Both report pp (prompt tokens per
second, in batches of --batch) and tg (generated tokens per second, one at a time) with --depth
tokens already in the cache.

Per pair, depth and test: each tool's mean over the rounds, and the ratio pyadaq / llama-bench
as the mean of the rounds' ratios ± its standard error over the rounds (so the machine's drift
between processes is in it); "agree" when the ratio is within twice that of 1.

Usage: scripts/bench_crosscheck.py [--configs f16:f16,q8_0:q8_0,q8_0:kvq2,q4_0:kvq2]
       [--depths 0,4096] [--reps 3] [--rounds 3] [--threads 2] [--json F] [--markdown docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm


def llama_bench(model: str, k: str, v: str, depths: list, n_prompt: int, n_gen: int, reps: int, threads: int,
                batch: int) -> dict:
    """{(depth, 'pp'|'tg'): (mean t/s, sd)} from one llama-bench process."""
    from pyadaq.tools import tool_command, tool_env

    args = ["-m", model, "-ctk", k, "-ctv", v, "-fa", "on", "-d", ",".join(map(str, depths)), "-p", str(n_prompt),
            "-n", str(n_gen), "-r", str(reps), "-t", str(threads), "-b", str(batch), "-ub", str(batch), "-o", "json"]
    r = subprocess.run(tool_command("llama-bench", args), env=tool_env(), capture_output=True, text=True,
                       timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench {k}:{v} failed ({r.returncode}): {r.stderr[-2000:]}")
    out = {}
    for row in json.loads(r.stdout):
        test = "pp" if row["n_prompt"] else "tg"
        out[(row["n_depth"], test)] = (row["avg_ts"], row["stddev_ts"])
    return out


def pyadaq_bench(model: str, cfg, depths: list, n_prompt: int, n_gen: int, reps: int, threads: int,
                 batch: int) -> dict:
    from pyadaq.eval.bench import run_bench

    # sliding-window layers keep only their window, as llama-bench has them
    res = run_bench(model, [cfg], depths, n_prompt, n_gen, reps, threads, batch, progress=False, swa_full=False)
    return {(r["depth"], t): (r[f"{t}_mean"], r[f"{t}_std"] or 0.0) for r in res["results"] for t in ("pp", "tg")}


def compare(ours: list, theirs: list) -> dict:
    """ours/theirs: one (mean t/s, sd) per round."""
    ratios = [a[0] / b[0] for a, b in zip(ours, theirs)]
    ratio = statistics.mean(ratios)
    se = statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else float("nan")
    return {"pyadaq": statistics.mean(a[0] for a in ours), "llama_bench": statistics.mean(b[0] for b in theirs),
            "pyadaq_rounds": [a[0] for a in ours], "llama_bench_rounds": [b[0] for b in theirs],
            "ratios": ratios, "ratio": ratio, "ratio_se": se, "agree": abs(ratio - 1) <= 2 * se}


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        "## pyadaq bench against llama-bench", "",
        (f"`{s['model_name']}` on {s['machine']}; {s['pyadaq']}; measured {s['date']} in {s['seconds']:.0f} s. "
         f"pp{s['n_prompt']} (batches of {s['batch']}) and tg{s['n_gen']} at each depth, {s['reps']} repetitions "
         f"per run, {s['rounds']} rounds, {s['threads']} threads, flash attention on; tokens per second, mean over "
         "the rounds. llama-bench is the bundled one (`pyadaq tool llama-bench`), one process per pair and round; "
         "pyadaq's figures come from `pyadaq bench --no-swa-full`'s measurement in the script's process (the "
         "sliding-window layers keep only their window, as llama-bench has them); the two took turns, "
         "the first of them alternating. Ratio: pyadaq / llama-bench, mean of the rounds' ratios ± its standard "
         "error over the rounds; *agree* when within twice that of 1."),
        "", f"Rerun: `{s['command']}`", "",
        "| config | depth | test | pyadaq bench t/s | llama-bench t/s | ratio | |", "|---|---:|---|---:|---:|---:|---|"]
    for row in res["rows"]:
        lines.append(f"| {row['config']} | {row['depth']} | {row['test']} | "
                     f"{row['pyadaq']:.1f} | {row['llama_bench']:.1f} | "
                     f"{row['ratio']:.3f} ± {row['ratio_se']:.3f} | {'agree' if row['agree'] else 'differ'} |")
    lines += ["", res["summary"], "",
              ("How the two measure differently (so a few per cent either way is expected): pyadaq bench calls "
               "llama_decode from Python, one ctypes call and batch fill per generated token, and runs a pair's pp "
               "and tg repetitions in one context; llama-bench loops in C++ and makes one context per test. The "
               "rounds' ratios also carry the machine's drift between processes (this is a shared 2-core machine)."),
              ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--configs", default="f16:f16,q8_0:q8_0,q8_0:kvq2,q4_0:kvq2", help="K:V pairs")
    p.add_argument("--depths", default="0,4096")
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="repetitions per run (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each tool per pair (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)

    import time

    from pyadaq._native import native
    from pyadaq.cli._common import check_configs, parse_ints, resolve_model, write_json
    from pyadaq.plan.spec import parse_configs
    from pyadaq.report.machine import machine

    model, info = resolve_model(args.model)
    configs = parse_configs(args.configs)
    if not all(isinstance(c, tuple) for c in configs):
        raise SystemExit("--configs: K:V pairs only (llama-bench takes no plans or calibrations)")
    check_configs(configs, info)
    depths = parse_ints(args.depths, "--depths")
    t0 = time.time()
    rows = []
    runs: dict = {}
    bar = tqdm(total=2 * len(configs) * args.rounds, desc="rounds x pairs x (llama-bench, pyadaq bench)")
    for rnd in range(args.rounds):
        for i, (k, v) in enumerate(configs):
            order = ("llama-bench", "pyadaq") if (i + rnd) % 2 == 0 else ("pyadaq", "llama-bench")
            for tool in order:
                if tool == "llama-bench":
                    got = llama_bench(model, k, v, depths, args.n_prompt, args.n_gen, args.reps, args.threads,
                                      args.batch)
                else:
                    got = pyadaq_bench(model, (k, v), depths, args.n_prompt, args.n_gen, args.reps, args.threads,
                                       args.batch)
                runs.setdefault((i, tool), []).append(got)
                bar.update()
    for i, (k, v) in enumerate(configs):
        for d in depths:
            for test in ("pp", "tg"):
                rows.append({"config": f"{k}:{v}", "depth": d, "test": test,
                             **compare([r[(d, test)] for r in runs[(i, "pyadaq")]],
                                       [r[(d, test)] for r in runs[(i, "llama-bench")]])})
    bar.close()
    n_agree = sum(r["agree"] for r in rows)
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    mean_ratio = statistics.mean(r["ratio"] for r in rows)
    summary = (f"{n_agree} of {len(rows)} figures agree within noise; over all of them pyadaq bench measures "
               f"{mean_ratio:.3f}x llama-bench's speed; the largest difference is {worst['config']} {worst['test']} "
               f"at depth {worst['depth']}: {worst['ratio']:.3f}x.")
    res = {"settings": {"model_name": Path(model).name, "machine": machine(),
                        "pyadaq": native().build_info["info"],
                        "date": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": time.time() - t0,
                        "n_prompt": args.n_prompt, "n_gen": args.n_gen, "reps": args.reps, "rounds": args.rounds,
                        "threads": args.threads,
                        "batch": args.batch, "depths": depths,
                        "command": "scripts/bench_crosscheck.py " + " ".join(shlex.quote(a)
                                                                           for a in (argv or sys.argv[1:]))},
           "rows": rows, "summary": summary}
    for r in rows:
        print(f"{r['config']:<12} d{r['depth']:<5} {r['test']}  pyadaq {r['pyadaq']:8.1f}  llama-bench "
              f"{r['llama_bench']:8.1f}  {r['ratio']:.3f} ± {r['ratio_se']:.3f} {'agree' if r['agree'] else 'DIFFER'}")
    print(summary)
    if args.json:
        write_json(res, args.json)
    if args.markdown:
        from pyadaq.report.markdown import upsert_section

        md = Path(args.markdown)
        md.write_text(upsert_section(md.read_text() if md.exists() else "", markdown(res)))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
