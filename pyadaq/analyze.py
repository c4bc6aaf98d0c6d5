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
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from .gguf_info import read_model_info

__all__ = ["weight_norms", "activation_stats", "analyze", "verdict", "plot_norms", "plot_spectra"]


def weight_norms(model_path: str | Path, progress: bool = True) -> list[dict]:
    """Per layer: Frobenius and spectral norms of W_K and W_V (None where the GGUF has no
    separate attn_k / attn_v tensor, e.g. a fused QKV)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(model_path))
    by_name = {t.name: t for t in reader.tensors}
    n_layer = read_model_info(model_path).n_layer
    out = []
    for il in tqdm(range(n_layer), desc="weight norms", disable=not progress):
        row: dict = {"layer": il}
        for kind in ("k", "v"):
            t = by_name.get(f"blk.{il}.attn_{kind}.weight")
            if t is None:
                row[kind] = None
                continue
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
            w = w.reshape(-1, int(t.shape[0]))  # rows: output features (n_head_kv * head_size)
            row[kind] = {"frobenius": float(np.linalg.norm(w)), "spectral": float(np.linalg.norm(w, 2)),
                         "shape": [int(x) for x in w.shape], "type": t.tensor_type.name}
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


def activation_stats(model_path: str | Path, text: Optional[str] = None, n_ctx: int = 512, n_chunks: int = 4,
                     n_threads: Optional[int] = None, progress: bool = True) -> dict:
    """Keys and values of every layer while the model reads `text` (default: pydoc topics),
    in n_chunks chunks of n_ctx tokens from an empty f16 cache each.

    Returns {"tokens", "layers": [{"layer", "k": {...}, "v": {...}}]} where each of k/v has,
    over the KV heads, the per-head lists "frobenius", "spectral", "frobenius_per_token",
    "spectral_per_token" and the singular values normalized per token ("sv_mean", "sv_min",
    "sv_max": mean and min-max band across heads, descending).
    """
    from ._native import native
    from .kl import chunks, default_text
    from .logits import Context, Model, quiet_native_logs

    n = native()
    quiet_native_logs()
    text = text if text is not None else default_text()
    model = Model(str(model_path))
    cap = n.llama.pyadaq_kv_capture_new(n.ffi.cast("void *", model.ptr))
    try:
        toks = model.tokenize(text, add_bos=True)
        parts = chunks(toks, n_ctx, n_chunks, int(toks[0]) if model.adds_bos else None)
        cb = int(n.ffi.cast("uintptr_t", n.ffi.addressof(n.llama, "pyadaq_kv_capture_eval_cb")))
        ctx = Context(model, "f16", "f16", n_ctx, n_threads, cb_eval=(cb, int(n.ffi.cast("uintptr_t", cap))))
        try:
            for ch in tqdm(parts, desc="capturing K/V", disable=not progress):
                ctx.logits(ch, len(ch) - 1)
                n.llama.pyadaq_kv_capture_flush(cap)
        finally:
            ctx.close()
        if n.llama.pyadaq_kv_capture_skipped(cap):
            raise RuntimeError("the capture met K/V tensors of a type it cannot read")
        layers = []
        for il in range(read_model_info(model_path).n_layer):
            row: dict = {"layer": il}
            for is_v, kind in ((0, "k"), (1, "v")):
                rows = int(n.llama.pyadaq_kv_capture_rows(cap, is_v, il))
                d = int(n.llama.pyadaq_kv_capture_head_size(cap, is_v, il))
                heads = int(n.llama.pyadaq_kv_capture_n_head(cap, is_v, il))
                if rows <= 0:
                    raise RuntimeError(f"no {kind.upper()} activations were captured for layer {il} "
                                       "(the model's graph does not name them Kcur-N / Vcur-N)")
                buf = np.empty(d * d, dtype=np.float64)
                stats = []
                for h in range(heads):
                    n.llama.pyadaq_kv_capture_gram(cap, is_v, il, h, n.ffi.cast("double *", buf.ctypes.data), d * d)
                    stats.append(_head_stats(buf.reshape(d, d), rows))
                sv = np.stack([s["singular_values"] for s in stats]) / np.sqrt(rows)
                row[kind] = {
                    "tokens": rows, "head_size": d, "n_head": heads,
                    **{key: [s[key] for s in stats]
                       for key in ("frobenius", "spectral", "frobenius_per_token", "spectral_per_token")},
                    "sv_mean": sv.mean(0).tolist(), "sv_min": sv.min(0).tolist(), "sv_max": sv.max(0).tolist(),
                }
            layers.append(row)
        return {"tokens": int(sum(len(p) for p in parts)), "n_ctx": n_ctx, "chunks": len(parts), "layers": layers}
    finally:
        n.llama.pyadaq_kv_capture_free(cap)
        model.close()


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
            + ("the paper's finding holds for this model" if holds else "the paper's finding does not hold for this model"))
    return {"holds": bool(holds), "layers_frobenius": int(sum(frob)), "layers_spectral": int(sum(spec)),
            "n_layer": n, "kv_frobenius_ratio": ratio, "text": text}


def analyze(model_path: str | Path, text: Optional[str] = None, n_ctx: int = 512, n_chunks: int = 4,
            n_threads: Optional[int] = None, progress: bool = True) -> dict:
    """Weight norms, activation statistics and the verdict, with the run's settings."""
    from ._native import native
    from ._version import __version__
    from .cli.formats import machine

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


def plot_norms(res: dict, path: str | Path) -> None:
    """Per layer: K and V activation norms (per token, mean over heads with min-max band) and
    the weight norms of W_K and W_V."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = res["activations"]["layers"]
    x = np.arange(len(layers))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in ((axes[0], "frobenius_per_token", "Frobenius norm / sqrt(tokens)"),
                           (axes[1], "spectral_per_token", "spectral norm / sqrt(tokens)")):
        for kind, color in (("k", "tab:red"), ("v", "tab:blue")):
            vals = np.array([r[kind][key] for r in layers])
            ax.plot(x, vals.mean(1), "o-", color=color, label=f"{kind.upper()} (mean over heads)")
            ax.fill_between(x, vals.min(1), vals.max(1), color=color, alpha=0.2, label=f"{kind.upper()} min-max")
        ax.set_title(f"activations: {title}")
        ax.set_xlabel("layer")
        ax.set_xticks(x)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    w = res["weights"]
    for kind, color in (("k", "tab:red"), ("v", "tab:blue")):
        fro = [r[kind]["frobenius"] if r[kind] else np.nan for r in w]
        spec = [r[kind]["spectral"] if r[kind] else np.nan for r in w]
        axes[2].plot(x, fro, "o-", color=color, label=f"W_{kind.upper()} Frobenius")
        axes[2].plot(x, spec, "s--", color=color, label=f"W_{kind.upper()} spectral")
    axes[2].set_title("weights (dequantized from the GGUF)")
    axes[2].set_xlabel("layer")
    axes[2].set_xticks(x)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{Path(res['settings']['model']).name}: {res['verdict']['text']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(res: dict, path: str | Path) -> None:
    """Singular values of K and V per layer (per token, descending), mean over KV heads with
    the min-max band across heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = res["activations"]["layers"]
    n = len(layers)
    cols = min(6, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), squeeze=False)
    for i, r in enumerate(layers):
        ax = axes[i // cols][i % cols]
        for kind, color in (("k", "tab:red"), ("v", "tab:blue")):
            m = np.array(r[kind]["sv_mean"])
            idx = np.arange(1, len(m) + 1)
            ax.plot(idx, m, color=color, lw=1, label=kind.upper())
            ax.fill_between(idx, r[kind]["sv_min"], r[kind]["sv_max"], color=color, alpha=0.2)
        ax.set_yscale("log")
        top = max(max(r["k"]["sv_max"]), max(r["v"]["sv_max"]))
        ax.set_ylim(1e-3 * top, 2 * top)  # rank-deficient tails drop to ~0: cut at 1e-3 of the top
        ax.set_title(f"layer {r['layer']}", fontsize=8)
        ax.tick_params(labelsize=6)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"{Path(res['settings']['model']).name}: singular values of K and V per layer "
                 "(per token; band: min-max across KV heads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
