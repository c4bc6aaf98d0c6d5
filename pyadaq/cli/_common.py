"""What several commands share, in one place: the model and text options and their checks, the
model options of chat/serve/demo and the pyadaq.Llama they make, number-list options, JSON
output, where generated files go, and the notice printed before a long measurement starts (what
it computes, about how long it takes, what of it is cached, and the faster alternative)."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_OUT = "pyadaq-results"  # `results` and `formats` write here unless --out says otherwise


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


def model_and_text(model_path, text_path):
    """(model path, ModelInfo, text or None) after the checks that need no native code."""
    model, info = resolve_model(model_path)
    return model, info, read_text_file(text_path) if text_path else None


def write_json(obj, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))
    print(f"wrote {path}")


def parse_ints(spec: str, what: str) -> list:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, not '{spec}'") from None


def parse_fractions(spec: str, what: str) -> list:
    """Comma-separated numbers between 0 and 1."""
    try:
        out = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, not '{spec}'") from None
    if any(not 0.0 <= d <= 1.0 for d in out):
        raise ValueError(f"{what} must lie between 0 and 1")
    return out


def check_configs(configs, info) -> None:
    """Uniform pairs against the model's head sizes; plan files against the model."""
    from pyadaq.plan.spec import CalSpec
    from pyadaq.runtime.kvconfig import Windowed
    from pyadaq.runtime.kvplan import load_checked
    from pyadaq.runtime.llama import validate_cache_types
    from pyadaq.types import cache_type

    for c in configs:
        c = c.base if isinstance(c, Windowed) else c
        calibrated = isinstance(c, CalSpec)
        c = c.base if calibrated else c
        if isinstance(c, tuple):
            validate_cache_types(info, c[0], c[1], flash_attn=True)
            need = [t for t in c if cache_type(t).calibrated]
            if need and not calibrated:
                raise ValueError(f"config '{c[0]}:{c[1]}' uses {', '.join(need)}, which stores a calibration's "
                                 f"coordinates: write it {c[0]}:{c[1]}+cal")
        elif c.kind == "plan":
            load_checked(c.arg, info)


def add_model_options(p) -> None:
    """The model and cache options of chat and serve."""
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--cache-type-k", default="q8_0", help="K cache type (default q8_0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cache-type-v", help="V cache type (default kvq2)")
    g.add_argument("--kv-budget", help="average bits per cached value: a per-layer plan; K/V for one budget per "
                   "side, a side a number or a type (q8_0/2.5: keys q8_0, values 2.5 bits on average)")
    g.add_argument("--kv-plan", help="per-layer plan file from `pyadaq plan`")
    p.add_argument("--kv-calibration", metavar="FILE",
                   help="KV calibration from `pyadaq calibrate`: the cache stores K and V in its coordinates")
    p.add_argument("--kv-window", type=int, default=0, metavar="N",
                   help="keep the K/V rows of the last N tokens in f16 beside the quantized cache (CPU only; "
                        "default 0: none)")
    p.add_argument("--ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    p.add_argument("--threads", type=int, help="CPU threads (default: llama-cpp-python's choice)")
    p.add_argument("--gpu-layers", type=int, default=-1, help="layers on the GPU when built with one (default all)")
    p.add_argument("--rpc", metavar="HOST:PORT,...",
                   help="put the model's layers (and their KV cache) on these `pyadaq tool rpc-server` processes")


def load_llama_from_args(args, **extra):
    """load_llama with the options of add_model_options."""
    if getattr(args, "rpc", None):
        extra.setdefault("rpc_servers", args.rpc)
    return load_llama(args.command, args.model, cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                      kv_plan=args.kv_plan, kv_budget=args.kv_budget, ctx=args.ctx, threads=args.threads,
                      gpu_layers=args.gpu_layers, kv_calibration=args.kv_calibration, kv_window=args.kv_window,
                      **extra)


def load_llama(command: str, model_path, *, cache_type_k: str = "q8_0", cache_type_v: str | None = None,
               kv_plan=None, kv_budget: float | str | None = None, ctx: int = 4096, threads: int | None = None,
               gpu_layers: int = -1, kv_calibration=None, kv_window: int = 0, **extra):
    """(model path, ModelInfo, pyadaq.Llama) for a command, every check done before native code."""
    from pyadaq.llama import Llama
    from pyadaq.model.calibration import calibration_for_model

    model, info = resolve_model(model_path)
    if kv_calibration is not None:
        extra["kv_calibration"] = calibration_for_model(kv_calibration, info)  # before the budget's calibration
    if ctx < 64:
        raise ValueError(f"--ctx {ctx} is too small (at least 64)")
    if info.n_ctx_train and ctx > info.n_ctx_train:
        raise ValueError(f"--ctx {ctx} is larger than the model's training context ({info.n_ctx_train})")
    if kv_window:
        from pyadaq.runtime.kv_window import check_kv_window

        check_kv_window(kv_window, True, gpu_layers)
        extra["kv_window"] = kv_window
    kw = dict(n_ctx=ctx, n_gpu_layers=gpu_layers, swa_full=False, **extra)
    if threads:
        kw["n_threads"] = threads
    if kv_plan or kv_budget is not None:
        if kv_budget is not None:
            from pyadaq.plan.calibrate import check_budget_range, default_types, kv_calibration_for
            from pyadaq.plan.planner import Budget

            # what Llama(kv_budget=...) calibrates: pyadaq.plan.calibrate.plan_for_budget's defaults,
            # for the KV calibration given, else the model's default one
            types = default_types("kl", "default")
            check_budget_range(info, kv_budget, types)
            if "kv_calibration" not in extra:
                extra["kv_calibration"] = kv_calibration_for(model, info, "default")
            announce_calibration(command, model, types, 512, 2, kv_calibration=extra["kv_calibration"],
                                 faster=f"`pyadaq plan --budget {Budget.parse(kv_budget).label} --sensitivity spectra "
                                        f"--kv-calibration default`, then `pyadaq {command} --kv-plan plan.json "
                                        f"--kv-calibration {extra['kv_calibration'].path}`", faster_passes=0)
        kw.update(kv_plan=kv_plan, kv_budget=kv_budget)
        # the plan decides K too; an explicit --cache-type-k is ignored (say so)
        if cache_type_k != "q8_0":
            print("pyadaq: --cache-type-k is ignored with a per-layer plan", file=sys.stderr)
    else:
        kw.update(cache_type_k=cache_type_k, cache_type_v=cache_type_v or "kvq2")
    return model, info, Llama(model, **kw)


def out_dir(path: str) -> Path:
    """The output directory of `results` / `formats`, created before anything is measured."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def counted(n: int, word: str, plural: str | None = None) -> str:
    """'1 chunk', '20 chunks' (plural: the plural when it is not word + 's')."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def about(seconds: float) -> str:
    """'under a second', 'about 40 seconds', 'about 25 minutes', 'about 2.5 hours'."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {counted(round(seconds), 'second')}"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} minutes"
    return f"about {seconds / 3600:.1f} hours"


def seconds_per_pass(model_path: str, n_ctx: int, n_threads: int | None = None) -> float:
    """Wall time of one scored chunk of n_ctx tokens, timed now: a forward pass with an f16
    cache, then KL and top-1 over its second half (the unit the estimates count in)."""
    import numpy as np

    from pyadaq.eval.metrics import Accumulator
    from pyadaq.eval.texts import default_text
    from pyadaq.runtime.context import Context, Model, quiet_native_logs

    quiet_native_logs()
    model = Model(model_path)
    try:
        tokens = np.resize(model.tokenize(default_text()[:16 * n_ctx]), n_ctx)
        ctx = Context(model, "f16", "f16", n_ctx, n_threads)
        try:
            ctx.logits(tokens[:8], 7)  # pages the weights in: the timed pass then costs what later ones do
            first = n_ctx // 2
            t0 = time.perf_counter()
            logits = ctx.logits(tokens, first)[:-1]
            Accumulator().add(logits, logits, tokens[first + 1:])  # scoring against a reference
            return time.perf_counter() - t0
        finally:
            ctx.close()
    finally:
        model.close()


def missing_reference(info, n_ctx: int, n_chunks: int, text: str | None = None) -> int:
    """How many of the first n_chunks f16 reference chunks (model of `info`, a ModelInfo; the
    default text unless given) the reference store in the cache directory lacks."""
    from pyadaq.eval.kl import ReferenceStore, cache_root
    from pyadaq.eval.texts import default_text

    text = text if text is not None else default_text()
    store = ReferenceStore(cache_root(), model_sha256=info.sha256,
                           text_sha256=hashlib.sha256(text.encode()).hexdigest(), n_ctx=n_ctx)
    return sum(not store.contains(i) for i in range(n_chunks))


def calibration_work(info, types: Sequence[str], n_ctx: int, n_chunks: int, kv_calibration=None) -> tuple:
    """(runs, forward passes) a calibration (pyadaq.plan.calibrate.calibrate, default text, with
    `kv_calibration`'s transforms when given) still needs: (0, 0) when its result is cached."""
    from pyadaq.plan.calibrate import calibration_items, missing_types

    todo = missing_types(info, types, None, n_ctx, n_chunks, kv_calibration)
    _, jobs, _ = calibration_items(info, todo, kv_calibration)
    if not jobs:
        return 0, 0
    return len(jobs), len(jobs) * n_chunks + missing_reference(info, n_ctx, n_chunks)


def announce(command: str, work: str, passes: int, model_path: str, n_ctx: int,
             n_threads: int | None = None, *, kept: str, faster: str | None = None,
             faster_passes: int | None = None) -> None:
    """One paragraph on standard error before a long measurement: `work` (what is computed),
    `passes` scored chunks of n_ctx tokens at the cost of one timed now, `kept` (what is cached
    or written), and `faster`, an alternative (`faster_passes` of the same chunks, if known)."""
    per = seconds_per_pass(model_path, n_ctx, n_threads)
    text = (f"pyadaq {command}: {work}: {counted(passes, 'forward pass', 'forward passes')} of {n_ctx} "
            f"tokens, {about(passes * per)} on this machine ({per:.2f} s a pass, timed just now). {kept}")
    if faster:
        text += f" Faster: {faster}" + (f", {about(faster_passes * per)}." if faster_passes else ".")
    print(textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False), file=sys.stderr,
          flush=True)


def announce_calibration(command: str, model_path: str, types: Sequence[str], n_ctx: int, n_chunks: int,
                         n_threads: int | None = None, *, faster: str, faster_passes: int,
                         kv_calibration=None) -> None:
    """The notice before pyadaq.plan.calibrate.calibrate runs, unless its result is cached."""
    from pyadaq.model.header import read_model_info
    from pyadaq.plan.calibrate import cache_dir
    from pyadaq.types import cache_type

    runs, passes = calibration_work(read_model_info(model_path), types, n_ctx, n_chunks, kv_calibration)
    if not passes:
        return
    lossy = [cache_type(t).name for t in types if cache_type(t).name != "f16"]
    work = (f"calibrating the sensitivities of {Path(model_path).name} (one layer's K or V at a time in "
            f"{', '.join(lossy)}, all else f16{'' if kv_calibration is None else ', with the KV calibration'}: "
            f"{counted(runs, 'run')} on {counted(n_chunks, 'chunk')})")
    announce(command, work, passes, model_path, n_ctx, n_threads,
             kept=f"The result is cached in {cache_dir()}: later runs with this model and these settings "
                  "start at once.", faster=faster, faster_passes=faster_passes)


def print_eval_table(out: dict) -> None:
    """The table `pyadaq eval` prints, with the f16 reference's perplexity first."""
    from pyadaq.report.markdown import fixed

    s = out["settings"]
    print(f"\n{Path(s['model']).name}: {counted(out['chunks'], 'chunk')} of {s['ctx']} tokens of {s['text']}, "
          f"second half scored; KL and top-1 against an f16/f16 cache")
    has_pk = out.get("passkey") is not None
    labels = [r.get("config", r["k"] + ":" + r["v"]) for r in out["results"]]
    w = max([16, *map(len, labels)])
    head = (f"{'K:V':<{w}} {'bits/val':>8} {'KV MiB':>8} {'PPL':>9} {'KL mean':>9} {'± se':>7} {'top-1':>7} "
            f"{'RMS dp':>7}")
    print(head + ("  passkey" if has_pk else ""))
    if out.get("f16_ppl") is not None:
        print(f"{'(f16 reference)':<{w}} {16.0:>8.2f} {out['f16_kv_bytes'] / 2**20:>8.2f} {out['f16_ppl']:>9.4f}")
    for label, r in zip(labels, out["results"]):
        line = (f"{label:<{w}} {r['bits_per_value']:>8.2f} {r['kv_bytes'] / 2**20:>8.2f} "
                f"{r['ppl']:>9.4f} {fixed(max(r['kl_mean'], 0.0), 5):>9} {r['kl_stderr']:>7.5f} "
                f"{100 * r['top1']:>6.2f}% {100 * r['rms_dp']:>6.2f}%")
        if has_pk:
            line += f"  {100 * r['passkey_mean']:5.1f}%"
        print(line)


def check_port(host: str, port: int) -> None:
    """ValueError unless a server can listen on host:port (a TCP port, a resolvable host, free)."""
    import socket

    if not 0 < port < 65536:
        raise ValueError(f"--port {port} is not a TCP port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind(addr)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                         "(is another server running there?)") from None
    finally:
        s.close()
