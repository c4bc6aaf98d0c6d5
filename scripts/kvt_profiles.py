"""Candidate bit profiles of a transform-coded type, ranked by the error they would add to the
embedded model's values (or keys): for each profile, the squared error at each of a block's 64
positions on unit Gaussian values (the numpy twin's quantizer), weighted by the squared scales
each layer's calibrated coordinates are stored with (pyadaq.runtime.kv_transform), summed over
the layers; the same prediction as the planner's spectra source (pyadaq.plan.spectra).

    python scripts/kvt_profiles.py [--keys] [--ref kvt2] [--profiles 4,2,2,1,1,1,0,0 ... | --same-size]
                                   [--per-layer]

Prints each profile's bits per value (scale included) and its error relative to the reference
type's (kvt2, or kvt2s with --keys; --ref another kvt type). The default candidates are
1.5-bit profiles near kvt1's (--ref kvt1 --same-size ranks all of them); --same-size takes
every descending profile with the reference's bits instead. --per-layer also picks each layer's
best candidate and prints what that choice would save against the reference in every layer.
"""

from __future__ import annotations

import argparse

import numpy as np

from pyadaq import quants_ref as qr
from pyadaq.eval.calibration import calibrate
from pyadaq.model.embedded import embedded_model_path
from pyadaq.runtime.context import quiet_native_logs
from pyadaq.runtime.kv_transform import matrix_and_scale, part_components
from pyadaq.types import cache_type

CANDIDATES = ["4,2,2,1,1,1,0,0", "3,2,2,2,1,1,0,0", "4,2,2,2,1,0,0,0", "3,2,2,1,1,1,1,0", "3,3,2,1,1,1,0,0",
              "2,2,2,2,1,1,1,0"]


def position_errors(widths: tuple, n: int = 1 << 16) -> np.ndarray:
    """Mean squared error at each position of a 64-value block of unit Gaussians."""
    x = np.random.default_rng(20261205).standard_normal(n).astype(np.float32)
    t = qr.KvtSpec("candidate", 0, widths)
    y = qr._kvt_dequantize(t, qr._kvt_quantize(t, x.reshape(-1, 64)), n)
    return ((y - x).astype(np.float64) ** 2).reshape(-1, 64).mean(axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", action="store_true", help="rank for the keys instead of the values")
    ap.add_argument("--profiles", nargs="+", default=CANDIDATES, help="8 comma-separated widths each")
    ap.add_argument("--ref", help="the reference kvt type (default kvt2, kvt2s with --keys)")
    ap.add_argument("--same-size", action="store_true",
                    help="every descending profile with the reference's bits, instead of --profiles")
    ap.add_argument("--per-layer", action="store_true", help="also each layer's best candidate")
    args = ap.parse_args()
    quiet_native_logs()
    cal = calibrate(str(embedded_model_path()), progress=False)
    ref_name = args.ref or ("kvt2s" if args.keys else "kvt2")
    ref = cache_type(ref_name)
    profiles = {ref_name: qr.KVT_TYPES[ref_name].widths}
    if args.same_size:
        args.profiles = [",".join(map(str, w)) for w in _descending(sum(profiles[ref_name]))]
    for p in args.profiles:
        w = tuple(int(v) for v in p.split(","))
        if len(w) != 8 or not all(0 <= v <= qr.KVT_MAX_BITS for v in w):
            raise SystemExit(f"profile {p}: give 8 widths of 0..{qr.KVT_MAX_BITS} bits")
        profiles[p] = w
    errors = dict.fromkeys(profiles, 0.0)
    per_pos = {name: position_errors(w) for name, w in profiles.items()}
    layer_errors = []
    for il in cal.layers():
        comps = part_components(cal, il, not args.keys, ref)
        _, s = matrix_and_scale(comps, ref)  # every kvt profile stores the same coordinates
        s2 = s.astype(np.float64) ** 2
        here = {name: float((s2 * np.tile(pe, comps.head_size // 64)[None, :]).sum()) for name, pe in per_pos.items()}
        layer_errors.append((il, here))
        for name, e in here.items():
            errors[name] += e
    print(f"{'profile':<18} {'bits/value':>10} {'error / ' + ref_name:>14}")
    for name, w in sorted(profiles.items(), key=lambda kv: errors[kv[0]])[:20]:
        print(f"{name:<18} {(sum(w) + 1) / 8:>10.3f} {errors[name] / errors[ref_name]:>14.3f}")
    if args.per_layer:
        best_total = 0.0
        print(f"\n{'layer':>5} {'best profile':<18} {'error / ' + ref_name:>14}")
        for il, here in layer_errors:
            best = min(here, key=here.get)
            best_total += here[best]
            print(f"{il:>5} {best:<18} {here[best] / here[ref_name]:>14.3f}")
        print(f"each layer's best: {best_total / errors[ref_name]:.4f} of {ref_name}'s error over all layers")


def _descending(total: int, n: int = 8) -> list[tuple]:
    """Every profile of n non-increasing widths of 0..KVT_MAX_BITS that sum to total."""
    out = []

    def grow(prefix, left, cap):
        if len(prefix) == n:
            if left == 0:
                out.append(tuple(prefix))
            return
        for w in range(min(cap, left), -1, -1):
            grow([*prefix, w], left - w, w)

    grow([], total, qr.KVT_MAX_BITS)
    return out


if __name__ == "__main__":
    main()
