"""`pyadaq formats`: the measurement that chose pyadaq's KV-cache formats (docs/FORMATS.md;
`pyadaq formats --out docs` regenerates its table and figures).

Every candidate runs as the V cache (K = q8_0) and the chosen ones also as the K cache
(V = q8_0), on the embedded model, scored against an f16 cache like llama.cpp's perplexity
tool (chunks of --ctx tokens, second half of each chunk scored).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pyadaq.cli._common import DEFAULT_OUT, announce, counted, out_dir
from pyadaq.report.machine import machine
from pyadaq.report.plots import plot_formats, require_plots

CANDIDATES_V = ["q8_0", "q4_0", "q2_0", "kvq3", "kvq3_u32", "kvq3_u32m", "kvq3_n64",
                "kvq2", "kvq2_u32", "kvq2_u32m", "kvq2_n64"]
EXTRA = [("kvq3", "q8_0"), ("kvq2", "q8_0"), ("q4_0", "kvq2"), ("q4_0", "q4_0")]


def add_parser(sub) -> None:
    p = sub.add_parser("formats", help="compare the KV-cache format candidates by KL divergence")
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--configs", help="K:V pairs to run instead of the candidate list, e.g. q8_0:kvq2,q8_0:kvq3; "
                                      "K:V+cal runs a pair with the model's default KV calibration (the "
                                      "transform-coded kvt types need it)")
    p.add_argument("--no-rot", action="store_true", help="disable upstream's attention rotation")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"directory for the files below (default ./{DEFAULT_OUT})")
    p.add_argument("--json", default="formats.json", help="every figure, in --out (default %(default)s)")
    p.add_argument("--table", default="formats-table.md", help="markdown table, in --out (default %(default)s)")
    p.add_argument("--plot", default="formats.png",
                   help="PNG plot of KL divergence against bits, in --out (default %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    require_plots()  # before the run, not after it
    from pyadaq.eval.kl import compare
    from pyadaq.types import cache_type

    if args.model:
        model = args.model
    else:
        from pyadaq.model.embedded import embedded_model_path

        model = str(embedded_model_path())
    from pyadaq.cli._common import check_configs
    from pyadaq.plan.spec import parse_configs, resolve_configs

    if args.configs:
        from pyadaq.model.header import read_model_info

        configs = parse_configs(args.configs)
        check_configs(configs, read_model_info(model))  # before the calibration or any native code
        configs = resolve_configs(configs, model)  # +cal: the model's default calibration (made once, cached)
    else:
        configs = [("q8_0", v) for v in CANDIDATES_V] + EXTRA
    out = out_dir(args.out)
    json_path, table_path, plot_path = out / args.json, out / args.table, out / args.plot
    announce("formats", f"KL divergence of {counted(len(configs), 'K/V pair')} on "
             f"{counted(args.chunks, 'chunk')} of {args.ctx} tokens, with the f16 reference",
             (len(configs) + 1) * args.chunks, model, args.ctx,
             kept=("The model's default KV calibration stays cached; " if any(
                 getattr(c, "calibration", None) is not None for c in configs) else "Nothing is cached; ")
             + f"the figures go to {json_path}, {table_path} and {plot_path}.",
             faster="fewer pairs (`--configs`) or chunks (`--chunks`)")
    t0 = time.time()
    res = compare(model, configs, n_ctx=args.ctx, n_chunks=args.chunks, attn_rot=not args.no_rot)
    res["machine"] = machine()
    res["seconds"] = time.time() - t0
    json_path.write_text(json.dumps(res, indent=1))
    rows = ["| K | V | V bits/value | V format | KL mean ± se | KL p99 | top-1 | PPL | KV bytes (ctx) |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["results"]:
        v = cache_type(r["v"])
        cal = " (calibrated)" if r.get("calibrated") else ""
        rows.append(f"| {r['k']} | {r['v']} | {v.bits_per_value:.2f} | {describe(v.name)}{cal} | "
                    f"{r['kl_mean']:.4f} ± {r['kl_stderr']:.4f} | {r['kl_p99']:.3f} | {100 * r['top1']:.1f} % | "
                    f"{r['ppl']:.3f} | {r['kv_bytes']:,} |")
    table = "\n".join(rows)
    table_path.write_text(
        f"Model `{Path(model).name}`, {res['chunks']} chunks of {res['n_ctx']} tokens of pydoc_data.topics, "
        f"attention rotation {'on' if res['attn_rot'] else 'off'}; machine: {res['machine']}; "
        f"{res['seconds']:.0f} s.\n\n{table}\n")
    print(table)
    plot_formats(res, plot_path)
    print(f"wrote {json_path}, {table_path}, {plot_path}")
    return 0


def describe(name: str) -> str:
    from pyadaq.quants_ref import KVT_TYPES, KVTR_TYPES

    if name in KVT_TYPES:
        return f"bit profile {','.join(map(str, KVT_TYPES[name].widths))}, block 64, searched scale"
    if name in KVTR_TYPES:
        return (f"bit profile {','.join(map(str, KVTR_TYPES[name].widths))} per 64, rows of 256, "
                "trellis-coded widths 1-3")
    return {
        "kvq2": "Lloyd-Max levels, block 32, MSE-fitted scale",
        "kvq3": "Lloyd-Max levels, block 32, MSE-fitted scale",
        "kvq2_u32": "uniform levels, block 32, MSE-fitted scale",
        "kvq3_u32": "uniform levels, block 32, MSE-fitted scale",
        "kvq2_u32m": "uniform levels, block 32, scale from max",
        "kvq3_u32m": "uniform levels, block 32, scale from max",
        "kvq2_n64": "Lloyd-Max levels, block 64, MSE-fitted scale",
        "kvq3_n64": "Lloyd-Max levels, block 64, MSE-fitted scale",
        "q2_0": "upstream 2-bit weight type",
    }.get(name, "upstream")
