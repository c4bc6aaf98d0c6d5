#!/usr/bin/env python3
"""Nanoseconds per value of the CPU backend's quantizer for cache types (what a context runs when
it writes K/V rows: `pyadaq_cpu_quantize`, the AVX2 path where the CPU has it) and of their
dequantization (`pyadaq_dequantize`: what the type's to_float runs, e.g. for every V row flash
attention reads), on 2^20 unit Gaussian values, the best of --reps runs, one thread.

    python scripts/kvt_quantize_speed.py [--types kvt2,kvt3,kvt4s,kvq2] [--reps 5] [--json F]

To compare two builds, run it once with each on PYTHONPATH (e.g. an older package installed with
`pip install --no-deps --target /tmp/oldpkg /tmp/old`).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default="kvt2,kvt3,kvt4s,kvq2")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)

    import pyadaq
    from pyadaq._native import native
    from pyadaq.report.machine import machine
    from pyadaq.types import cache_type

    n = native()
    x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    rows = []
    for name in args.types.split(","):
        t = cache_type(name.strip())
        out = np.zeros(len(x) // t.block_size * t.type_size, np.uint8)
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            rc = n.cpu.pyadaq_cpu_quantize(t.id, n.ffi.from_buffer("float[]", x), n.ffi.from_buffer(out), len(x))
            best = min(best, time.perf_counter() - t0)
            if rc != 0:
                sys.exit(f"{t.name}: pyadaq_cpu_quantize returned {rc}")
        y = np.zeros_like(x)
        best_deq = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            rc = n.base.pyadaq_dequantize(t.id, n.ffi.from_buffer(out), n.ffi.from_buffer("float[]", y), len(x))
            best_deq = min(best_deq, time.perf_counter() - t0)
            if rc != 0:
                sys.exit(f"{t.name}: pyadaq_dequantize returned {rc}")
        rows.append({"type": t.name, "ns_per_value": best / len(x) * 1e9,
                     "dequantize_ns_per_value": best_deq / len(x) * 1e9})
        print(f"{t.name:<8} {best / len(x) * 1e9:6.1f} ns per value to quantize, "
              f"{best_deq / len(x) * 1e9:6.2f} to dequantize")
    if args.json:
        from pyadaq.cli._common import write_json

        write_json({"machine": machine(), "build": n.build_info["info"], "package": pyadaq.__file__,
                    "rows": rows, "command": "scripts/kvt_quantize_speed.py " + " ".join(argv or sys.argv[1:])},
                   args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
