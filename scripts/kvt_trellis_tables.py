#!/usr/bin/env python3
"""Train the reconstruction tables of the row-trellis kvt types (kvt2r, kvt3r) and write them
where the formats read them: native/src/pyadaq-kvt-trellis.h (the C reference and its AVX2
paths) and pyadaq/kvt_trellis_tables.py (the numpy twin). Both are this script's output and are
committed; tests/test_kvtr.py checks that they hold the same float32 values.

A row-trellis type codes the values of one width k (1..3 bits) across a row of 256 values as one
tail-biting bitshift-trellis stream: value t owns k bits of the stream, and decodes as
table_k[window], the window being the stream's TRELLIS_STATE_BITS bits before value t's and its
own k bits (the state bits low, the value's bits high; at the stream's start the window wraps
to its end). The table of width k has 2^(k + TRELLIS_STATE_BITS) entries.

Training: Lloyd's iteration on unit Gaussian streams (--streams per round, --rounds rounds) of
STREAM_LENGTHS values (1 bit: kvt2r's 32; 2 bits: kvt2r's 128; 3 bits: 128, between kvt2r's 64
and kvt3r's 192: one table serves both): Viterbi coding with the current table (float64, no
tail-biting), then every window's entry the mean of the values it coded. The first table is
the means of 2^L equal slices of sorted Gaussian draws in a random order. The seed is fixed, so
a rerun writes the same tables (numpy's PCG64 and its Gaussian sampler).

Usage: python scripts/kvt_trellis_tables.py [--streams 4000] [--rounds 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STATE_BITS = 6
# training stream lengths: kvt2r (4,3,3,2,2,2,2,1) has streams of 64 values of 3 bits, 128 of 2
# and 32 of 1; kvt3r (5,4,3,3,3,3,3,3) one of 192 values of 3 bits (3 bits: trained between)
STREAM_LENGTHS = {1: 32, 2: 128, 3: 128}
SEED = 20261206


def viterbi(u: np.ndarray, table: np.ndarray, k: int) -> np.ndarray:
    """The least-squares windows of the streams u [N, n] (free start and end)."""
    n_streams, n = u.shape
    ns = 1 << STATE_BITS
    windows = np.arange(1 << (k + STATE_BITS))
    prev = windows & (ns - 1)
    cand = (np.arange(ns)[:, None] << k) | np.arange(1 << k)[None, :]  # next state's windows
    cost = np.zeros((n_streams, ns))
    backs = np.empty((n, n_streams, ns), dtype=np.int32)
    for t in range(n):
        tot = cost[:, prev] + (u[:, t:t + 1] - table[None, :]) ** 2
        c = tot[:, cand]
        j = c.argmin(axis=2)
        cost = np.take_along_axis(c, j[:, :, None], 2)[:, :, 0]
        backs[t] = cand[np.arange(ns)[None, :], j]
    s = cost.argmin(axis=1)
    out = np.empty((n_streams, n), dtype=np.int64)
    for t in range(n - 1, -1, -1):
        w = backs[t][np.arange(n_streams), s]
        out[:, t] = w
        s = w & (ns - 1)
    return out


def train(k: int, n: int, rng: np.random.Generator, streams: int, rounds: int) -> np.ndarray:
    size = 1 << (k + STATE_BITS)
    table = np.sort(rng.standard_normal(size * 64)).reshape(size, 64).mean(1)[rng.permutation(size)]
    for _ in range(rounds):
        u = rng.standard_normal((streams, n))
        w = viterbi(u, table, k).ravel()
        cnt = np.bincount(w, minlength=size)
        sums = np.bincount(w, weights=u.ravel(), minlength=size)
        table = np.where(cnt > 0, sums / np.maximum(cnt, 1), table)
    return table.astype(np.float32)


def _c_float(v) -> str:
    s = f"{float(v):.9g}"
    return (s if any(c in s for c in ".en") else s + ".0") + "f"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=4000, help="training streams per round")
    p.add_argument("--rounds", type=int, default=12, help="Lloyd rounds")
    args = p.parse_args(argv)
    from tqdm import tqdm

    rng = np.random.default_rng(SEED)
    tables = {k: train(k, STREAM_LENGTHS[k], rng, args.streams, args.rounds)
              for k in tqdm(sorted(STREAM_LENGTHS), desc="widths")}
    cmd = "python scripts/kvt_trellis_tables.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    head = [f"Reconstruction tables of the row-trellis kvt types: width k has 2^(k + {STATE_BITS}) entries,",
            "indexed by the window (the stream's state bits low, the value's own k bits high).",
            f"Written by `{cmd}`; do not edit."]
    h = ["// " + line for line in head] + ["", "#pragma once", "",
                                           f"#define PYADAQ_KVTR_STATE_BITS {STATE_BITS}"]
    for k, t in tables.items():
        h.append(f"#define PYADAQ_KVTR_TABLE_{k} {{ " + ", ".join(_c_float(v) for v in t) + " }")
    (ROOT / "native/src/pyadaq-kvt-trellis.h").write_text("\n".join(h) + "\n")
    py = ['"""' + "\n".join(head) + '\n"""', "", f"STATE_BITS = {STATE_BITS}", "", "TABLES = {"]
    for k, t in tables.items():
        py.append(f"    {k}: (")
        vals = [_c_float(v)[:-1] for v in t]  # 9 significant digits: the float32 reads back exactly
        for i in range(0, len(vals), 8):
            py.append("        " + ", ".join(vals[i:i + 8]) + ",")
        py.append("    ),")
    py.append("}")
    (ROOT / "pyadaq/kvt_trellis_tables.py").write_text("\n".join(py) + "\n")
    print("wrote native/src/pyadaq-kvt-trellis.h and pyadaq/kvt_trellis_tables.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
