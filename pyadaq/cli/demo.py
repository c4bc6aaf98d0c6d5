"""`pyadaq demo`: generate with the embedded model at several KV-cache settings and show the sizes."""

from __future__ import annotations

import time


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="a short demo on the embedded Gemma 3 270M")
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--prompt", default="The three primary colors are")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--ctx", type=int, default=4096)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..embedded import embedded_model_path
    from ..llama import Llama

    model = args.model or str(embedded_model_path())
    print(f"model: {model}\n")
    base = None
    for k, v in (("f16", "f16"), ("q4_0", "q4_0"), ("q8_0", "kvq3"), ("q4_0", "kvq2")):
        # swa_full=False: Gemma 3's sliding-window layers keep only their window, as llama.cpp can
        llm = Llama(model, cache_type_k=k, cache_type_v=v, n_ctx=args.ctx, seed=0, swa_full=False)
        t0 = time.perf_counter()
        out = llm(args.prompt, max_tokens=args.tokens, temperature=0.0)
        dt = time.perf_counter() - t0
        size = llm.kv_cache_bytes
        base = base or size
        text = out["choices"][0]["text"].strip().replace("\n", " ")
        print(f"K={k:<5} V={v:<5} KV cache {size / 2**20:7.2f} MiB ({size / base:5.1%} of f16)  {dt:5.1f} s")
        print(f"    {args.prompt} {text}\n")
        llm.close()
    return 0
