"""`pyadaq analyze`: norms of keys and values per layer (weights and activations), the
paper's key-norm > value-norm check, JSON and PNG plots."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="K/V norm analysis per layer (weights and activations)", description=__doc__)
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--text", help="UTF-8 text file the model reads (default: the prose of pydoc_data.topics)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=4, help="chunks of text to read (default 4)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--json", help="write the analysis here")
    p.add_argument("--plot", help="write the norms plot here (PNG); the singular value plot goes "
                                  "beside it as NAME-spectra.png")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.plot:
        from pyadaq.report.plots import require_plots

        require_plots()  # before the run, not after it
    from pyadaq.cli._common import model_and_text, write_json
    from pyadaq.eval.analyze import analyze
    from pyadaq.report.plots import plot_norms, plot_spectra

    model, info, text = model_and_text(args.model, args.text)
    if args.ctx < 16 or (info.n_ctx_train and args.ctx > info.n_ctx_train):
        raise ValueError(f"--ctx {args.ctx} must be between 16 and the model's context ({info.n_ctx_train})")
    if args.chunks < 1:
        raise ValueError("--chunks must be at least 1")
    res = analyze(model, text, args.ctx, args.chunks, args.threads)
    print_summary(res)
    if args.json:
        write_json(res, args.json)
    if args.plot:
        plot_norms(res, args.plot)
        spectra = str(Path(args.plot).with_name(Path(args.plot).stem + "-spectra.png"))
        plot_spectra(res, spectra)
        print(f"wrote {args.plot} and {spectra}")
    return 0


def print_summary(res: dict) -> None:
    import numpy as np

    acts = res["activations"]
    print(f"\n{Path(res['settings']['model']).name}: {acts['tokens']} tokens read; norms per token, mean over KV heads")
    print(f"{'layer':>5} {'K frob':>9} {'V frob':>9} {'K/V':>6} {'K spec':>9} {'V spec':>9} "
          f"{'W_K frob':>9} {'W_V frob':>9}")
    for r, w in zip(acts["layers"], res["weights"]):
        kf, vf = np.mean(r["k"]["frobenius_per_token"]), np.mean(r["v"]["frobenius_per_token"])
        ks, vs = np.mean(r["k"]["spectral_per_token"]), np.mean(r["v"]["spectral_per_token"])
        wk = f"{w['k']['frobenius']:9.3f}" if w["k"] else f"{'-':>9}"
        wv = f"{w['v']['frobenius']:9.3f}" if w["v"] else f"{'-':>9}"
        print(f"{r['layer']:>5} {kf:9.3f} {vf:9.3f} {kf / vf:6.2f} {ks:9.3f} {vs:9.3f} {wk} {wv}")
    print(f"\nverdict: {res['verdict']['text']}")
