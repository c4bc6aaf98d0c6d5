"""`pyadaq bench`: prompt-processing and generation speed per K/V cache configuration and
context depth, with the KV size and the ratio to f16/f16 measured in the same run."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

DEFAULT_CONFIGS = "f16:f16,q8_0:q8_0,q8_0:q4_0,q4_0:q4_0,q8_0:kvq3,q8_0:kvq2,q4_0:kvq2"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed per K/V cache configuration and context depth", description=__doc__)
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="K:V pairs, plan:FILE or budget:BITS; f16:f16 is added as the baseline "
                        f"(default {DEFAULT_CONFIGS})")
    p.add_argument("--kv-calibration", metavar="FILE",
                   help="KV calibration for the configs written with +cal (default: the model's default calibration)")
    p.add_argument("--depths", default="0,1024,4096", help="tokens already in the cache (default 0,1024,4096)")
    p.add_argument("--n-prompt", type=int, default=512, help="prompt tokens per pp test (0: skip; default 512)")
    p.add_argument("--n-gen", type=int, default=64, help="generated tokens per tg test (0: skip; default 64)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--batch", type=int, default=512, help="tokens per decode call for pp (default 512)")
    p.add_argument("--no-swa-full", dest="swa_full", action="store_false",
                   help="sliding-window layers (Gemma 3 and other iSWA models) keep only their window, as in "
                        "llama-server and llama-bench (default: the whole context, llama.cpp's library default and "
                        "pyadaq.Llama's)")
    p.add_argument("--gpu-layers", type=int, help="layers on the GPU (default: all when built with a GPU backend)")
    p.add_argument("--json", help="write the figures and the run's settings here")
    p.add_argument("--plot", help="write a PNG plot here (speed against depth per config)")
    p.add_argument("--markdown", help="write a Markdown report here (docs/BENCHMARKS.md)")
    p.add_argument("--from-json", metavar="FILE",
                   help="write the table, --plot and --markdown from a saved --json run instead of measuring")
    p.add_argument("--section", metavar="TITLE",
                   help="with --markdown: write the report as the section '## TITLE' of that file, replacing a "
                        "section of the same title or adding it at the end")
    p.add_argument("--mem-bandwidth", type=float, metavar="GB/S",
                   help="the device's peak memory bandwidth: the report then gives tg against the bound "
                        "bandwidth / bytes read per token (e.g. 3350 for an H100 SXM)")
    p.set_defaults(func=run)


def _ints(spec: str, what: str) -> list:
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, not '{spec}'") from None
    if not out or any(x < 0 for x in out):
        raise ValueError(f"{what} must be non-negative integers")
    return out


def check_inputs(args):
    from pyadaq.cli._common import check_configs, resolve_model
    from pyadaq.plan.spec import parse_configs

    model, info = resolve_model(args.model)
    configs = parse_configs(args.configs)
    if ("f16", "f16") not in configs:
        configs.insert(0, ("f16", "f16"))
    check_configs(configs, info)
    depths = _ints(args.depths, "--depths")
    if args.reps < 1:
        raise ValueError("--reps must be at least 1")
    if args.n_prompt < 0 or args.n_gen < 0 or args.n_prompt + args.n_gen == 0:
        raise ValueError("--n-prompt and --n-gen must be >= 0 and not both 0")
    if args.batch < 1:
        raise ValueError("--batch must be at least 1")
    if args.section and not args.markdown:
        raise ValueError("--section names a section of the --markdown file: give --markdown too")
    for d in depths:
        need = d + max(args.n_prompt, args.n_gen)
        if info.n_ctx_train and need > info.n_ctx_train:
            raise ValueError(f"depth {d} + {max(args.n_prompt, args.n_gen)} tokens is beyond the model's context "
                             f"({info.n_ctx_train}) for {Path(model).name}")
    return model, info, configs, depths


def run(args) -> int:
    if args.plot:
        from pyadaq.report.plots import require_plots

        require_plots()  # before the run, not after it
    import shlex
    import sys

    from pyadaq._native import native
    from pyadaq._version import __version__
    from pyadaq.cli._common import write_json
    from pyadaq.eval.bench import run_bench
    from pyadaq.plan.spec import resolve_configs
    from pyadaq.report.machine import machine
    from pyadaq.report.plots import plot_bench

    command = "pyadaq " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] \
        else "pyadaq bench"
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        command = res["settings"].get("command", command)  # the command that measured it
    else:
        model, info, configs, depths = check_inputs(args)
        configs = resolve_configs(configs, model, calibration=args.kv_calibration)
        t0 = time.time()
        res = run_bench(model, configs, depths, args.n_prompt, args.n_gen, args.reps, args.threads, args.batch,
                        n_gpu_layers=args.gpu_layers, swa_full=args.swa_full)
        res["settings"] = {
            "model": model, "model_name": Path(model).name, "model_sha256": info.sha256, "pyadaq": __version__,
            "native": native().build_info["info"], "machine": machine(), "backend": res["backend"],
            "threads": args.threads, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "seconds": time.time() - t0, "command": command,
        }
    print_table(res)
    if args.json and not args.from_json:
        write_json(res, args.json)
    if args.plot:
        plot_bench(res, args.plot)
        print(f"wrote {args.plot}")
    if args.markdown:
        from pyadaq.report.markdown import render_bench, upsert_preamble, upsert_section

        md_path = Path(args.markdown)
        old = md_path.read_text() if md_path.exists() else ""
        if args.section:
            section = render_bench(res, command, args.mem_bandwidth, heading=f"## {args.section}")
            md_path.write_text(upsert_section(old, section))
        else:  # the report at the top; the file's sections stay
            md_path.write_text(upsert_preamble(old, render_bench(res, command, args.mem_bandwidth)))
        print(f"wrote {args.markdown}")
    return 0


def _fmt(mean, std):
    if mean is None:
        return f"{'-':>16}"
    return f"{mean:9.1f}{'':7}" if std is None else f"{mean:9.1f} ± {std:5.1f}"


def print_table(res: dict) -> None:
    s = res["settings"]
    reps = res["reps"]
    spread = "mean ± sd" if reps > 1 else "1 repetition: no spread"
    print(f"\n{s['model_name']} on {s['machine']} ({res['backend']}); pp{res['n_prompt']} and tg{res['n_gen']}, "
          f"{reps} repetition{'s' if reps != 1 else ''}, tokens per second ({spread}), ratio to f16/f16 at the same "
          "depth; peak RSS growth over each context's life")
    print(f"{'config':<16} {'depth':>6} {'KV MiB':>8} {'peak MiB':>8} {'pp t/s':>16} {'pp/f16':>6} {'tg t/s':>16} "
          f"{'tg/f16':>6}")
    for r in res["results"]:
        ratio = {k: (f"{r[k + '_vs_f16']:6.2f}" if r[k + "_vs_f16"] is not None else f"{'-':>6}") for k in ("pp", "tg")}
        peak = r.get("peak_rss_growth_bytes")
        print(f"{r['config']:<16} {r['depth']:>6} {r['kv_bytes'] / 2**20:8.2f} "
              f"{'-' if peak is None else f'{peak / 2**20:.1f}':>8} {_fmt(r['pp_mean'], r['pp_std'])} "
              f"{ratio['pp']} {_fmt(r['tg_mean'], r['tg_std'])} {ratio['tg']}")
    for n in res.get("noisy_baseline", []):
        print(f"warning: at depth {n['depth']} f16/f16's {n['test']} varied by {100 * n['f16_relative_sd']:.0f} % "
              f"against {100 * n['others_min']:.0f} % for the steadiest config: its ratios are mostly noise")
