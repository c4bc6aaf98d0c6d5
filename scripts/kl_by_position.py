#!/usr/bin/env python3
"""KL divergence against an f16 cache by position in the context: where `pyadaq eval` scores
only the second half of each chunk (llama-perplexity's way), this scores every position, in
buckets (1-7, 8-31, 32-127, 128-255, 256-511 by default), so that what short contexts see (a
chat's first question, the first tokens of a document) shows.

    python scripts/kl_by_position.py [--model M] [--configs q8_0:kvt2+cal,q8_0:kvt2+cal+w64]
        [--chunks 10] [--ctx 512] [--step 512] [--kv-calibration FILE] [--json OUT] [--plot OUT.png]

Chunks and text are `pyadaq eval`'s (the default text; BOS first in each chunk); each chunk is
decoded from an empty cache in batches of --step tokens (the default: one batch, as eval; a
smaller step is how a stream of short messages reaches the cache, which matters for a KV window:
a window holds the last cells written before each batch's attention). Per bucket: KL mean ±
standard error over the chunks' bucket means, and top-1 agreement. Configs are `pyadaq eval`
specs (+cal, +wN).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

BUCKETS = ((1, 8), (8, 32), (32, 128), (128, 256), (256, 512))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--configs", default="q8_0:kvt2+cal,q8_0:kvt2+cal+w64,kvt4s:kvt2+cal,kvt4s:kvt2+cal+w64")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--step", type=int, default=None, help="tokens per decode call (default: the whole chunk)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--kv-calibration", metavar="FILE")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--plot", metavar="OUT.png")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from pyadaq.cli._common import resolve_model
    from pyadaq.eval.kl import chunks as make_chunks
    from pyadaq.eval.metrics import log_softmax
    from pyadaq.eval.texts import default_text
    from pyadaq.plan.spec import parse_configs, resolve_configs
    from pyadaq.report.machine import machine
    from pyadaq.runtime.context import Model, quiet_native_logs
    from pyadaq.runtime.kvconfig import config_label, open_context

    if args.plot:
        from pyadaq.report.plots import require_plots

        require_plots()
    buckets = [(a, min(b, args.ctx)) for a, b in BUCKETS if a < args.ctx]
    quiet_native_logs()
    model_path, _ = resolve_model(args.model)
    configs = resolve_configs(parse_configs(args.configs), model_path, calibration=args.kv_calibration)
    model = Model(model_path, n_gpu_layers=0)
    t0 = time.time()
    try:
        toks = model.tokenize(default_text())
        bos = int(toks[0]) if model.adds_bos else None
        chs = make_chunks(toks, args.ctx, args.chunks, bos)
        step = args.step or args.ctx
        ctxs = [open_context(model, c, args.ctx, args.threads, n_batch=step) for c in [("f16", "f16"), *configs]]
        kl = np.zeros((len(configs), len(chs), len(buckets)))
        top1 = np.zeros_like(kl)
        try:
            for ic, ch in enumerate(tqdm(chs, desc="chunks")):
                def logprobs(ctx, ch=ch):
                    ctx.clear()
                    rows = []
                    for s0 in range(0, len(ch), step):  # a decode call keeps only its own logits
                        part = ch[s0:s0 + step]
                        ctx.decode(part, s0, logits_from=0)
                        rows += [ctx.logits_at(i).copy() for i in range(len(part))]
                    return log_softmax(np.stack(rows))

                ref = logprobs(ctxs[0])
                for j, ctx in enumerate(ctxs[1:]):
                    lp = logprobs(ctx)
                    per = np.sum(np.exp(ref) * (ref - lp), axis=-1)
                    same = ref.argmax(-1) == lp.argmax(-1)
                    for ib, (a, b) in enumerate(buckets):
                        kl[j, ic, ib] = per[a:b].mean()
                        top1[j, ic, ib] = same[a:b].mean()
                    del lp
                del ref
        finally:
            for c in ctxs:
                c.close()
    finally:
        model.close()

    def se(x):
        return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None

    rows = []
    for j, cfg in enumerate(configs):
        row = {"config": config_label(cfg), "buckets": []}
        for ib, (a, b) in enumerate(buckets):
            row["buckets"].append({"positions": [a, b - 1], "kl": float(kl[j, :, ib].mean()), "kl_se": se(kl[j, :, ib]),
                                   "top1": float(top1[j, :, ib].mean())})
        rows.append(row)
    head = " ".join(f"{f'{a}-{b - 1}':>17}" for a, b in buckets)
    print(f"{'config':28} {head}")
    for r in rows:
        cells = " ".join(f"{b['kl']:8.4f} ± {b['kl_se'] or 0:6.4f}" for b in r["buckets"])
        print(f"{r['config']:28} {cells}")
    out = {"command": "scripts/kl_by_position.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": model_path, "ctx": args.ctx, "chunks": len(chs), "step": step, "machine": machine(),
           "seconds": round(time.time() - t0, 1), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        from pyadaq.report.plots import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        mids = [np.sqrt(a * (b - 1)) if a > 0 else b / 2 for a, b in buckets]
        for r in rows:
            ax.errorbar(mids, [b["kl"] for b in r["buckets"]], yerr=[b["kl_se"] or 0 for b in r["buckets"]],
                        marker="o", capsize=3, label=r["config"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("position in the chunk (bucket's geometric middle)")
        ax.set_ylabel("KL against f16 (nats)")
        ax.set_title(f"KL by position: {len(chs)} chunks of {args.ctx}, batches of {step}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
