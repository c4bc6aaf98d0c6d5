"""`pyadaq eval`: perplexity, KL divergence against f16, top-1 agreement and pass-key accuracy
for a list of K/V cache configurations."""

from __future__ import annotations

from pathlib import Path

from pyadaq.cli._common import (
    check_configs,
    parse_fractions,
    parse_ints,
    print_eval_table,
    read_text_file,
    resolve_model,
    write_json,
)
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
    p.add_argument("--kv-calibration", metavar="FILE",
                   help="KV calibration (pyadaq calibrate) for the configs written with +cal (default: the "
                        "model's default calibration, made once and cached)")
    p.add_argument("--passkey", action="store_true", help="also measure pass-key retrieval accuracy")
    p.add_argument("--passkey-lengths", default="1024,2048,4096,8192")
    p.add_argument("--passkey-depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--passkey-seeds", type=int, default=1)
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--no-rot", action="store_true", help="disable llama.cpp's attention rotation")
    p.add_argument("--no-cache", action="store_true", help="do not store or reuse the f16 reference")
    p.add_argument("--f32-weights", action="store_true",
                   help="measure on a float32 copy of the model (made once and cached): the cache types' own "
                        "error, without the noise of a quantized model's 8-bit activations (docs/KL_FLOOR.md)")
    p.add_argument("--json", help="write every figure and the run's settings here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.set_defaults(func=run)


def check_inputs(args):
    """Everything that can be checked before native code runs; returns (model, text, text_name, configs)."""
    from pyadaq.eval.texts import default_text
    from pyadaq.plan.spec import CalSpec, parse_configs
    from pyadaq.runtime.kvconfig import Windowed

    model, info = resolve_model(args.model)
    configs = parse_configs(args.configs)

    def base(c):  # a config under its window
        return c.base if isinstance(c, Windowed) else c

    if getattr(args, "kv_calibration", None) and not any(isinstance(base(c), CalSpec) for c in configs):
        # --kv-calibration alone: every config runs with it (a window stays outermost)
        configs = [Windowed(CalSpec(c.base), c.cells) if isinstance(c, Windowed) else CalSpec(c) for c in configs]
    check_configs(configs, info)
    if args.ctx < 16:
        raise ValueError(f"--ctx {args.ctx} is too small (at least 16 tokens)")
    if args.chunks < 1:
        raise ValueError("--chunks must be at least 1")
    lengths = parse_ints(args.passkey_lengths, "--passkey-lengths") if args.passkey else []
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
    from pyadaq.eval.run import evaluate
    from pyadaq.plan.spec import resolve_configs

    model, info, text, text_name, configs = check_inputs(args)
    run_on = model
    if args.f32_weights:
        from pyadaq.model.dequantize import dequantized_copy

        run_on = str(dequantized_copy(model))
    # plans are checked against the model they were made for; a calibration against the model it
    # runs on (with --f32-weights, the float32 copy)
    configs = resolve_configs(configs, model, calibration=args.kv_calibration, calibration_model=run_on)
    if run_on != model:
        from pyadaq.model.header import read_model_info

        model, info = run_on, read_model_info(run_on)
    lengths = parse_ints(args.passkey_lengths, "--passkey-lengths") if args.passkey else None
    depths = parse_fractions(args.passkey_depths, "--passkey-depths") if args.passkey else None
    out = evaluate(model, info, configs, text=text, text_name=text_name, ctx=args.ctx, chunks=args.chunks,
                   attn_rot=not args.no_rot, threads=args.threads, store=not args.no_cache,
                   passkey_lengths=lengths, passkey_depths=depths, passkey_seeds=args.passkey_seeds)
    print_eval_table(out)
    if args.json:
        write_json(out, args.json)
    if args.plot:
        plot_eval(out, args.plot)
        print(f"wrote {args.plot}")
    return 0
