"""`pyadaq results`: RESULTS.md (in --out, default ./pyadaq-results; `--out docs` regenerates
docs/RESULTS.md), the K x V matrix on the embedded model and the paper's equal-budget
comparison, from one `pyadaq eval` run (or from its saved JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pyadaq.cli._common import (
    DEFAULT_OUT,
    announce,
    counted,
    missing_reference,
    out_dir,
    parse_fractions,
    parse_ints,
    print_eval_table,
    resolve_model,
    write_json,
)
from pyadaq.report.markdown import MATRIX, kv_grid
from pyadaq.report.plots import plot_eval

CTX = 512
PASSKEY_DEPTHS = "0.1,0.3,0.5,0.7,0.9"


def add_parser(sub) -> None:
    p = sub.add_parser("results", help="measure the K x V matrix and write RESULTS.md", description=__doc__)
    p.add_argument("--from-json", help="render from a saved `pyadaq eval --json` file instead of measuring")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"directory for RESULTS.md and the files below (default ./{DEFAULT_OUT})")
    p.add_argument("--json", default="results-matrix.json",
                   help="matrix figures, in --out (default %(default)s)")
    p.add_argument("--plot", default="results-matrix.png", help="matrix plot, in --out (default %(default)s)")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--passkey", action="store_true", help="also measure pass-key accuracy (long)")
    p.add_argument("--passkey-from", help="merge pass-key figures from another `pyadaq eval --passkey --json` file")
    p.add_argument("--passkey-lengths", default="1024,2048,4096", help="prompt lengths for --passkey")
    p.add_argument("--adaptive", action="store_true",
                   help="also measure the adaptive section: norm analysis, calibration, planned allocations "
                        "at --budgets against the uniform pairs (written to --adaptive-json)")
    p.add_argument("--budgets", default="3.0,4.5,6.0", help="bits per value for --adaptive")
    p.add_argument("--adaptive-json", default="results-adaptive.json",
                   help="adaptive figures, in --out: written by --adaptive, read when rendering if present "
                        "(default %(default)s)")
    p.add_argument("--calibrated", action="store_true",
                   help="also measure the calibrated section: the K x V matrix of the transform-coded kvt types "
                        "with the model's default KV calibration (written to --calibrated-json)")
    p.add_argument("--calibrated-json", default="results-calibrated.json",
                   help="calibrated figures, in --out: written by --calibrated, read when rendering if present "
                        "(default %(default)s)")
    p.set_defaults(func=run)


def configs() -> str:
    return ",".join(f"{k}:{v}" for k in MATRIX for v in MATRIX)


def run(args) -> int:
    from pyadaq.report.plots import require_plots

    require_plots()  # results always plots: say so before the run, not after it
    out = out_dir(args.out)
    json_path, plot_path, adaptive_path = out / args.json, out / args.plot, out / args.adaptive_json
    calibrated_path = out / args.calibrated_json
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if args.from_json:
        src = args.from_json
        res = json.loads(Path(src).read_text())
        model = res["settings"]["model"]
    else:
        from pyadaq.model.embedded import embedded_model_path

        model = str(embedded_model_path())
    if not args.from_json or args.adaptive or args.calibrated:
        announce_work(args, model, res["chunks"] if args.from_json else args.chunks, budgets)
    if not args.from_json:
        from pyadaq.eval.run import evaluate
        from pyadaq.eval.texts import default_text
        from pyadaq.plan.spec import parse_configs

        _, info = resolve_model(model)
        res = evaluate(model, info, parse_configs(configs()), text=default_text(), text_name="pydoc_data.topics",
                       ctx=CTX, chunks=args.chunks,
                       passkey_lengths=parse_ints(args.passkey_lengths, "--passkey-lengths") if args.passkey else None,
                       passkey_depths=parse_fractions(PASSKEY_DEPTHS, "passkey depths"))
        print_eval_table(res)
        write_json(res, json_path)
        plot_eval(res, plot_path)
        src = str(json_path)
    if args.passkey_from:
        merge_passkey(res, json.loads(Path(args.passkey_from).read_text()))
    if args.from_json:
        plot_eval(res, plot_path)
    adaptive = None
    if args.adaptive:
        from pyadaq.cli.adaptive_results import measure

        adaptive = measure(res, budgets, adaptive_path, out)
    elif adaptive_path.exists():
        adaptive = json.loads(adaptive_path.read_text())
    calibrated = None
    if args.calibrated:
        from pyadaq.cli.calibrated_results import measure as measure_calibrated

        calibrated = measure_calibrated(res, calibrated_path)
    elif calibrated_path.exists():
        calibrated = json.loads(calibrated_path.read_text())
    text = render(res, src, args.out, os.path.relpath(plot_path, out))
    if calibrated is not None:
        from pyadaq.cli.calibrated_results import render_calibrated

        text += "\n" + render_calibrated(calibrated, res, args.out)
    if adaptive is not None:
        from pyadaq.cli.adaptive_results import render_adaptive

        text += "\n" + render_adaptive(adaptive, res, args.out)
    (out / "RESULTS.md").write_text(text)
    print(f"wrote {out / 'RESULTS.md'}")
    return 0


def announce_work(args, model: str, chunks: int, budgets: list) -> None:
    """The notice before the measurement: the matrix (unless rendered from JSON), pass-key prompts
    and the adaptive section, in forward passes of CTX tokens."""
    from pyadaq._paths import cache_base
    from pyadaq.model.header import read_model_info

    info = read_model_info(model)
    work, passes = [], 0
    if not args.from_json:
        n = len(MATRIX) ** 2
        work.append(f"the K x V matrix ({n} configurations on {counted(args.chunks, 'chunk')} of "
                    f"{CTX} tokens)")
        passes += n * args.chunks + missing_reference(info, CTX, args.chunks)
        if args.passkey:
            lengths, depths = parse_ints(args.passkey_lengths, "--passkey-lengths"), PASSKEY_DEPTHS.split(",")
            work.append(f"pass-key accuracy ({n * len(lengths) * len(depths)} prompts of "
                        f"{', '.join(map(str, lengths))} tokens, counted as passes of {CTX})")
            passes += n * len(depths) * -(-sum(lengths) // CTX)
    if args.adaptive:
        from pyadaq.cli.adaptive_results import work as adaptive_work

        what, more = adaptive_work(info, budgets, chunks)
        work.append(what)
        passes += more
    if args.calibrated:
        from pyadaq.cli.calibrated_results import work as calibrated_work

        what, more = calibrated_work(info, chunks)
        work.append(what)
        passes += more
    cached = "f16 reference and the calibration" if args.adaptive or args.calibrated else "f16 reference"
    announce("results", "; ".join(work), passes, model, CTX,
             kept=f"The {cached} stay cached in {cache_base()} for later runs; the figures go to {args.out}/.",
             faster=None if args.from_json else f"`pyadaq results --from-json {Path(args.out) / args.json}` "
             "renders the figures of an earlier run without measuring")


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


def render(res: dict, src: str, out_dir: str = DEFAULT_OUT, plot: str = "results-matrix.png") -> str:
    """RESULTS.md from an eval run `res` (read from `src`), to be written in out_dir; `plot`: the
    matrix plot, relative to out_dir. Every figure in the text comes from `res`."""
    from pyadaq.model.embedded import EMBEDDED_SHA256

    s = res["settings"]
    by = {(r["k"], r["v"]): r for r in res["results"] if not r.get("per_layer")}
    name = Path(s["model"]).name
    out = [
        "# Results on the embedded model" if s["model_sha256"] == EMBEDDED_SHA256 else f"# Results on {name}",
        "",
        (f"Model `{name}` (sha256 `{s['model_sha256'][:16]}…`), {res['chunks']} chunks of "
        f"{s['ctx']} tokens of {s['text']}, second half of each chunk scored, against an f16/f16 cache; "
        f"attention rotation {'on' if s['attn_rot'] else 'off'}. Machine: {s['machine']}; "
        f"{s['native']}; measured {s['date']}, {s['seconds_quality']:.0f} s of wall time for the quality "
        f"figures (not a speed figure: `pyadaq bench` measures speed)."),
        "",
        (f"Rerun: `pyadaq results --out {out_dir}` (measures, then writes this file; `--passkey` adds pass-key "
        f"accuracy) or `pyadaq results --from-json {src} --out {out_dir}` to render saved figures."),
        "",
        "## Mean KL divergence against f16 (nats; lower is better)",
        "", *kv_grid(by, "kl_mean", "{:.4f}"), "",
        ("## Perplexity (f16/f16: {:.4f})".format(by[("f16", "f16")]["ppl"]) if ("f16", "f16") in by
         else "## Perplexity"),
        "", *kv_grid(by, "ppl", "{:.3f}"), "",
        "## Top-1 agreement with f16",
        "", *kv_grid(by, "top1", "{:.1%}"), "",
        "## Bits per cached value (K and V averaged, scales included)",
        "", *kv_grid(by, "bits_per_value", "{:.2f}"), "",
    ]
    if res.get("passkey"):
        pk = res["passkey"]
        out += ["## Pass-key accuracy", "",
                (f"A 5-digit key hidden at depths {', '.join(map(str, pk['depths']))} of prompts of "
                f"{', '.join(map(str, pk['lengths']))} tokens, {pk['seeds']} seed(s), greedy answer "
                f"({pk.get('seconds', 0):.0f} s of wall time). Mean over lengths "
                f"and depths, {len(pk['lengths']) * len(pk['depths']) * pk['seeds']} prompts per cell, so one "
                f"prompt is {100 / (len(pk['lengths']) * len(pk['depths']) * pk['seeds']):.0f} points "
                f"(– : not measured):"), "",
                *kv_grid(by, "passkey_mean", "{:.0%}"), "", "By prompt length:", "",
                "| K:V | " + " | ".join(map(str, pk["lengths"])) + " |",
                "|---|" + "---:|" * len(pk["lengths"])]
        for r in res["results"]:
            if "passkey" in r:
                out.append(f"| {r['k']}:{r['v']} | " + " | ".join(
                    f"{r['passkey'].get(str(n), float('nan')):.0%}" for n in pk["lengths"]) + " |")
        out.append("")
    else:
        out += ["## Pass-key accuracy", "", f"Not measured in this run (`pyadaq results --passkey --out {out_dir}`).",
                ""]
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
    out += ["", f"![KL divergence against bits per value]({plot})", ""]
    return "\n".join(out)
