"""The PNG plots pyadaq's commands write. matplotlib is an optional extra (``pyadaq[plots]``):
without it, asking for a plot raises :class:`PlotsUnavailable`, which says how to install it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["PlotsUnavailable", "plot_bench", "plot_eval", "plot_formats", "plot_norms", "plot_spectra", "pyplot",
           "require_plots"]


class PlotsUnavailable(ImportError):
    """A plot was asked for, but matplotlib is not installed."""


def require_plots() -> None:
    """Raise PlotsUnavailable now (before a long run) when plots cannot be made."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotsUnavailable(
            "plots need matplotlib, which is not installed: run `pip install 'pyadaq[plots]'` "
            "(or leave out --plot)"
        ) from None


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend."""
    require_plots()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(res: dict, path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "tg", f"generation (tg{res['n_gen']})"),
                           (axes[1], "pp", f"prompt processing (pp{res['n_prompt']})")):
        for label in res["configs"]:
            rows = sorted((r for r in res["results"] if r["config"] == label and r[f"{key}_mean"]),
                          key=lambda r: r["depth"])
            if not rows:
                continue
            ours = any(t.startswith("kvq") for t in (rows[0]["k"], rows[0]["v"])) or rows[0].get("per_layer")
            ax.errorbar([r["depth"] for r in rows], [r[f"{key}_mean"] for r in rows],
                        yerr=[r[f"{key}_std"] for r in rows], marker="^" if ours else "o",
                        linestyle="-" if ours else "--", capsize=3, label=label)
        ax.set_xlabel("context depth (tokens already in the cache)")
        ax.set_ylabel("tokens per second")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    s = res.get("settings", {})
    fig.suptitle(f"{s.get('model_name', '')} on {s.get('machine', '')} ({s.get('backend', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_eval(out: dict, path: str) -> None:
    """KL (with its standard error) and pass-key accuracy against bits per value (pyadaq eval)."""
    plt = pyplot()
    has_pk = out.get("passkey") is not None
    fig, axes = plt.subplots(1, 2 if has_pk else 1, figsize=(13 if has_pk else 8, 5.5), squeeze=False)
    panels = [(axes[0][0], "kl_mean", "kl_stderr", "mean KL divergence against f16/f16 (nats, log scale)", True)]
    if has_pk:
        panels.append((axes[0][1], "passkey_mean", None, "pass-key accuracy", False))
    for ax, key, err_key, label, log in panels:
        seen = set()
        for r in out["results"]:
            if log and r["k"] == r["v"] == "f16":
                continue  # the reference itself: KL ~0
            y = r.get(key)
            if y is None:
                continue
            ours = r["k"].startswith("kvq") or r["v"].startswith("kvq") or r.get("per_layer", False)
            kind = "pyadaq types or per-layer plans" if ours else "upstream types"
            yv = max(y, 1e-6) if log else y
            err = r.get(err_key) if err_key else None
            ax.errorbar(r["bits_per_value"], yv, yerr=err if err else None, fmt="^" if ours else "o",
                        color="tab:red" if ours else "tab:blue", markersize=6, capsize=3, zorder=3,
                        label=None if kind in seen else kind)
            seen.add(kind)
            ax.annotate(r.get("config", f"{r['k']}:{r['v']}"), (r["bits_per_value"], yv),
                        textcoords="offset points", xytext=(5, 4), fontsize=7)
        if log:
            ax.set_yscale("log")
        ax.margins(x=0.15, y=0.15)  # room for the labels inside the frame
        ax.set_xlabel("bits per cached value (K and V averaged, scales included)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    s = out["settings"]
    fig.suptitle(f"{Path(s['model']).name}: {out['chunks']} chunk{'s' if out['chunks'] != 1 else ''} of "
                 f"{s['ctx']} tokens, second half scored (error bars: ± standard error)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_formats(res: dict, path: str) -> None:
    """KL per format pair, a bar each with its standard error (pyadaq formats)."""
    plt = pyplot()
    rows = sorted(res["results"], key=lambda r: r["kl_mean"])
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.4))
    labels, values, colors = [], [], []
    for r in rows:
        ours = r["v"].startswith("kvq") or r["k"].startswith("kvq")
        bits = (r["bits_k"] + r["bits_v"]) / 2
        labels.append(f"K={r['k']}  V={r['v']}  ({bits:.2f} b/v)")
        values.append(r["kl_mean"])
        colors.append("tab:red" if ours else "tab:blue")
    y = range(len(rows))
    ax.barh(y, values, color=colors, xerr=[r["kl_stderr"] for r in rows])
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("mean KL divergence against an f16 cache (nats, log scale)")
    ax.set_title(f"{Path(res['model']).name}, {res['chunks']} chunks of {res['n_ctx']} tokens "
                 "(red: pyadaq, blue: upstream)", fontsize=8)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_norms(res: dict, path: str | Path) -> None:
    """Per layer: K and V activation norms (per token, mean over KV heads, with the min-max band
    across heads when there are several) and the weight norms of W_K and W_V."""
    import numpy as np

    plt = pyplot()
    layers = res["activations"]["layers"]
    x = np.arange(len(layers))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, key, title in ((axes[0], "frobenius_per_token", "Frobenius norm / √tokens"),
                           (axes[1], "spectral_per_token", "spectral norm / √tokens")):
        for kind, color in (("k", "tab:red"), ("v", "tab:blue")):
            vals = np.array([r[kind][key] for r in layers])
            several = vals.shape[1] > 1
            ax.plot(x, vals.mean(1), "o-", color=color,
                    label=f"{kind.upper()} (mean over {vals.shape[1]} KV heads)" if several else f"{kind.upper()}")
            if several:
                ax.fill_between(x, vals.min(1), vals.max(1), color=color, alpha=0.2,
                                label=f"{kind.upper()}: min-max across heads")
        ax.set_title(f"activations: {title}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(title + " (log scale)")
        ax.set_xticks(x)
        ax.set_yscale("log")
    w = res["weights"]
    for kind, color in (("k", "tab:red"), ("v", "tab:blue")):
        fro = [r[kind]["frobenius"] if r[kind] else np.nan for r in w]
        spec = [r[kind]["spectral"] if r[kind] else np.nan for r in w]
        axes[2].plot(x, fro, "o-", color=color, label=f"W_{kind.upper()} Frobenius")
        axes[2].plot(x, spec, "s--", color=color, label=f"W_{kind.upper()} spectral")
    axes[2].set_title("weights (dequantized from the GGUF)", fontsize=10)
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("norm")
    axes[2].set_xticks(x)
    for ax in axes:  # below the axes, where it hides no point
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{Path(res['settings']['model']).name}: {res['verdict']['text']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(res: dict, path: str | Path) -> None:
    """Singular values of K and V per layer (per token, descending), mean over KV heads with
    the min-max band across heads when there are several."""
    import numpy as np

    plt = pyplot()
    layers = res["activations"]["layers"]
    n = len(layers)
    cols = min(6, n)
    rows = -(-n // cols)
    # wide enough for the title however few layers there are
    fig, axes = plt.subplots(rows, cols, figsize=(max(2.7 * cols, 8.0), 2.4 * rows + 0.8), squeeze=False)
    for i, r in enumerate(layers):
        ax = axes[i // cols][i % cols]
        for kind, color in (("k", "tab:red"), ("v", "tab:blue")):
            m = np.array(r[kind]["sv_mean"])
            idx = np.arange(1, len(m) + 1)
            ax.plot(idx, m, color=color, lw=1, label=kind.upper())
            if r[kind].get("n_head", 1) > 1:
                ax.fill_between(idx, r[kind]["sv_min"], r[kind]["sv_max"], color=color, alpha=0.2)
        ax.set_yscale("log")
        top = max(max(r["k"]["sv_max"]), max(r["v"]["sv_max"]))
        ax.set_ylim(1e-3 * top, 2 * top)  # rank-deficient tails drop to ~0: cut at 1e-3 of the top
        ax.set_title(f"layer {r['layer']}", fontsize=8)
        ax.tick_params(labelsize=6)
        if i // cols == rows - 1 or i + cols >= n:
            ax.set_xlabel("index (largest first)", fontsize=7)
        if i % cols == 0:
            ax.set_ylabel("singular value / √tokens", fontsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    several = any(r[k].get("n_head", 1) > 1 for r in layers for k in ("k", "v"))
    fig.suptitle(f"{Path(res['settings']['model']).name}: singular values of K and V per layer, per token"
                 + ("\n(band: min-max across KV heads)" if several else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
