"""Squared error of value caches on synthetic values with the calibration's statistics: Gaussian
rows with each layer's value mean and covariance (the embedded model's default calibration),
stored the way a calibrated context stores them (pyadaq.runtime.kv_transform), quantized with
the numpy twin, mapped back; relative to the rows' variance. Run: python scripts/kvt_synthetic.py
"""

from __future__ import annotations

import numpy as np

from pyadaq import quants_ref as qr
from pyadaq.eval.calibration import calibrate
from pyadaq.model.embedded import embedded_model_path
from pyadaq.runtime.kv_transform import kv_transforms


def main() -> None:
    cal = calibrate(str(embedded_model_path()), progress=False)
    n = cal.n_layer
    rng = np.random.default_rng(0)
    for il in cal.layers()[::6]:
        c = cal.v[il]
        chol = np.linalg.cholesky(c.covariance()[0].astype(np.float64) + 1e-9 * np.eye(c.head_size))
        x = (rng.standard_normal((2000, c.head_size)) @ chol.T + c.mean[0]).astype(np.float64)
        row = [f"layer {il:2d}"]
        for name in ("kvq2", "kvt2", "kvq3", "kvt3"):
            tf = {(t.layer, t.is_v): t for t in kv_transforms(cal, [name] * n, [name] * n)}[(il, True)]
            m = tf.matrix[0].astype(np.float64)
            s = tf.scale[0] if tf.scale is not None else np.ones(c.head_size)
            inv = tf.inverse[0] if tf.inverse is not None else m.T
            y = ((x @ m) / s).astype(np.float32)
            yq = qr.dequantize(name, qr.quantize(name, y.reshape(-1)), y.size).reshape(y.shape)
            back = (yq * s) @ inv
            row.append(f"{name} {((back - x) ** 2).sum() / ((x - c.mean[0]) ** 2).sum():.4f}")
        print("  ".join(row))


if __name__ == "__main__":
    main()
