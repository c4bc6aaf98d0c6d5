#!/usr/bin/env python3
"""What storing a model's values (or keys) in a cache type does to attention's output, layer by
layer, from the model's own queries, keys and values: a fast way to compare value formats
before measuring KL end to end.

The model reads --chunks chunks of --ctx tokens of the evaluation text (`pyadaq eval`'s, from
its start: a calibration reads the other half) with f32 caches; an evaluation callback copies
every layer's queries, keys (after RoPE) and values. Then, in numpy, per layer: attention
probabilities P (causal, scale 1/sqrt(head size)), the output projection W_o (dequantized from
the model), and for each type the relative error of W_o (P V^) against W_o (P V) over the second
half of each chunk (the tokens `pyadaq eval` scores):

* uniform types (q8_0, q4_0, kvq2, kvq3, ...): in llama.cpp's rotation of the head (Hadamard);
* transform-coded types (kvt*): in the coordinates a calibrated context uses
  (pyadaq.runtime.kv_transform, the model's default calibration), and again as a format-1
  calibration (without the first token's rows) would store them ("<type>/no-first").

With --keys the keys are stored instead (P^ from the stored keys, exact values). It also prints
the share of attention on the first token (BOS) per layer. The attention is recomputed without
sliding windows or logit soft-capping: right for models without soft-capping whose windows are
at least --ctx (the embedded Gemma 3 270M at 512).

Usage: scripts/attention_error.py [--model M] [--chunks 2] [--types kvq2,kvq3,kvt2,kvt3] [--keys]
       [--json F]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import re
import sys

import numpy as np


class _GGMLTensor(ctypes.Structure):  # ggml.h's struct ggml_tensor (the pinned llama.cpp)
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def capture(model_path: str, n_ctx: int, n_chunks: int, n_threads: int | None) -> list[dict]:
    """Per chunk {("Q"|"K"|"V", layer): [tokens, heads, d] float32}."""
    from pyadaq.eval.kl import chunks
    from pyadaq.eval.texts import default_text
    from pyadaq.runtime.context import Context, Model, quiet_native_logs

    import llama_cpp

    pattern = re.compile(rb"^(Qcur|Kcur|Vcur)-(\d+)$")
    store: dict = {}

    def cb(ptr, ask, _user):
        t = _GGMLTensor.from_address(ptr)
        m = pattern.match(t.name)
        if m is None or ask:
            return m is not None or not ask
        if t.type != 0:  # f32
            raise RuntimeError(f"{t.name.decode()} is not float32")
        ne, nb = list(t.ne), list(t.nb)
        base = np.ctypeslib.as_array((ctypes.c_float * 1).from_address(t.data))
        a = np.lib.stride_tricks.as_strided(base, shape=(ne[2], ne[1], ne[0]), strides=(nb[2], nb[1], nb[0]))
        store[(m.group(1).decode()[0], int(m.group(2)))] = a.copy()  # the last one named so: after RoPE
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(cb)
    quiet_native_logs()
    model = Model(model_path)
    out = []
    try:
        toks = model.tokenize(default_text(), add_bos=True)
        parts = chunks(toks, n_ctx, n_chunks, int(toks[0]) if model.adds_bos else None)
        ctx = Context(model, "f32", "f32", n_ctx, n_threads, cb_eval=(ctypes.cast(callback, ctypes.c_void_p).value, 0))
        try:
            for ch in parts:
                store.clear()
                ctx.logits(ch, len(ch) - 1)
                out.append(dict(store))
        finally:
            ctx.close()
    finally:
        model.close()
    return out


def output_projections(model_path: str) -> dict[int, np.ndarray]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(model_path)
    return {int(t.name.split(".")[1]): np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
            for t in r.tensors if t.name.endswith(".attn_output.weight")}


def probs(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """[heads, T, T] causal softmax of q k^T / sqrt(d); q [T, heads, d], k [T, kv heads, d]."""
    t, h, d = q.shape
    kv = np.repeat(k.astype(np.float64), h // k.shape[1], axis=1)  # each query head's KV head
    s = np.einsum("thd,shd->hts", q.astype(np.float64), kv) / np.sqrt(d)
    s[:, np.triu(np.ones((t, t), bool), 1)] = -np.inf
    s -= s.max(axis=2, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=2, keepdims=True)


def project(p: np.ndarray, v: np.ndarray, wo: np.ndarray) -> np.ndarray:
    h = p.shape[0]
    vv = np.repeat(v.astype(np.float64), h // v.shape[1], axis=1)
    o = np.einsum("hts,shd->thd", p, vv).reshape(p.shape[1], -1)
    return o @ wo.T


def stored(x: np.ndarray, t, transform) -> np.ndarray:
    """x [T, heads, d] as the cache gives it back: quantized in its coordinates and mapped back."""
    from pyadaq._native import native
    from pyadaq.runtime.kv_transform import hadamard

    def roundtrip(y):  # ggml's reference quantizer and to_float for the type
        y = np.ascontiguousarray(y, dtype=np.float32)
        return native().roundtrip(t.id, y).reshape(y.shape).astype(np.float64)

    out = np.empty(x.shape, dtype=np.float64)
    for h in range(x.shape[1]):
        xh = x[:, h, :].astype(np.float64)
        if transform is None:  # llama.cpp's rotation of the head
            rot = hadamard(x.shape[2])
            out[:, h, :] = roundtrip(xh @ rot) @ rot.T
            continue
        m = transform.matrix[h].astype(np.float64)
        s = 1.0 if transform.scale is None else transform.scale[h].astype(np.float64)
        c = 0.0 if transform.mean is None else transform.mean[h].astype(np.float64)
        out[:, h, :] = (roundtrip(((xh - c) @ m) / s) * s) @ m.T + c
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--types", default="kvq2,kvq3,kvt2,kvt3")
    p.add_argument("--keys", action="store_true", help="store the keys in the types instead of the values")
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)

    from tqdm import tqdm

    from pyadaq.cli._common import resolve_model, write_json
    from pyadaq.eval.calibration import calibrate
    from pyadaq.runtime.kv_transform import kv_transforms
    from pyadaq.types import cache_type

    model, info = resolve_model(args.model)
    types = [cache_type(t) for t in args.types.split(",") if t.strip()]
    cal = calibrate(model, n_threads=args.threads) if any(t.calibrated for t in types) else None
    variants = []  # (label, type, {layer: transform} or None)
    for t in types:
        if not t.calibrated:
            variants.append((t.name, t, None))
            continue
        for label, c in ((t.name, cal), (f"{t.name}/no-first",
                                         dataclasses.replace(cal, first_token=None, k_first=None, v_first=None))):
            other = ["f16"] * info.n_layer
            tfs = kv_transforms(c, [t.name] * info.n_layer if args.keys else other,
                                other if args.keys else [t.name] * info.n_layer)
            variants.append((label, t, {tf.layer: tf for tf in tfs if tf.is_v != args.keys}))
    data = capture(model, args.ctx, args.chunks, args.threads)
    wo = output_projections(model)
    layers = sorted({il for ch in data for (_, il) in ch})
    scored = np.arange(args.ctx // 2, args.ctx)
    err = {label: np.zeros(len(layers)) for label, _, _ in variants}
    first_share = np.zeros(len(layers))
    for ch in tqdm(data, desc="chunks"):
        for i, il in enumerate(layers):
            q, k, v = ch[("Q", il)], ch[("K", il)], ch[("V", il)]
            pr = probs(q, k)
            first_share[i] += pr[:, scored, 0].mean() / len(data)
            ref = project(pr, v, wo[il])[scored]
            for label, t, tfs in variants:
                tf = None if tfs is None else tfs[il]
                if args.keys:
                    got = project(probs(q, stored(k, t, tf)), v, wo[il])[scored]
                else:
                    got = project(pr, stored(v, t, tf), wo[il])[scored]
                err[label][i] += float(((got - ref) ** 2).sum(1).mean() / (ref ** 2).sum(1).mean()) / len(data)
    part = "keys" if args.keys else "values"
    print(f"{info.path.name}, {part} stored in each type, {args.chunks} chunks of {args.ctx}: relative squared error "
          "of W_o (attention output) per layer, and its sum")
    print(f"{'layer':>5} {'P(first)':>8} " + " ".join(f"{label:>13}" for label, _, _ in variants))
    for i, il in enumerate(layers):
        print(f"{il:>5} {first_share[i]:>8.3f} " + " ".join(f"{err[label][i]:>13.4f}" for label, _, _ in variants))
    print(f"{'sum':>5} {'':>8} " + " ".join(f"{err[label].sum():>13.4f}" for label, _, _ in variants))
    if args.json:
        write_json({"model": info.path.name, "part": part, "ctx": args.ctx, "chunks": args.chunks,
                    "layers": layers, "first_token_share": first_share.tolist(),
                    "errors": {label: e.tolist() for label, e in err.items()},
                    "sums": {label: float(e.sum()) for label, e in err.items()},
                    "command": "scripts/attention_error.py " + " ".join(argv or sys.argv[1:])}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
