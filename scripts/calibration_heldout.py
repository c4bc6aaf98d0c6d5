#!/usr/bin/env python3
"""Does a calibration hold on text it did not see? Calibrates the embedded model on the default
calibration text (the second half of pydoc topics), captures K and V on the start of the evaluation
text (--chunks chunks of --ctx tokens), and prints, averaged over layers, for K and for V:

* the share of the held-out energy (about the calibration's mean) in the calibration basis's first
  16 components, against the held-out data's own basis;
* the high-rate transform-coding gain bound, 10 log10(arithmetic / geometric mean of the
  variances along the basis), for the calibration basis and for the held-out data's own.

    scripts/calibration_heldout.py --ctx 2048 --chunks 2
"""

from __future__ import annotations

import argparse

import numpy as np

from pyadaq.eval.analyze import capture_moments
from pyadaq.eval.calibration import calibrate
from pyadaq.eval.texts import default_text
from pyadaq.model.embedded import embedded_model_path


def gain_db(var: np.ndarray) -> float:
    v = np.maximum(var.astype(np.float64), 1e-12 * float(var.max()))
    return float(10 * np.log10(v.mean() / np.exp(np.log(v).mean())))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=2)
    args = ap.parse_args()
    model = str(embedded_model_path())
    cal = calibrate(model)
    _, _, layers = capture_moments(model, default_text(), args.ctx, args.chunks, desc="held-out K/V")
    for kind in ("k", "v"):
        share_cal, share_own, g_cal, g_own = [], [], [], []
        for il, moments in enumerate(layers):
            if not moments:
                continue
            held = moments[kind].components()
            c = (cal.k if kind == "k" else cal.v)[il]
            cov = held.covariance().astype(np.float64)
            for h in range(held.n_head):
                dm = (held.mean[h] - c.mean[h]).astype(np.float64)
                u = c.basis[h].astype(np.float64)
                var_cal = np.einsum("ij,ik,kj->j", u, cov[h], u) + (u.T @ dm) ** 2
                share_cal.append(var_cal[:16].sum() / var_cal.sum())
                share_own.append(held.var[h][:16].sum() / held.var[h].sum())
                g_cal.append(gain_db(var_cal))
                g_own.append(gain_db(held.var[h]))
        print(f"{kind.upper()}: top-16 energy {np.mean(share_cal):.3f} in the calibration basis, "
              f"{np.mean(share_own):.3f} in its own; gain bound {np.mean(g_cal):.1f} dB (calibration basis), "
              f"{np.mean(g_own):.1f} dB (own)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
