"""`pyadaq eval`: perplexity, KL divergence against f16, top-1 agreement and pass-key accuracy
for a list of K/V cache configurations."""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from pathlib import Path

from pyadaq.report.plots import plot_eval, require_plots

DEFAULT_CONFIGS = "f16:f16,q8_0:q8_0,q8_0:q4_0,q4_0:q4_0,q8_0:kvq3,q8_0:kvq2,q4_0:kvq2"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="quality of K/V cache configurations against an f16 cache",
                       description=__doc__)
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--text", help="UTF-8 text file to score (default: the prose of pydoc_data.topics)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=20, help="number of chunks (default 20)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"K:V pairs, plan:FILE (a pyadaq plan) or budget:BITS[:kl|:norms] (planned on the fly), "
                        f"comma-separated (default {DEFAULT_CONFIGS})")
    p.add_argument("--passkey", action="store_true", help="also measure pass-key retrieval accuracy")
    p.add_argument("--passkey-lengths", default="1024,2048,4096,8192")
    p.add_argument("--passkey-depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--passkey-seeds", type=int, default=1)
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--no-rot", action="store_true", help="disable llama.cpp's attention rotation")
    p.add_argument("--no-cache", action="store_true", help="do not store or reuse the f16 reference")
    p.add_argument("--json", help="write every figure and the run's settings here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.set_defaults(func=run)


def _ints(spec: str, what: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, not '{spec}'") from None


def _floats(spec: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, not '{spec}'") from None
    if any(not 0.0 <= d <= 1.0 for d in out):
        raise ValueError(f"{what} must lie between 0 and 1")
    return out


def resolve_model(path):
    """(model path, ModelInfo): the given GGUF or the embedded model, checked from its header."""
    from pyadaq.model.header import read_model_info

    if path:
        model = path
    else:
        from pyadaq.model.embedded import embedded_model_path

        model = str(embedded_model_path())
    return model, read_model_info(model)


def read_text_file(path) -> str:
    """A UTF-8 text file's contents; ValueError naming the file when it is not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None


def write_json(obj, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))
    print(f"wrote {path}")


def check_configs(configs, info) -> None:
    """Uniform pairs against the model's head sizes; plan files against the model."""
    from pyadaq.runtime.llama import validate_cache_types

    for c in configs:
        if isinstance(c, tuple):
            validate_cache_types(info, c[0], c[1], flash_attn=True)
        elif c.kind == "plan":
            from pyadaq.runtime.kvplan import KVPlan, check_plan

            check_plan(KVPlan.load(c.arg), info, info.sha256)


def check_inputs(args):
    """Everything that can be checked before native code runs; returns (model, text, text_name, configs)."""
    from pyadaq.eval.texts import default_text
    from pyadaq.plan.spec import parse_configs

    model, info = resolve_model(args.model)
    configs = parse_configs(args.configs)
    check_configs(configs, info)
    if args.ctx < 16:
        raise ValueError(f"--ctx {args.ctx} is too small (at least 16 tokens)")
    if args.chunks < 1:
        raise ValueError("--chunks must be at least 1")
    lengths = _ints(args.passkey_lengths, "--passkey-lengths") if args.passkey else []
    for n in [args.ctx, *lengths]:
        if info.n_ctx_train and n > info.n_ctx_train:
            raise ValueError(f"a context of {n} tokens is larger than the model's training context "
                             f"({info.n_ctx_train}) for {Path(model).name}")
    if args.text:
        text, text_name = read_text_file(args.text), str(Path(args.text))
    else:
        text, text_name = default_text(), "pydoc_data.topics"
    return model, info, text, text_name, configs


def run(args) -> int:
    if args.plot:
        require_plots()  # before the run, not after it
    from pyadaq._native import native
    from pyadaq._version import __version__
    from pyadaq.eval.kl import compare
    from pyadaq.plan.spec import resolve_configs
    from pyadaq.report.machine import machine

    model, info, text, text_name, configs = check_inputs(args)
    configs = resolve_configs(configs, model)
    t0 = time.time()
    res = compare(model, configs, text=text, n_ctx=args.ctx, n_chunks=args.chunks, attn_rot=not args.no_rot,
                  n_threads=args.threads, store=not args.no_cache)
    quality_s = time.time() - t0
    passkey = None
    if args.passkey:
        from pyadaq.eval.passkey import run_passkey

        t1 = time.time()
        passkey = run_passkey(model, configs, lengths=_ints(args.passkey_lengths, "--passkey-lengths"),
                              depths=_floats(args.passkey_depths, "--passkey-depths"),
                              seeds=args.passkey_seeds, n_threads=args.threads, attn_rot=not args.no_rot)
        passkey["seconds"] = time.time() - t1
        for r in res["results"]:
            rows = [p for p in passkey["results"] if p["config"] == r["config"]]
            r["passkey"] = {str(p["length"]): p["accuracy"] for p in rows}
            r["passkey_mean"] = sum(p["accuracy"] for p in rows) / len(rows)
    out = {
        "settings": {
            "model": model, "model_sha256": info.sha256, "text": text_name,
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "ctx": args.ctx, "chunks": res["chunks"],
            "attn_rot": not args.no_rot, "pyadaq": __version__, "native": native().build_info["info"],
            "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "seconds_quality": quality_s,
        },
        **res,
        "passkey": passkey,
    }
    print_table(out)
    if args.json:
        write_json(out, args.json)
    if args.plot:
        plot_eval(out, args.plot)
        print(f"wrote {args.plot}")
    return 0


def print_table(out: dict) -> None:
    s = out["settings"]
    print(f"\n{Path(s['model']).name}: {out['chunks']} chunks of {s['ctx']} tokens of {s['text']}, "
          f"second half scored; KL and top-1 against an f16/f16 cache")
    has_pk = out.get("passkey") is not None
    head = f"{'K:V':<16} {'bits/val':>8} {'KV MiB':>8} {'PPL':>9} {'KL mean':>9} {'± se':>7} {'top-1':>7} {'RMS dp':>7}"
    print(head + ("  passkey" if has_pk else ""))
    for r in out["results"]:
        line = (f"{r.get('config', r['k'] + ':' + r['v']):<16} {r['bits_per_value']:>8.2f} "
                f"{r['kv_bytes'] / 2**20:>8.2f} "
                f"{r['ppl']:>9.4f} {r['kl_mean']:>9.5f} {r['kl_stderr']:>7.5f} {100 * r['top1']:>6.2f}% "
                f"{100 * r['rms_dp']:>6.2f}%")
        if has_pk:
            line += f"  {100 * r['passkey_mean']:5.1f}%"
        print(line)
