"""Candidate bit profiles of a transform-coded type, ranked by the error they would add to the
embedded model's values (or keys): for each profile, the squared error at each of a block's 64
positions on unit Gaussian values (the numpy twin's quantizer), weighted by the squared scales
each layer's calibrated coordinates are stored with (pyadaq.runtime.kv_transform), summed over
the layers; the same prediction as the planner's spectra source (pyadaq.plan.spectra).

    python scripts/kvt_profiles.py [--keys] [--profiles 3,2,2,1,1,1,0,0 ...]

Prints each profile's bits per value (scale included) and its error relative to kvt2's (kvt2s's
with --keys). The default candidates are the 1.5-bit profiles kvt1 was chosen from.
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

CANDIDATES = ["3,2,2,1,1,1,0,0", "2,2,2,1,1,1,1,0", "4,2,2,1,1,0,0,0", "3,2,2,2,1,0,0,0", "3,3,2,1,1,0,0,0",
              "2,2,1,1,1,1,1,1"]


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
    args = ap.parse_args()
    quiet_native_logs()
    cal = calibrate(str(embedded_model_path()), progress=False)
    ref_name = "kvt2s" if args.keys else "kvt2"
    ref = cache_type(ref_name)
    profiles = {ref_name: qr.KVT_TYPES[ref_name].widths}
    for p in args.profiles:
        w = tuple(int(v) for v in p.split(","))
        if len(w) != 8 or not all(0 <= v <= qr.KVT_MAX_BITS for v in w):
            raise SystemExit(f"profile {p}: give 8 widths of 0..{qr.KVT_MAX_BITS} bits")
        profiles[p] = w
    errors = dict.fromkeys(profiles, 0.0)
    per_pos = {name: position_errors(w) for name, w in profiles.items()}
    for il in cal.layers():
        comps = part_components(cal, il, not args.keys, ref)
        _, s = matrix_and_scale(comps, ref)  # every kvt profile stores the same coordinates
        s2 = s.astype(np.float64) ** 2
        for name, pe in per_pos.items():
            errors[name] += float((s2 * np.tile(pe, comps.head_size // 64)[None, :]).sum())
    print(f"{'profile':<18} {'bits/value':>10} {'error / ' + ref_name:>14}")
    for name, w in sorted(profiles.items(), key=lambda kv: errors[kv[0]]):
        print(f"{name:<18} {sum(w) / 8 + 0.25:>10.3f} {errors[name] / errors[ref_name]:>14.3f}")


if __name__ == "__main__":
    main()
