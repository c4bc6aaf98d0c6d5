"""Would levels trained for the kvt types' own search beat the unit Gaussian's Lloyd-Max levels?

The kvt types round x / d to the Lloyd-Max levels of a unit Gaussian, d the block's searched
scale; x / d is not quite a unit Gaussian (d follows each block's rms). This runs Lloyd's
iteration through the numpy twin itself (pyadaq.quants_ref): quantize unit Gaussian blocks,
move each level of each width to the (d^2-weighted) mean of the x / d it received, repeat; then
prints the weighted squared error (positions weighted 4^width, as the search weighs them) of the
trained levels against the standard ones on fresh data.

    python scripts/kvt_trained_levels.py [--types kvt2 kvt3] [--iters 8]
"""

from __future__ import annotations

import argparse

import numpy as np

from pyadaq import quants_ref as qr


def weighted_error(name: str, x: np.ndarray) -> float:
    t = qr.KVT_TYPES[name]
    y = qr.dequantize(name, qr.quantize(name, x.reshape(-1)), x.size).reshape(x.shape)
    return float(((x - y).astype(np.float64) ** 2 * np.repeat(4.0 ** np.array(t.widths), 8)).sum())


def train_step(name: str, x: np.ndarray) -> dict:
    """New levels per width: each level the d^2-weighted mean of the x / d rounded to it."""
    t = qr.KVT_TYPES[name]
    q = qr.quantize(name, x.reshape(-1)).reshape(len(x), t.type_size)
    d = qr.kvt_scales()[q[:, 0]].astype(np.float64)
    out = {}
    for w in sorted({w for w in t.widths if w}):
        lv = qr.kvt_levels(w).astype(np.float64)
        cols = np.concatenate([np.arange(8 * g, 8 * g + 8) for g, ww in enumerate(t.widths) if ww == w])
        u = (x[:, cols] / d[:, None]).ravel()
        wt = np.repeat(d ** 2, len(cols))
        i = np.searchsorted((lv[1:] + lv[:-1]) / 2, u)
        out[w] = np.array([np.average(u[i == k], weights=wt[i == k]) if (i == k).any() else lv[k]
                           for k in range(1 << w)]).astype(np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["kvt2", "kvt3"])
    ap.add_argument("--iters", type=int, default=8)
    args = ap.parse_args()
    rng = np.random.default_rng(5)
    train = rng.standard_normal((2048, 64)).astype(np.float32)
    test = rng.standard_normal((2048, 64)).astype(np.float32)
    standard = {w: qr.kvt_levels(w).copy() for w in range(1, qr.KVT_MAX_BITS + 1)}
    for name in args.types:
        base = weighted_error(name, test)
        try:
            for _ in range(args.iters):
                qr._KVT_LEVELS.update(train_step(name, train))
            trained = weighted_error(name, test)
        finally:
            qr._KVT_LEVELS.update(standard)
        print(f"{name}: weighted squared error with trained levels {trained / base:.4f}x the standard levels'")


if __name__ == "__main__":
    main()
