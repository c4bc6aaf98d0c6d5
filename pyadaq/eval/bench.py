"""Prompt-processing and generation speed per K/V configuration and context depth.

Measured the way llama.cpp's llama-bench measures "pp512 @ d4096" and "tg128 @ d4096": the
cache is first filled with `depth` tokens (not timed), each test runs once untimed (a warm-up, as
llama-bench's), then `n_prompt` tokens are decoded in batches of n_batch (prompt processing) or
`n_gen` tokens one at a time (generation), timed.
Between repetitions the timed tokens are removed from the cache again (llama_memory_seq_rm),
so every repetition starts at the same depth. Tokens are random ids (speed does not depend on
which tokens they are).

Memory: for each config and depth, the growth of the process's peak resident set size over the
context's whole life (creation, filling, the timed runs), measured from the kernel's high-water
mark (Linux: /proc/self/status VmHWM, reset through /proc/self/clear_refs before each context).
It holds the KV cache, llama.cpp's compute buffers and any scratch an op takes; the model's
weights are loaded before and not in it.

The figures are reported, not judged: scripts/check_speed_goals.py compares a run's JSON with
the project's speed goals.
"""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from pyadaq._native import native
from pyadaq.runtime.context import Model, quiet_native_logs
from pyadaq.runtime.kvconfig import config_label, config_row, open_context

_L = native().llama_cpp


class PeakRSS:
    """Peak resident set size growth of this process from ``reset()`` on (Linux), in bytes;
    ``None`` where the kernel does not report it."""

    def __init__(self) -> None:
        self.base: int | None = None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    @staticmethod
    def _release_freed_memory() -> None:
        """glibc: serve every allocation above 128 KiB from its own mapping (returned to the
        system when freed; an explicit threshold also stops glibc from raising it after each
        free) and trim the heap, so that memory a previous context freed is not counted as
        still resident, nor reused unseen by the next one."""
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
            libc.malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def reset(self) -> None:
        self._release_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the high-water mark to the current RSS
        except OSError:
            self.base = None
            return
        self.base = self._status("VmRSS")

    def growth(self) -> int | None:
        peak = self._status("VmHWM")
        if self.base is None or peak is None:
            return None
        return max(peak - self.base, 0)


def gpu_offload() -> bool:
    return native().gpu_devices() > 0


def context_size(depth: int, n_prompt: int, n_gen: int) -> int:
    need = depth + max(n_prompt, n_gen) + 1
    return -(-need // 256) * 256


def time_prompt(ctx, toks, depth: int, step: int) -> float:
    """Tokens per second of one batch of ``toks`` after ``depth`` cached tokens (in ubatches of
    ``step``); the cache is cut back to ``depth`` afterwards."""
    t0 = time.perf_counter()
    ctx.decode(toks, depth, logits_from=len(toks) - 1, step=step)
    tps = len(toks) / (time.perf_counter() - t0)
    ctx.drop_from(depth)
    return tps


def time_generation(ctx, toks, depth: int, step: int) -> float:
    """Tokens per second of ``toks`` decoded one at a time after ``depth`` cached tokens; the cache
    is cut back to ``depth`` afterwards."""
    t0 = time.perf_counter()
    for i, t in enumerate(toks):
        ctx.decode(np.array([t]), depth + i, logits_from=0, step=step)
    tps = len(toks) / (time.perf_counter() - t0)
    ctx.drop_from(depth)
    return tps


def run_bench(model_path: str, configs: list, depths=(0, 1024, 4096), n_prompt: int = 512, n_gen: int = 64,
              reps: int = 3, n_threads: int | None = None, n_batch: int = 512, seed: int = 0,
              progress: bool = True, n_gpu_layers: int | None = None, swa_full: bool = True) -> dict:
    """Speed of each config at each depth. Returns {"results": [{config fields, "depth",
    "pp_tps": [per rep], "tg_tps": [...], "pp_mean", "pp_std", "tg_mean", "tg_std", "kv_bytes",
    "n_ctx"}], ...}. n_prompt or n_gen may be 0 to skip that test. swa_full: the sliding-window
    layers of a model that has them keep the whole context (llama.cpp's library default, and
    pyadaq.Llama's) or only their window (False: llama-server's and llama-bench's choice)."""
    quiet_native_logs()
    depths = [int(d) for d in depths]
    if n_gpu_layers is None:  # everything on the GPU when the library has a GPU backend
        n_gpu_layers = 999 if gpu_offload() else 0
    model = Model(str(model_path), n_gpu_layers=n_gpu_layers)
    weight_bytes = int(_L.llama_model_size(model.ptr))
    rng = np.random.default_rng(seed)
    n_vocab = model.n_vocab
    results = []
    rss = PeakRSS()
    bar = tqdm(total=len(configs) * len(depths) * reps, desc="bench configs x depths x reps", disable=not progress)
    try:
        for cfg in configs:
            for depth in depths:
                n_ctx = context_size(depth, n_prompt, n_gen)
                rss.reset()
                step = min(n_batch, n_ctx)
                # the context's batch as llama-bench's (-b = -ub = n_batch)
                ctx = open_context(model, cfg, n_ctx, n_threads, n_batch=step, swa_full=swa_full)

                try:
                    if depth:
                        ctx.decode(rng.integers(0, n_vocab, depth), 0, logits_from=depth - 1, step=step)
                    # one untimed run of each test first, as llama-bench does: the first decode of a
                    # shape allocates and faults in the compute buffers
                    if n_prompt:
                        time_prompt(ctx, rng.integers(0, n_vocab, n_prompt), depth, step)
                    if n_gen:
                        time_generation(ctx, rng.integers(0, n_vocab, 1), depth, step)
                    pp, tg = [], []
                    for _ in range(reps):
                        if n_prompt:
                            pp.append(time_prompt(ctx, rng.integers(0, n_vocab, n_prompt), depth, step))
                        if n_gen:
                            tg.append(time_generation(ctx, rng.integers(0, n_vocab, n_gen), depth, step))
                        bar.update()
                    # What one generated token must read: every weight once, and the KV cache up to
                    # the cells in use (llama.cpp reads them in steps of 256); iSWA caches are read
                    # whole at depth, so scaling the allocated bytes is exact there and an
                    # overestimate near depth 0. With the GPU's memory bandwidth this bounds tg.
                    kv_read = (ctx.kv_cache_bytes * min(1.0, (-(-(depth + n_gen) // 256) * 256) / n_ctx)
                               + ctx.kv_window_bytes)
                    # a KV window's f16 rows count with the cache (kv_window_bytes of it)
                    row = {**config_row(cfg), "depth": depth, "n_ctx": n_ctx,
                           "kv_bytes": ctx.kv_cache_bytes + ctx.kv_window_bytes, "kv_window_bytes": ctx.kv_window_bytes,
                           "peak_rss_growth_bytes": rss.growth(),
                           "tg_bytes_per_token": int(weight_bytes + kv_read), "pp_tps": pp, "tg_tps": tg}
                    for key, vals in (("pp", pp), ("tg", tg)):
                        row[f"{key}_mean"] = float(np.mean(vals)) if vals else None
                        # one repetition has no spread: None, not 0
                        row[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
                    results.append(row)
                finally:
                    ctx.close()
    finally:
        bar.close()
        model.close()
    for r in results:
        r["tg_gbps"] = r["tg_mean"] * r["tg_bytes_per_token"] / 1e9 if r["tg_mean"] else None
    base = {r["depth"]: r for r in results if r["config"] == "f16:f16"}
    ratios = {"pp_vs_f16": "pp_mean", "tg_vs_f16": "tg_mean", "memory_vs_f16": "peak_rss_growth_bytes",
              "kv_vs_f16": "kv_bytes"}
    for r in results:
        b = base.get(r["depth"])
        for name, key in ratios.items():
            r[name] = r[key] / b[key] if b is not None and r[key] and b[key] else None
    return {"model": str(model_path), "backend": "GPU" if n_gpu_layers else "CPU", "n_gpu_layers": n_gpu_layers,
            "noisy_baseline": noisy_baseline(results),
            "weight_bytes": weight_bytes,
            "depths": depths, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps,
            "n_batch": n_batch, "swa_full": swa_full, "configs": [config_label(c) for c in configs], "results": results}


def relative_sd(r: dict, key: str) -> float | None:
    m, sd = r.get(f"{key}_mean"), r.get(f"{key}_std")
    return sd / m if m and sd is not None else None


def noisy_baseline(results: list, factor: float = 2.0, floor: float = 0.05) -> list:
    """Depths and tests where f16/f16's spread (relative sd) is above ``floor`` and more than
    ``factor`` times that of a config compared with it: the ratios there say more about the
    machine's noise than about the configs."""
    out = []
    for b in (r for r in results if r["config"] == "f16:f16"):
        for key in ("pp", "tg"):
            rb = relative_sd(b, key)
            if rb is None or rb <= floor:
                continue
            others = [relative_sd(r, key) for r in results if r["depth"] == b["depth"] and r["config"] != "f16:f16"]
            others = [x for x in others if x is not None]
            if others and rb > factor * min(others):
                out.append({"depth": b["depth"], "test": key, "f16_relative_sd": rb, "others_min": min(others)})
    return out
