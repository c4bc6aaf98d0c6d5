"""Compare KV-cache configurations by KL divergence against an f16 cache, chunk by chunk.

Scoring follows llama.cpp's perplexity tool: the text is cut into chunks of n_ctx tokens,
each chunk starts with BOS and is evaluated from an empty cache, and the second half of
each chunk is scored (the logits at position j predict token j+1).
"""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from .logits import Context, Model, quiet_native_logs
from .metrics import Accumulator
from .types import cache_type


def default_text() -> str:
    """English prose every Python install carries: the topics of the standard library's pydoc."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def parse_configs(spec: str) -> list[tuple[str, str]]:
    """'q8_0:kvq2,f16:f16' -> [('q8_0', 'kvq2'), ('f16', 'f16')]; names are checked."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if item.count(":") != 1:
            raise ValueError(f"config '{item}' is not K:V (for example q8_0:kvq2)")
        k, v = item.split(":")
        out.append((cache_type(k).name, cache_type(v).name))
    if not out:
        raise ValueError("no configs given")
    return out


def chunks(tokens: np.ndarray, n_ctx: int, n_chunks: int, bos: int | None) -> list[np.ndarray]:
    n_avail = len(tokens) // n_ctx
    if n_avail < 1:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    out = []
    for c in range(min(n_chunks, n_avail)):
        ch = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
        if bos is not None:
            ch[0] = bos
        out.append(ch)
    return out


def compare(model_path: str, configs: list[tuple[str, str]], text: str | None = None, n_ctx: int = 512,
            n_chunks: int = 20, attn_rot: bool = True, n_threads: int | None = None,
            progress: bool = True) -> dict:
    quiet_native_logs()
    model = Model(model_path)
    toks = model.tokenize(text if text is not None else default_text(), add_bos=True)
    bos = int(toks[0])
    parts = chunks(toks, n_ctx, n_chunks, bos)
    first = n_ctx // 2
    ref = Context(model, "f16", "f16", n_ctx, n_threads, attn_rot=attn_rot)
    ctxs = {cfg: Context(model, cfg[0], cfg[1], n_ctx, n_threads, attn_rot=attn_rot) for cfg in configs}
    acc = {cfg: Accumulator() for cfg in configs}
    secs = {cfg: 0.0 for cfg in configs}
    bar = tqdm(total=len(parts) * (len(configs) + 1), desc="chunks x configs", disable=not progress)
    for ch in parts:
        ref_logits = ref.logits(ch, first)[:-1]
        bar.update()
        nxt = ch[first + 1:]
        for cfg, ctx in ctxs.items():
            t0 = time.perf_counter()
            lg = ctx.logits(ch, first)[:-1]
            secs[cfg] += time.perf_counter() - t0
            acc[cfg].add(ref_logits, lg, nxt)
            bar.update()
    bar.close()
    results = []
    for cfg in configs:
        k, v = cache_type(cfg[0]), cache_type(cfg[1])
        results.append({
            "k": k.name, "v": v.name,
            "bits_k": k.bits_per_value, "bits_v": v.bits_per_value,
            "bits_per_value": (k.bits_per_value + v.bits_per_value) / 2,
            "kv_bytes": ctxs[cfg].kv_cache_bytes,
            "seconds": secs[cfg],
            **acc[cfg].summary(),
        })
    out = {
        "model": str(model_path), "n_ctx": n_ctx, "chunks": len(parts), "attn_rot": attn_rot,
        "f16_kv_bytes": ref.kv_cache_bytes, "results": results,
    }
    for c in list(ctxs.values()) + [ref]:
        c.close()
    model.close()
    return out
