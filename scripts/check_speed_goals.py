#!/usr/bin/env python3
"""Check a `pyadaq bench --json` run against the project's speed goals, at the deepest depth
the run measured. The goals are the project's, not the library's: `pyadaq bench` only reports.

CPU (issue 5): K=q8_0 with V=kvq2 generates at >= 0.95x and processes prompts at >= 0.8x
f16/f16; every config with a kvq type is at least as fast as upstream's q8_0/q4_0.
GPU (issue 6): K=q4_0 with V=kvq2 generates at >= 1.0x f16/f16 and >= 0.9x q4_0/q4_0, and
processes prompts at >= 0.9x f16/f16.

Usage: scripts/check_speed_goals.py BENCH.json [--markdown]   (exit 1 when a goal is not met)
"""

from __future__ import annotations

import argparse
import json
import sys


def _goal(label: str, value: float, goal: float) -> tuple:
    return f"{label}: {value:.2f}x (goal >= {goal})", value >= goal


def check(res: dict) -> list:
    rows = res["results"]
    deepest = max(r["depth"] for r in rows)
    at = {r["config"]: r for r in rows if r["depth"] == deepest}
    out = []

    def ratio(a, b, key):
        x, y = (a or {}).get(f"{key}_mean"), (b or {}).get(f"{key}_mean")
        return x / y if x and y else None

    if res["backend"] == "GPU":
        r, f16, q4 = at.get("q4_0:kvq2"), at.get("f16:f16"), at.get("q4_0:q4_0")
        goals = ((f16, "tg", 1.0, "generation vs f16/f16"), (q4, "tg", 0.9, "generation vs q4_0/q4_0"),
                 (f16, "pp", 0.9, "prompt processing vs f16/f16"))
        for ref, key, goal, what in goals:
            v = ratio(r, ref, key)
            if v is not None:
                out.append(_goal(f"K=q4_0, V=kvq2 {what} at depth {deepest}", v, goal))
        return out
    r, f16, ref = at.get("q8_0:kvq2"), at.get("f16:f16"), at.get("q8_0:q4_0")
    for key, goal, what in (("tg", 0.95, "generation"), ("pp", 0.8, "prompt processing")):
        v = ratio(r, f16, key)
        if v is not None:
            out.append(_goal(f"K=q8_0, V=kvq2 {what} vs f16/f16 at depth {deepest}", v, goal))
    for label, row in at.items():
        if any(t.startswith("kvq") for t in (row["k"], row["v"])):
            for key, what in (("tg", "generation"), ("pp", "prompt processing")):
                v = ratio(row, ref, key)
                if v is not None:
                    out.append(_goal(f"{label} {what} vs q8_0/q4_0 at depth {deepest}", v, 1.0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="a `pyadaq bench --json` file")
    ap.add_argument("--markdown", action="store_true", help="print the result as a Markdown list")
    args = ap.parse_args()
    with open(args.json) as f:
        res = json.load(f)
    results = check(res)
    if not results:
        print("no goal applies to the configs and depths of this run")
        return 0
    for text, ok in results:
        mark = ("**met**" if ok else "**not met**") if args.markdown else ("met" if ok else "NOT MET")
        print(f"- {text}: {mark}" if args.markdown else f"{mark:8} {text}")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
