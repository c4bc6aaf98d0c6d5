#!/usr/bin/env python3
"""`pyadaq eval` with the transform-coded values stored in the output projection's metric (a
trial for docs/CALIBRATION.md, not a pyadaq feature).

A value's error reaches the model through W_o: for KV head g, through the columns of W_o that its
query heads' outputs meet, so the error that a first-order argument says matters is
e^T G e with G = sum over the group's query heads h of W_h^T W_h (W_h: those columns), optionally
weighted by the post-attention norm's gains (Gemma: w^2 on W_o's output channels). This script
replaces the values' transforms of a calibrated context (pyadaq.runtime.kv_transform) by the same
construction in that metric: principal directions of G^(a/2) C G^(a/2) (C: the values' second
moment about the first-token offset), M = G^(a/2) U whitened and interleaved as usual, with the
explicit inverse M^-1 (libllama takes one), then runs `pyadaq eval` with the arguments given.

Usage: PYADAQ_VALUE_METRIC=wo|wo-post|wo-post-half|identity scripts/value_metric_trial.py eval ARGS...
(identity: the same code path with G = I, which must reproduce the ordinary transforms' figures)
"""

from __future__ import annotations

import os
import sys

import numpy as np

METRICS = {"wo": (1.0, False), "wo-post": (1.0, True), "wo-post-half": (0.5, True), "identity": (1.0, False)}


def _power(g: np.ndarray, p: float) -> np.ndarray:
    w, v = np.linalg.eigh(g)
    w = np.maximum(w, 1e-8 * w.max())
    return (v * w ** p) @ v.T


def install(mode: str, model_path: str) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    import pyadaq.runtime.kv_transform as kt
    from pyadaq.model.calibration import Components
    from pyadaq.types import cache_type

    alpha, use_post = METRICS[mode]
    reader = GGUFReader(model_path)

    def weights(suffix):
        return {int(t.name.split(".")[1]): np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
                for t in reader.tensors if t.name.endswith(suffix)}

    wo, post = weights(".attn_output.weight"), weights(".post_attention_norm.weight")
    ordinary = kt.kv_transforms

    def metric_transforms(calibration, types_k, types_v):
        out = []
        for tf in ordinary(calibration, types_k, types_v):
            t = cache_type(types_v[tf.layer])
            if not tf.is_v or not t.calibrated:
                out.append(tf)
                continue
            il = tf.layer
            comps = kt.part_components(calibration, il, True, t.name)
            d = comps.head_size
            second = comps.covariance().astype(np.float64)
            w = wo[il] * (post[il][:, None] if use_post and il in post else 1.0)
            group = w.shape[1] // d // second.shape[0]
            mats, scales, invs = [], [], []
            for g in range(second.shape[0]):
                if mode == "identity":
                    gm = np.eye(d)
                else:
                    cols = [w[:, h * d:(h + 1) * d] for h in range(g * group, (g + 1) * group)]
                    gm = sum(c.T @ c for c in cols)
                    gm = gm / np.trace(gm) * d
                root = _power(gm, alpha / 2)
                a = root @ second[g] @ root
                ev, u = np.linalg.eigh(0.5 * (a + a.T))
                c = Components(comps.mean[g:g + 1], (root @ u[:, ::-1])[None], np.clip(ev[::-1], 0, None)[None])
                m, s = kt.matrix_and_scale(c, t)
                mats.append(m[0])
                scales.append(s[0])
                invs.append(np.linalg.inv(m[0]))
            out.append(kt.LayerTransform(il, True, np.ascontiguousarray(mats, dtype=np.float32),
                                         np.ascontiguousarray(scales, dtype=np.float32), tf.mean,
                                         np.ascontiguousarray(invs, dtype=np.float32)))
        return out

    kt.kv_transforms = metric_transforms  # context_settings looks it up in its module


def main() -> int:
    mode = os.environ.get("PYADAQ_VALUE_METRIC", "wo")
    if mode not in METRICS:
        sys.exit(f"PYADAQ_VALUE_METRIC must be one of {', '.join(METRICS)}")
    from pyadaq.cli import main as cli
    from pyadaq.cli._common import resolve_model

    args = sys.argv[1:]
    model = args[args.index("--model") + 1] if "--model" in args else None
    install(mode, str(resolve_model(model)[0]))
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
