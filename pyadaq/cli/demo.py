"""`pyadaq demo`: one chat answer from the embedded model with 4.5-bit keys and 2.5-bit values in
the model's KV calibration (K=kvt4s, V=kvt2r: 3.5 bits per value, the values' low bits coded by a
trellis across each row of 256, the best 3.5-bit pair measured; V=kvt2 for a model whose value
heads are not a multiple of 256; the calibration is made once, about a minute on 2 cores, and
cached) and the K/V rows of the last 128 tokens also kept in f16 (a KV window: a short exchange is
attended as with an f16 cache), then the KV size and the KL divergence against an f16 cache of a
few configurations."""

from __future__ import annotations

import sys

CONFIGS = "f16:f16,q8_0:q4_0,q4_0:q4_0,q8_0:kvq2,q4_0:kvq2,q8_0:kvt2+cal,kvt4s:kvt2+cal"
ROW_CONFIGS = ",q8_0:kvt2r+cal,kvt4s:kvt2r+cal"  # added where the value heads fit rows of 256
WINDOW = 128  # the answer's KV window (cells; read by the CPU kernels: the answer runs on the CPU)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="a short demo on the embedded Gemma 3 270M", description=__doc__)
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--prompt", default="What are the three primary colors?")
    p.add_argument("--tokens", type=int, default=48, help="longest answer in tokens")
    p.add_argument("--chunks", type=int, default=3, help="chunks of 512 tokens for the KL table (default 3)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=run)


def run(args) -> int:
    from pyadaq.cli._common import announce, counted, load_llama, missing_reference, resolve_model
    from pyadaq.cli.chat_cmd import Chat
    from pyadaq.eval.kl import cache_root, compare
    from pyadaq.plan.calibrate import kv_calibration_for
    from pyadaq.plan.spec import parse_configs, resolve_configs
    from pyadaq.report.markdown import fixed
    from pyadaq.runtime.llama import undivided_head_sizes

    model, info = resolve_model(args.model)
    calibration = kv_calibration_for(model, info, "default")
    rows = not undivided_head_sizes(info, "kvt2r", "v")
    type_v = "kvt2r" if rows else "kvt2"
    configs_spec = CONFIGS + (ROW_CONFIGS if rows else "")
    model, info, llm = load_llama("demo", model, cache_type_k="kvt4s", cache_type_v=type_v, ctx=2048,
                                  threads=args.threads, kv_calibration=calibration, kv_window=WINDOW, gpu_layers=0,
                                  seed=0)
    bits = (llm.cache_type_k.bits_per_value + llm.cache_type_v.bits_per_value) / 2
    print(f"model: {model}\nKV cache: K=kvt4s, V={type_v} in the model's KV calibration ({bits:g} bits per value; "
          f"{calibration.path}), the last {WINDOW} tokens also in f16 ({llm.kv_window_bytes / 2**20:.2f} MiB)\n")
    print(f"> {args.prompt}")
    try:
        chat = Chat(llm, max_tokens=args.tokens, temperature=0.0)
        chat.turn(args.prompt, sys.stdout)
        print(chat.stats())
    finally:
        llm.close()
    n_configs = len(parse_configs(configs_spec))
    announce("demo", f"the KL table ({n_configs} configurations on {counted(args.chunks, 'chunk')} of "
             "512 tokens)",
             n_configs * args.chunks + missing_reference(info, 512, args.chunks), model, 512, args.threads,
             kept=f"The f16 reference is cached in {cache_root()} (later runs skip it).",
             faster="`pyadaq demo --chunks 1`" if args.chunks > 1 else None,
             faster_passes=n_configs + missing_reference(info, 512, 1))
    print(f"\nKL divergence against an f16 cache, {counted(args.chunks, 'chunk')} of 512 tokens of pydoc_data.topics "
          "(`pyadaq eval` for more):")
    configs = resolve_configs(parse_configs(configs_spec), model, calibration=calibration)
    res = compare(model, configs, n_ctx=512, n_chunks=args.chunks, n_threads=args.threads, store=True)
    f16 = res["f16_kv_bytes"]
    print(f"{'K:V':<15} {'bits/value':>10} {'KV MiB':>8} {'of f16':>7} {'KL mean':>9} {'top-1':>7}")
    for r in res["results"]:
        print(f"{r['config']:<15} {r['bits_per_value']:>10.2f} {r['kv_bytes'] / 2**20:>8.2f} "
              f"{r['kv_bytes'] / f16:>7.0%} {fixed(max(r['kl_mean'], 0.0), 4):>9} {r['top1']:>7.1%}")
    return 0
