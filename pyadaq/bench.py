"""Prompt-processing and generation speed per K/V configuration and context depth.

Measured the way llama.cpp's llama-bench measures "pp512 @ d4096" and "tg128 @ d4096": the
cache is first filled with `depth` tokens (not timed), then `n_prompt` tokens are decoded in
batches of n_batch (prompt processing) or `n_gen` tokens one at a time (generation), timed.
Between repetitions the timed tokens are removed from the cache again (llama_memory_seq_rm),
so every repetition starts at the same depth. Tokens are random ids (speed does not depend on
which tokens they are).
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
from tqdm import tqdm

from ._native import native
from .kl import config_label, config_row, open_context
from .logits import Model, quiet_native_logs

_L = native().llama_cpp


class _Runner:
    def __init__(self, ctx, n_batch: int):
        self.ctx = ctx
        self.n_batch = n_batch
        self.batch = _L.llama_batch_init(n_batch, 0, 1)
        self.mem = _L.llama_get_memory(ctx.ptr)

    def decode(self, toks: np.ndarray, pos0: int) -> None:
        for s in range(0, len(toks), self.n_batch):
            part = toks[s:s + self.n_batch]
            b = self.batch
            b.n_tokens = len(part)
            for j, t in enumerate(part):
                b.token[j] = int(t)
                b.pos[j] = pos0 + s + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = j == len(part) - 1
            rc = _L.llama_decode(self.ctx.ptr, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")

    def drop_from(self, pos: int) -> None:
        if not _L.llama_memory_seq_rm(self.mem, 0, pos, -1):
            raise RuntimeError("llama_memory_seq_rm failed")

    def close(self) -> None:
        _L.llama_batch_free(self.batch)


def gpu_offload() -> bool:
    return bool(_L.llama_supports_gpu_offload())


def context_size(depth: int, n_prompt: int, n_gen: int) -> int:
    need = depth + max(n_prompt, n_gen) + 1
    return -(-need // 256) * 256


def run_bench(model_path: str, configs: list, depths=(0, 1024, 4096), n_prompt: int = 512, n_gen: int = 64,
              reps: int = 3, n_threads: Optional[int] = None, n_batch: int = 512, seed: int = 0,
              progress: bool = True, n_gpu_layers: Optional[int] = None) -> dict:
    """Speed of each config at each depth. Returns {"results": [{config fields, "depth",
    "pp_tps": [per rep], "tg_tps": [...], "pp_mean", "pp_std", "tg_mean", "tg_std", "kv_bytes",
    "n_ctx"}], ...}. n_prompt or n_gen may be 0 to skip that test."""
    quiet_native_logs()
    depths = [int(d) for d in depths]
    if n_gpu_layers is None:  # everything on the GPU when the library has a GPU backend
        n_gpu_layers = 999 if gpu_offload() else 0
    model = Model(str(model_path), n_gpu_layers=n_gpu_layers)
    weight_bytes = int(_L.llama_model_size(model.ptr))
    rng = np.random.default_rng(seed)
    n_vocab = model.n_vocab
    results = []
    bar = tqdm(total=len(configs) * len(depths) * reps, desc="bench configs x depths x reps", disable=not progress)
    try:
        for cfg in configs:
            for depth in depths:
                n_ctx = context_size(depth, n_prompt, n_gen)
                ctx = open_context(model, cfg, n_ctx, n_threads)
                run = _Runner(ctx, min(n_batch, n_ctx))
                try:
                    if depth:
                        run.decode(rng.integers(0, n_vocab, depth), 0)
                    pp, tg = [], []
                    for _ in range(reps):
                        if n_prompt:
                            toks = rng.integers(0, n_vocab, n_prompt)
                            t0 = time.perf_counter()
                            run.decode(toks, depth)
                            pp.append(n_prompt / (time.perf_counter() - t0))
                            run.drop_from(depth)
                        if n_gen:
                            toks = rng.integers(0, n_vocab, n_gen)
                            t0 = time.perf_counter()
                            for i, t in enumerate(toks):
                                run.decode(np.array([t]), depth + i)
                            tg.append(n_gen / (time.perf_counter() - t0))
                            run.drop_from(depth)
                        bar.update()
                    # What one generated token must read: every weight once, and the KV cache up to
                    # the cells in use (llama.cpp reads them in steps of 256); iSWA caches are read
                    # whole at depth, so scaling the allocated bytes is exact there and an
                    # overestimate near depth 0. With the GPU's memory bandwidth this bounds tg.
                    kv_read = ctx.kv_cache_bytes * min(1.0, (-(-(depth + n_gen) // 256) * 256) / n_ctx)
                    row = {**config_row(cfg), "depth": depth, "n_ctx": n_ctx, "kv_bytes": ctx.kv_cache_bytes,
                           "tg_bytes_per_token": int(weight_bytes + kv_read), "pp_tps": pp, "tg_tps": tg}
                    for key, vals in (("pp", pp), ("tg", tg)):
                        row[f"{key}_mean"] = float(np.mean(vals)) if vals else None
                        row[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0 if vals else None
                    results.append(row)
                finally:
                    run.close()
                    ctx.close()
    finally:
        bar.close()
        model.close()
    for r in results:
        r["tg_gbps"] = r["tg_mean"] * r["tg_bytes_per_token"] / 1e9 if r["tg_mean"] else None
    base = {r["depth"]: r for r in results if r["config"] == "f16:f16"}
    for r in results:
        b = base.get(r["depth"])
        for key in ("pp", "tg"):
            ok = b is not None and r[f"{key}_mean"] and b[f"{key}_mean"]
            r[f"{key}_vs_f16"] = r[f"{key}_mean"] / b[f"{key}_mean"] if ok else None
    return {"model": str(model_path), "backend": "GPU" if n_gpu_layers else "CPU", "n_gpu_layers": n_gpu_layers,
            "weight_bytes": weight_bytes,
            "depths": depths, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps,
            "n_batch": n_batch, "configs": [config_label(c) for c in configs], "results": results}


def plot_bench(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def render_markdown(res: dict, command: str, mem_bandwidth_gbps: Optional[float] = None) -> str:
    """docs/BENCHMARKS.md from a bench run: the table, the speed goals (issue 5's on the CPU,
    issue 6's on a GPU) checked at the deepest depth measured, and how to rerun.
    mem_bandwidth_gbps: the device's peak memory bandwidth, for the bound on tg (bytes read
    per generated token / bandwidth)."""
    s = res["settings"]
    rows = res["results"]
    out = [
        "# Speed of the KV-cache configurations",
        "",
        f"Model `{s['model_name']}`, {s['machine']}, backend {res['backend']}; {s['native']}; measured "
        f"{s['date']} in {s['seconds']:.0f} s. pp{res['n_prompt']}: prompt processing of {res['n_prompt']} tokens "
        f"in batches of {res['n_batch']}; tg{res['n_gen']}: {res['n_gen']} tokens generated one at a time; both "
        f"with `depth` tokens already in the cache, {res['reps']} repetitions (mean ± sd), flash attention on. "
        "The ratios are to f16/f16 at the same depth in the same run.",
        "",
        f"Rerun: `{command}`",
        "",
        "| config | depth | KV MiB | pp t/s | pp / f16 | tg t/s | tg / f16 | MB read / token | tg GB/s |"
        + (" tg / bound |" if mem_bandwidth_gbps else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if mem_bandwidth_gbps else ""),
    ]
    for r in rows:
        def cell(key):
            m, sd = r[f"{key}_mean"], r[f"{key}_std"]
            return "–" if m is None else f"{m:.1f} ± {sd:.1f}"

        def ratio(key):
            v = r[f"{key}_vs_f16"]
            return "–" if v is None else f"{v:.2f}"

        bpt = r.get("tg_bytes_per_token")
        gbps = r.get("tg_gbps")
        line = (f"| {r['config']} | {r['depth']} | {r['kv_bytes'] / 2**20:.2f} | {cell('pp')} | {ratio('pp')} | "
                f"{cell('tg')} | {ratio('tg')} | {'–' if bpt is None else f'{bpt / 1e6:.1f}'} | "
                f"{'–' if gbps is None else f'{gbps:.1f}'} |")
        if mem_bandwidth_gbps:
            line += " – |" if gbps is None else f" {gbps / mem_bandwidth_gbps:.2f} |"
        out.append(line)
    deepest = max(r["depth"] for r in rows)
    at = {r["config"]: r for r in rows if r["depth"] == deepest}
    out += ["", f"## Goals at depth {deepest}", ""]
    if res["backend"] == "GPU":
        out += _gpu_goals(at)
        out.append("")
        return "\n".join(out)
    target = at.get("q8_0:kvq2")
    if target and target["tg_vs_f16"] is not None and target["pp_vs_f16"] is not None:
        for key, goal, what in (("tg", 0.95, "generation"), ("pp", 0.8, "prompt processing")):
            v = target[f"{key}_vs_f16"]
            out.append(f"- K=q8_0, V=kvq2 {what}: {v:.2f}× f16/f16 (goal ≥ {goal}): "
                       + ("**met**" if v >= goal else "**not met**"))
    ref = at.get("q8_0:q4_0")
    if ref:
        for label, r in at.items():
            if not any(t.startswith("kvq") for t in (r["k"], r["v"])):
                continue
            for key, what in (("tg", "generation"), ("pp", "prompt processing")):
                a, b = r[f"{key}_mean"], ref[f"{key}_mean"]
                if a and b:
                    out.append(f"- {label} {what}: {a / b:.2f}× upstream's q8_0/q4_0 (goal ≥ 1): "
                               + ("met" if a >= b else "**not met**"))
    out.append("")
    return "\n".join(out)


def _gpu_goals(at: dict) -> list:
    """Issue 6's speed goals (GPU): K=q4_0 with V=kvq2 generates at least as fast as f16/f16
    and at least 0.9x q4_0/q4_0; its prompt processing is at least 0.9x f16/f16."""
    out = []
    r, f16, q4 = at.get("q4_0:kvq2"), at.get("f16:f16"), at.get("q4_0:q4_0")
    if r is None or f16 is None:
        return ["- q4_0:kvq2 and f16:f16 were not both measured at this depth: no goal checked"]
    checks = [("tg", f16, 1.0, "generation, against f16/f16"), ("pp", f16, 0.9, "prompt processing, against f16/f16")]
    if q4 is not None:
        checks.insert(1, ("tg", q4, 0.9, "generation, against q4_0/q4_0"))
    for key, ref, goal, what in checks:
        a, b = r[f"{key}_mean"], ref[f"{key}_mean"]
        if a and b:
            out.append(f"- K=q4_0, V=kvq2 {what}: {a / b:.2f}× (goal ≥ {goal}): "
                       + ("**met**" if a >= goal * b else "**not met**"))
    return out
