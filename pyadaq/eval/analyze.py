"""How much keys and values carry in each layer: the norm analysis of KV-AdaQuant.

Two sources, both per layer:

* weights: the Frobenius and spectral norms of W_K and W_V, read from the GGUF file and
  dequantized with the ``gguf`` package's numpy code (``weight_norms``);
* activations: the keys and values each layer computes while the model reads a text,
  captured before they enter the cache by an evaluation callback in pyadaq's libllama
  (``pyadaq_kv_capture_*``), which accumulates the Gram matrix X^T X of each KV head's
  [tokens x head_size] matrix X. From it: Frobenius norm sqrt(tr G), spectral norm
  sqrt(max eig G) and the singular values sqrt(eig G) (``activation_stats``).

Norms grow with the number of tokens, so the per-token figures (norm / sqrt(tokens)) are
what is compared across layers and runs; for K against V in one layer the ratio is the same
either way.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pyadaq._native import native
from pyadaq._version import __version__
from pyadaq.eval.kl import chunks
from pyadaq.eval.texts import default_text
from pyadaq.model.calibration import Components, components_from_moments
from pyadaq.model.header import TruncatedModelError, read_model_info
from pyadaq.report.machine import machine
from pyadaq.runtime.context import Context, Model, quiet_native_logs

__all__ = ["Moments", "activation_stats", "analyze", "capture_moments", "first_token_rows", "verdict",
           "weight_norms"]


def weight_norms(model_path: str | Path, progress: bool = True) -> list[dict]:
    """Per layer: Frobenius and spectral norms of W_K and W_V (None where the GGUF has no
    separate attn_k / attn_v tensor, e.g. a fused QKV).

    The tensor table comes from the header reader (``read_model_info``); only the bytes of
    each attn_k / attn_v tensor are read from the file and dequantized with
    ``gguf.quants.dequantize`` (``gguf.GGUFReader`` would parse the whole metadata first,
    which takes seconds for a large vocabulary)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    info = read_model_info(model_path)
    by_name = {t.name: t for t in info.tensors}
    out = []
    with open(info.path, "rb") as f:
        for il in tqdm(range(info.n_layer), desc="weight norms", disable=not progress):
            row: dict = {"layer": il}
            for kind in ("k", "v"):
                t = by_name.get(f"blk.{il}.attn_{kind}.weight")
                if t is None:
                    row[kind] = None
                    continue
                try:
                    qtype = GGMLQuantizationType(t.type_id)
                except ValueError:
                    raise ValueError(f"{info.path}: tensor '{t.name}' has ggml type {t.type_id}, which "
                                     "the gguf package cannot dequantize") from None
                f.seek(info.data_offset + t.offset)
                raw = np.fromfile(f, dtype=np.uint8, count=t.nbytes)
                if raw.size != t.nbytes:  # the file shrank since the header was read
                    raise TruncatedModelError(f"{info.path}: could not read the {t.nbytes} bytes of "
                                              f"tensor '{t.name}'", str(info.path))
                ne0 = int(t.shape[0]) if t.shape else 1
                bs, ts = GGML_QUANT_SIZES[qtype]
                w = np.asarray(dequantize(raw.reshape(-1, ne0 // bs * ts), qtype), dtype=np.float64)
                w = w.reshape(-1, ne0)  # rows: output features (n_head_kv * head_size)
                row[kind] = {"frobenius": float(np.linalg.norm(w)), "spectral": float(np.linalg.norm(w, 2)),
                             "shape": [int(x) for x in w.shape], "type": qtype.name}
            out.append(row)
    return out


def _head_stats(gram: np.ndarray, rows: int) -> dict:
    eig = np.clip(np.linalg.eigvalsh(gram), 0.0, None)[::-1]
    sv = np.sqrt(eig)
    return {
        "frobenius": float(np.sqrt(eig.sum())),
        "spectral": float(sv[0]),
        "singular_values": sv,
        "frobenius_per_token": float(np.sqrt(eig.sum() / rows)),
        "spectral_per_token": float(sv[0] / np.sqrt(rows)),
    }


@dataclass(frozen=True)
class Moments:
    """What the capture accumulated for one layer's K or V: per KV head, the Gram matrix
    sum x x^T [heads, d, d] and the sum of the rows [heads, d] over `rows` tokens (keys after
    RoPE and any key norm, as the model hands them to the cache)."""

    rows: int
    gram: np.ndarray
    sum: np.ndarray

    @property
    def head_size(self) -> int:
        return int(self.sum.shape[1])

    @property
    def n_head(self) -> int:
        return int(self.sum.shape[0])

    def components(self) -> Components:
        """The mean, principal directions and variances these moments imply."""
        return components_from_moments(self.rows, self.gram, self.sum)


def capture_moments(model_path: str | Path, text: str | None = None, n_ctx: int = 512, n_chunks: int = 4,
                    n_threads: int | None = None, progress: bool = True,
                    desc: str = "capturing K/V") -> tuple[int, int, list[dict[str, Moments]]]:
    """Reads `text` (default: pydoc topics) in n_chunks chunks of n_ctx tokens, each from an
    empty f16 cache, and returns (tokens read, chunks read, per layer {"k": Moments, "v": Moments})
    ({} for a layer without a KV cache of its own that computed no K/V)."""
    text = text if text is not None else default_text()
    model = Model(str(model_path))
    try:
        toks = model.tokenize(text, add_bos=True)
        parts = chunks(toks, n_ctx, n_chunks, int(toks[0]) if model.adds_bos else None)
        layers = _capture(model, read_model_info(model_path), parts, n_ctx, n_threads, progress, desc)
        return int(sum(len(p) for p in parts)), len(parts), layers
    finally:
        model.close()


def first_token_rows(model_path: str | Path, n_threads: int | None = None) -> tuple[int, dict] | None:
    """What every sequence that starts with the model's BOS token caches at position 0: (the BOS
    token id, per layer with a cache of its own {"k": [heads, d], "v": [heads, d]}), the rows
    of BOS read alone (keys after RoPE, which is the identity at position 0); None when the
    model's vocabulary adds no BOS token."""
    model = Model(str(model_path))
    try:
        if not model.adds_bos:
            return None
        bos = int(model.tokenize("", add_bos=True)[0])
        layers = _capture(model, read_model_info(model_path), [np.array([bos], dtype=np.int32)], 256, n_threads,
                          False, "")
        return bos, {il: {kind: m.sum.astype(np.float32) for kind, m in row.items()}
                     for il, row in enumerate(layers) if row}
    finally:
        model.close()


def _capture(model: Model, info, parts: list, n_ctx: int, n_threads, progress: bool,
             desc: str) -> list[dict[str, Moments]]:
    """The K/V moments per layer of `parts` (token arrays), each read from an empty f16 cache."""
    n = native()
    quiet_native_logs()
    cap = n.llama.pyadaq_kv_capture_new(n.ffi.cast("void *", model.ptr))
    try:
        cb = int(n.ffi.cast("uintptr_t", n.ffi.addressof(n.llama, "pyadaq_kv_capture_eval_cb")))
        ctx = Context(model, "f16", "f16", n_ctx, n_threads, cb_eval=(cb, int(n.ffi.cast("uintptr_t", cap))))
        try:
            for ch in tqdm(parts, desc=desc, disable=not progress):
                ctx.logits(ch, len(ch) - 1)
                n.llama.pyadaq_kv_capture_flush(cap)
        finally:
            ctx.close()
        if n.llama.pyadaq_kv_capture_skipped(cap):
            raise RuntimeError("the capture met K/V tensors of a type it cannot read")
        cache_layers = set(info.cache_layers())
        layers: list[dict[str, Moments]] = []
        for il in range(info.n_layer):
            row: dict[str, Moments] = {}
            for is_v, kind in ((0, "k"), (1, "v")):
                rows = int(n.llama.pyadaq_kv_capture_rows(cap, is_v, il))
                d = int(n.llama.pyadaq_kv_capture_head_size(cap, is_v, il))
                heads = int(n.llama.pyadaq_kv_capture_n_head(cap, is_v, il))
                if rows <= 0 and il not in cache_layers:
                    continue  # a layer that reads another layer's cache
                if rows <= 0:
                    raise RuntimeError(f"no {kind.upper()} activations were captured for layer {il} "
                                       "(the model's graph does not name them Kcur-N / Vcur-N)")
                gram = np.empty((heads, d, d), dtype=np.float64)
                sums = np.empty((heads, d), dtype=np.float64)
                for h in range(heads):
                    n.llama.pyadaq_kv_capture_gram(cap, is_v, il, h, n.ffi.cast("double *", gram[h].ctypes.data), d * d)
                    n.llama.pyadaq_kv_capture_sum(cap, is_v, il, h, n.ffi.cast("double *", sums[h].ctypes.data), d)
                row[kind] = Moments(rows, gram, sums)
            layers.append(row)
        return layers
    finally:
        n.llama.pyadaq_kv_capture_free(cap)


def activation_stats(model_path: str | Path, text: str | None = None, n_ctx: int = 512, n_chunks: int = 4,
                     n_threads: int | None = None, progress: bool = True) -> dict:
    """Keys and values of every layer while the model reads `text` (default: pydoc topics),
    in n_chunks chunks of n_ctx tokens from an empty f16 cache each.

    Returns {"tokens", "layers": [{"layer", "k": {...}, "v": {...}}]} where each of k/v has,
    over the KV heads, the per-head lists "frobenius", "spectral", "frobenius_per_token",
    "spectral_per_token" and the singular values normalized per token ("sv_mean", "sv_min",
    "sv_max": mean and min-max band across heads, descending).
    """
    tokens, n_read, captured = capture_moments(model_path, text, n_ctx, n_chunks, n_threads, progress)
    layers = []
    for il, moments in enumerate(captured):
        if not moments:
            raise RuntimeError(f"no activations were captured for layer {il} (it has no KV cache of its own)")
        row: dict = {"layer": il}
        for kind in ("k", "v"):
            m = moments[kind]
            stats = [_head_stats(m.gram[h], m.rows) for h in range(m.n_head)]
            sv = np.stack([st["singular_values"] for st in stats]) / np.sqrt(m.rows)
            row[kind] = {
                "tokens": m.rows, "head_size": m.head_size, "n_head": m.n_head,
                **{key: [st[key] for st in stats]
                   for key in ("frobenius", "spectral", "frobenius_per_token", "spectral_per_token")},
                "sv_mean": sv.mean(0).tolist(), "sv_min": sv.min(0).tolist(), "sv_max": sv.max(0).tolist(),
            }
        layers.append(row)
    return {"tokens": tokens, "n_ctx": n_ctx, "chunks": n_read, "layers": layers}


def verdict(result: dict) -> dict:
    """Does the paper's finding (key norms above value norms) hold, and in how many layers?"""
    layers = result["activations"]["layers"]
    frob = [np.mean(r["k"]["frobenius_per_token"]) > np.mean(r["v"]["frobenius_per_token"]) for r in layers]
    spec = [np.mean(r["k"]["spectral_per_token"]) > np.mean(r["v"]["spectral_per_token"]) for r in layers]
    n = len(layers)
    holds = sum(frob) > n / 2 and sum(spec) > n / 2
    ratio = [float(np.mean(r["k"]["frobenius_per_token"]) / np.mean(r["v"]["frobenius_per_token"])) for r in layers]
    text = (f"key norm > value norm in {sum(frob)} of {n} layers (Frobenius) and {sum(spec)} of {n} (spectral); "
            f"K/V Frobenius ratio {min(ratio):.2f}-{max(ratio):.2f} (median {float(np.median(ratio)):.2f}): "
            + ("the paper's finding holds for this model" if holds
               else "the paper's finding does not hold for this model"))
    return {"holds": bool(holds), "layers_frobenius": int(sum(frob)), "layers_spectral": int(sum(spec)),
            "n_layer": n, "kv_frobenius_ratio": ratio, "text": text}


def analyze(model_path: str | Path, text: str | None = None, n_ctx: int = 512, n_chunks: int = 4,
            n_threads: int | None = None, progress: bool = True) -> dict:
    """Weight norms, activation statistics and the verdict, with the run's settings."""
    info = read_model_info(model_path)
    t0 = time.time()
    res = {
        "settings": {
            "model": str(model_path), "model_sha256": info.sha256,
            "text": "pydoc_data.topics" if text is None else "file",
            "text_sha256": None if text is None else hashlib.sha256(text.encode()).hexdigest(),
            "n_ctx": n_ctx, "chunks": n_chunks, "pyadaq": __version__, "native": native().build_info["info"],
            "machine": machine(),
        },
        "n_layer": info.n_layer,
        "weights": weight_norms(model_path, progress),
        "activations": activation_stats(model_path, text, n_ctx, n_chunks, n_threads, progress),
    }
    res["verdict"] = verdict(res)
    res["settings"]["seconds"] = time.time() - t0
    return res
