"""`pyadaq results`: docs/RESULTS.md, the K x V matrix on the embedded model and the paper's
equal-budget comparison, from one `pyadaq eval` run (or from its saved JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MATRIX = ["f16", "q8_0", "q4_0", "kvq3", "kvq2"]


def add_parser(sub) -> None:
    p = sub.add_parser("results", help="measure the K x V matrix and write docs/RESULTS.md", description=__doc__)
    p.add_argument("--from-json", help="render from a saved `pyadaq eval --json` file instead of measuring")
    p.add_argument("--json", default="docs/results-matrix.json")
    p.add_argument("--plot", default="docs/results-matrix.png")
    p.add_argument("--out", default="docs/RESULTS.md")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--passkey", action="store_true", help="also measure pass-key accuracy (long)")
    p.add_argument("--passkey-from", help="merge pass-key figures from another `pyadaq eval --passkey --json` file")
    p.add_argument("--passkey-lengths", default="1024,2048,4096", help="prompt lengths for --passkey")
    p.add_argument("--adaptive", action="store_true",
                   help="also measure the adaptive section: norm analysis, calibration, planned allocations "
                        "at --budgets against the uniform pairs (written to --adaptive-json)")
    p.add_argument("--budgets", default="3.0,4.5,6.0", help="bits per value for --adaptive")
    p.add_argument("--adaptive-json", default="docs/results-adaptive.json",
                   help="adaptive figures: written by --adaptive, read when rendering if present")
    p.set_defaults(func=run)


def configs() -> str:
    return ",".join(f"{k}:{v}" for k in MATRIX for v in MATRIX)


def run(args) -> int:
    if not args.from_json:
        from . import eval_cmd

        eval_args = argparse.Namespace(
            model=None, text=None, ctx=512, chunks=args.chunks, configs=configs(), passkey=args.passkey,
            passkey_lengths=args.passkey_lengths, passkey_depths="0.1,0.3,0.5,0.7,0.9", passkey_seeds=1,
            threads=None, no_rot=False, no_cache=False, json=args.json, plot=args.plot)
        eval_cmd.run(eval_args)
        src = args.json
    else:
        src = args.from_json
    res = json.loads(Path(src).read_text())
    if args.passkey_from:
        merge_passkey(res, json.loads(Path(args.passkey_from).read_text()))
    if args.from_json:
        from .eval_cmd import plot

        plot(res, args.plot)
    adaptive = None
    if args.adaptive:
        from .adaptive_results import measure

        adaptive = measure(res, [float(b) for b in args.budgets.split(",") if b.strip()], args.adaptive_json,
                           Path(args.out).parent)
    elif Path(args.adaptive_json).exists():
        adaptive = json.loads(Path(args.adaptive_json).read_text())
    text = render(res, src)
    if adaptive is not None:
        from .adaptive_results import render_adaptive

        text += "\n" + render_adaptive(adaptive, res)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


def merge_passkey(res: dict, other: dict) -> None:
    """Copy pass-key results of `other` (an eval run with --passkey) into `res`, by K:V pair."""
    def key(r):
        return r.get("config", f"{r['k']}:{r['v']}")

    pk = {key(r): r for r in other["results"] if "passkey" in r}
    for r in res["results"]:
        if key(r) in pk:
            r["passkey"] = pk[key(r)]["passkey"]
            r["passkey_mean"] = pk[key(r)]["passkey_mean"]
    res["passkey"] = other["passkey"]


def _grid(by: dict, key: str, fmt: str) -> list[str]:
    rows = ["| K \\ V | " + " | ".join(MATRIX) + " |", "|---|" + "---:|" * len(MATRIX)]
    for k in MATRIX:
        cells = []
        for v in MATRIX:
            r = by.get((k, v))
            cells.append(fmt.format(r[key]) if r is not None and r.get(key) is not None else "–")
        rows.append(f"| **{k}** | " + " | ".join(cells) + " |")
    return rows


def render(res: dict, src: str) -> str:
    s = res["settings"]
    by = {(r["k"], r["v"]): r for r in res["results"] if not r.get("per_layer")}
    out = [
        "# Results on the embedded model",
        "",
        f"Model `{Path(s['model']).name}` (sha256 `{s['model_sha256'][:16]}…`), {res['chunks']} chunks of "
        f"{s['ctx']} tokens of {s['text']}, second half of each chunk scored, against an f16/f16 cache; "
        f"attention rotation {'on' if s['attn_rot'] else 'off'}. Machine: {s['machine']}; "
        f"{s['native']}; measured {s['date']}, {s['seconds_quality']:.0f} s for the quality figures "
        f"(other jobs shared the two cores, so this is not a speed figure).",
        "",
        f"Rerun: `pyadaq results` (measures, then writes this file; `--passkey` adds pass-key "
        f"accuracy) or `pyadaq results --from-json {src}` to render saved figures.",
        "",
        "## Mean KL divergence against f16 (nats; lower is better)",
        "", *_grid(by, "kl_mean", "{:.4f}"), "",
        "## Perplexity (f16/f16: {:.4f})".format(by[("f16", "f16")]["ppl"]) if ("f16", "f16") in by else "## Perplexity",
        "", *_grid(by, "ppl", "{:.3f}"), "",
        "## Top-1 agreement with f16",
        "", *_grid(by, "top1", "{:.1%}"), "",
        "## Bits per cached value (K and V averaged, scales included)",
        "", *_grid(by, "bits_per_value", "{:.2f}"), "",
    ]
    if res.get("passkey"):
        pk = res["passkey"]
        out += ["## Pass-key accuracy", "",
                f"A 5-digit key hidden at depths {', '.join(map(str, pk['depths']))} of prompts of "
                f"{', '.join(map(str, pk['lengths']))} tokens, {pk['seeds']} seed(s), greedy answer "
                f"({pk.get('seconds', 0):.0f} s of wall time, other jobs sharing the cores). Mean over lengths "
                f"and depths, {len(pk['lengths']) * len(pk['depths']) * pk['seeds']} prompts per cell, so one "
                f"prompt is {100 / (len(pk['lengths']) * len(pk['depths']) * pk['seeds']):.0f} points "
                f"(– : not measured):", "",
                *_grid(by, "passkey_mean", "{:.0%}"), "", "By prompt length:", "",
                "| K:V | " + " | ".join(map(str, pk["lengths"])) + " |",
                "|---|" + "---:|" * len(pk["lengths"])]
        for r in res["results"]:
            if "passkey" in r:
                out.append(f"| {r['k']}:{r['v']} | " + " | ".join(
                    f"{r['passkey'].get(str(n), float('nan')):.0%}" for n in pk["lengths"]) + " |")
        out.append("")
    else:
        out += ["## Pass-key accuracy", "", "Not measured in this run (`pyadaq results --passkey`).", ""]
    out += ["## The paper's comparison at equal budget", ""]
    for hi, lo in (("q4_0", "kvq2"), ("q8_0", "q4_0")):
        a, b = by.get((hi, lo)), by.get((lo, hi))
        if not a or not b:
            continue
        ratio = b["kl_mean"] / a["kl_mean"]
        out.append(
            f"- K={hi} with V={lo} against K={lo} with V={hi} (both {a['bits_per_value']:.2f} bits per value): "
            f"KL {a['kl_mean']:.4f} against {b['kl_mean']:.4f}, perplexity {a['ppl']:.3f} against {b['ppl']:.3f}, "
            f"top-1 {a['top1']:.1%} against {b['top1']:.1%}"
            + (f", pass-key accuracy {a['passkey_mean']:.0%} against {b['passkey_mean']:.0%}. "
               if a.get("passkey_mean") is not None and b.get("passkey_mean") is not None else ". ")
            + (f"More bits for keys wins: {ratio:.1f} times less KL divergence." if ratio > 1 else
               f"More bits for values wins here: {1 / ratio:.1f} times less KL divergence."))
    out += ["", f"![KL divergence against bits per value]({Path(res.get('plot', 'results-matrix.png')).name})", ""]
    return "\n".join(out)
