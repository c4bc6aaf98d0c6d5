"""`pyadaq calibrate`: per layer and KV head, the mean and principal components of the keys (as
cached: after RoPE) and of the values while the model reads a text, and the key and value of the
BOS token at position 0, written as a GGUF calibration file. The default text is the second half
of pydoc_data.topics (as short chat exchanges, then as prose), which evaluations do not read. A
calibration fits the kind of text it reads and the positions it reaches: give --text like the
text the model will read and --ctx at least its context."""

from __future__ import annotations


def add_parser(sub) -> None:
    from pyadaq.eval.calibration import DEFAULT_CHUNKS, DEFAULT_CTX

    p = sub.add_parser("calibrate", help="K/V means and principal components per layer and head (GGUF)",
                       description=__doc__)
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--text", help="UTF-8 text file the model reads (default: the second half of "
                                  "pydoc_data.topics, as chat exchanges and as prose)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"tokens per chunk (default {DEFAULT_CTX})")
    p.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help=f"chunks to read (default {DEFAULT_CHUNKS})")
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--out", help="also write the calibration here (it is always cached)")
    p.add_argument("--no-cache", action="store_true", help="measure again even when a cached result exists")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    import time

    import numpy as np

    from pyadaq.cli._common import counted, model_and_text
    from pyadaq.eval.calibration import cached_path, calibrate
    from pyadaq.eval.texts import calibration_text

    model, info, text = model_and_text(args.model, args.text)
    if args.ctx < 16 or (info.n_ctx_train and args.ctx > info.n_ctx_train):
        raise ValueError(f"--ctx {args.ctx} must be between 16 and the model's context ({info.n_ctx_train})")
    if args.chunks < 1:
        raise ValueError("--chunks must be at least 1")
    text = text if text is not None else calibration_text()
    cached = cached_path(model, text, args.ctx, args.chunks)
    if args.no_cache or not cached.exists():
        print(f"pyadaq calibrate: reading {counted(args.chunks, 'chunk')} of {args.ctx} tokens with "
              f"{info.path.name} (one forward pass each, with every layer's K and V captured); "
              f"the result is cached in {cached.parent}", file=sys.stderr, flush=True)
    t0 = time.time()
    cal = calibrate(model, text, args.ctx, args.chunks, out=args.out, n_threads=args.threads,
                    use_cache=not args.no_cache)
    print(f"{info.path.name}: {cal.text_tokens} tokens in {counted(cal.chunks, 'chunk')} of {cal.n_ctx}; "
          f"{len(cal.layers())} layers with a KV cache ({time.time() - t0:.0f} s)")
    print(f"{'layer':>5} {'K heads':>7} {'K d':>4} {'K top-8 var %':>13} {'K |mean|/rms':>12} "
          f"{'V d':>4} {'V top-8 var %':>13} {'V |mean|/rms':>12}")
    for il in cal.layers():
        cells = []
        for comps in (cal.k[il], cal.v[il]):
            var = comps.var.astype(np.float64)
            top = 100 * var[:, :8].sum(1) / np.maximum(var.sum(1), 1e-30)
            rms = np.sqrt(var.sum(1) + (comps.mean.astype(np.float64) ** 2).sum(1))
            rel = np.linalg.norm(comps.mean, axis=1) / np.maximum(rms, 1e-30)
            cells.append((comps.head_size, top.mean(), rel.mean()))
        (dk, tk, mk), (dv, tv, mv) = cells
        print(f"{il:>5} {cal.k[il].n_head:>7} {dk:>4} {tk:>13.1f} {mk:>12.2f} {dv:>4} {tv:>13.1f} {mv:>12.2f}")
    print(f"calibration: {cal.path}")
    return 0
