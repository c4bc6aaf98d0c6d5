#!/usr/bin/env python3
"""How much a trellis code could gain over the scalar Lloyd-Max levels of the kvt types, on unit
Gaussian data (a research measurement for docs/FORMATS.md, not a format pyadaq has).

The kvt types (native/src/pyadaq-kvt.c) round every value alone to the Lloyd-Max levels of its
group's width. A bitshift trellis (the decoder of QTIP, Tseng et al. 2024) decodes value t from
a window of the last L bits of the block's bit stream, through a table of 2^L reconstruction
values per width: decoding stays a table lookup per value, and the encoder (Viterbi over the
2^L windows) chooses the bits jointly, which is where the gain comes from. Two measurements:

* one width alone: blocks of 64 values at k bits each (k = 1, 2, 3) and windows of L bits;
* a kvt block: the 64 values of a profile (e.g. kvt2's 4,3,3,2,2,2,1,1) in one stream, each value
  shifting in its group's width, the error weighted 4^width as the kvt scale search weighs it
  (a direction given a bit more carries four times the variance).

* --per-width PROFILE: a kvt block coded as one stream per width (the values of the groups of one
  width together, in block order), each stream tail-biting on its own; with --heads-of N the
  streams of N blocks (a head of N x 64 values) are joined, which makes them N times longer.
  Reports the block's weighted error of all streams together against the scalar levels'.

The first two report a block's squared error, each value's weighted 4^width (so rows of one width are the
per-value mean squared error times 64 * 4^width), mean over the measured blocks, for the trellis
and for the scalar levels (the Lloyd-Max distortions of a unit Gaussian), and the gain in dB.

The tables are trained by Lloyd iterations (Viterbi, then each window's value the mean of what it
coded) on data other than the measured blocks; the measured blocks are coded tail-biting (the
stream wraps: the first window's older bits are the stream's last bits), in two passes.

Usage: scripts/trellis_trial.py [--blocks 1500] [--json F]
       scripts/trellis_trial.py --per-width 4,3,3,3,2,2,1,1 [--heads-of 4] [--extra-bits 4] [--json F]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

LLOYD_MAX = {0: 1.0, 1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499, 6: 0.000642}


def viterbi(x, tables, widths, L, weights, start=None):
    """x [N, T] coded with per-value widths (all > 0); returns (weighted error [N], windows [N, T])."""
    n, t_len = x.shape
    s_all = np.arange(1 << L)
    cost, backs = None, []
    for t in range(t_len):
        k = int(widths[t])
        local = weights[t] * (x[:, t:t + 1] - tables[k][None, :]) ** 2
        if t == 0:
            cost = local
            if start is not None:  # the window's older L-k bits are the stream's last ones
                keep = (s_all[None, :] >> k) == (start[:, None] & ((1 << (L - k)) - 1))
                cost = np.where(keep, cost, np.inf)
            backs.append(None)
            continue
        pred = (s_all[:, None] >> k) | (np.arange(1 << k)[None, :] << (L - k))  # [windows, 2^k]
        pc = cost[:, pred]
        j = pc.argmin(axis=2)
        cost = np.take_along_axis(pc, j[:, :, None], 2)[:, :, 0] + local
        backs.append(pred[s_all[None, :], j].astype(np.int32))
    states = np.empty((n, t_len), dtype=np.int64)
    states[:, -1] = cost.argmin(axis=1)
    err = cost[np.arange(n), states[:, -1]]
    for t in range(t_len - 1, 0, -1):
        states[:, t - 1] = backs[t][np.arange(n), states[:, t]]
    return err, states


def trained_tables(widths, L, weights, rng, blocks=1200, iters=10):
    size = 1 << L
    tables = {k: np.sort(rng.standard_normal(size * 64)).reshape(size, 64).mean(1)[rng.permutation(size)]
              for k in {int(w) for w in widths}}
    for _ in range(iters):
        x = rng.standard_normal((blocks, len(widths)))
        _, st = viterbi(x, tables, widths, L, weights)
        for k in tables:
            sel = widths == k
            s, v = st[:, sel].ravel(), x[:, sel].ravel()
            cnt = np.bincount(s, minlength=size)
            tables[k] = np.where(cnt > 0, np.bincount(s, weights=v, minlength=size) / np.maximum(cnt, 1), tables[k])
    return tables


def measure(widths, L, rng, blocks):
    widths = np.asarray(widths)
    weights = 4.0 ** widths
    tables = trained_tables(widths, L, weights, rng)
    x = rng.standard_normal((blocks, len(widths)))
    _, st = viterbi(x, tables, widths, L, weights)
    err, _ = viterbi(x, tables, widths, L, weights, start=st[:, -1])
    trellis = float(err.mean())
    scalar = float(sum(w * LLOYD_MAX[int(k)] for w, k in zip(weights, widths)))
    return trellis, scalar


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=1500, help="measured blocks of 64 values per row")
    p.add_argument("--json")
    p.add_argument("--per-width", help="a kvt profile (8 widths): one stream per width instead of the default rows")
    p.add_argument("--heads-of", type=int, default=1, help="with --per-width: join the streams of this many blocks")
    p.add_argument("--extra-bits", type=int, default=4,
                   help="with --per-width: window bits beyond the width (L = width + this)")
    args = p.parse_args(argv)
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    if args.per_width:
        return per_width(args, rng, argv)
    rows = [(f"{k} bits alone", (k,) * 64, L) for k in (1, 2, 3) for L in (k + 4, k + 6)]
    rows += [("kvt2 block 4,3,3,2,2,2,1,1", np.repeat((4, 3, 3, 2, 2, 2, 1, 1), 8), L) for L in (8, 10)]
    rows += [("kvt3 block 5,4,4,3,3,3,2,2", np.repeat((5, 4, 4, 3, 3, 3, 2, 2), 8), 9)]
    out = []
    for label, widths, L in tqdm(rows, desc="codes"):
        trellis, scalar = measure(widths, L, rng, args.blocks)
        out.append({"code": label, "window_bits": L, "trellis_error": trellis, "scalar_error": scalar,
                    "gain_db": 10 * np.log10(scalar / trellis)})
    print(f"{'code':>28} {'L':>3} {'trellis':>9} {'scalar':>9} {'gain':>8}")
    for r in out:
        print(f"{r['code']:>28} {r['window_bits']:>3} {r['trellis_error']:>9.4g} {r['scalar_error']:>9.4g} "
              f"{r['gain_db']:>+7.2f} dB")
    if args.json:
        from pyadaq.cli._common import write_json

        write_json({"blocks": args.blocks, "rows": out, "command": "scripts/trellis_trial.py " +
                    " ".join(argv or sys.argv[1:])}, args.json)
    return 0


def per_width(args, rng, argv) -> int:
    """One stream per width of a profile (--per-width), each the values of that width in
    --heads-of blocks, tail-biting; the block's weighted error summed over the streams."""
    from tqdm import tqdm

    profile = tuple(int(w) for w in args.per_width.split(","))
    if len(profile) != 8 or any(w < 0 or w > 6 for w in profile):
        raise SystemExit("--per-width: 8 widths of 0..6 bits")
    rows, trellis_total, scalar_total = [], 0.0, 0.0
    for k in tqdm(sorted({w for w in profile if w}, reverse=True), desc="widths"):
        n = 8 * profile.count(k) * args.heads_of
        L = k + args.extra_bits
        trellis, scalar = measure((k,) * n, L, rng, max(200, args.blocks // args.heads_of))
        # per block of 64: the stream's error (weighted 4^k per value) over the blocks it spans
        trellis_total += trellis / args.heads_of
        scalar_total += scalar / args.heads_of
        rows.append({"width": k, "stream_values": n, "window_bits": L,
                     "gain_db": 10 * np.log10(scalar / trellis)})
    zero = sum(8 * 1.0 for w in profile if w == 0)  # a 0-bit value loses its variance: no code helps
    gain = 10 * np.log10((scalar_total + zero) / (trellis_total + zero))
    print(f"profile {args.per_width}, streams of {args.heads_of} block(s), L = width + {args.extra_bits}")
    for r in rows:
        print(f"  width {r['width']}: {r['stream_values']:>3} values per stream, L = {r['window_bits']:>2}: "
              f"{r['gain_db']:+.2f} dB")
    print(f"  the block's weighted error: {gain:+.2f} dB")
    if args.json:
        from pyadaq.cli._common import write_json

        write_json({"profile": profile, "heads_of": args.heads_of, "extra_bits": args.extra_bits,
                    "blocks": args.blocks, "widths": rows, "block_gain_db": gain,
                    "command": "scripts/trellis_trial.py " + " ".join(argv or sys.argv[1:])}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
