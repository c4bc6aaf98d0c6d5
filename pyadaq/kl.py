"""Compare KV-cache configurations by KL divergence against an f16 cache, chunk by chunk.

Scoring follows llama.cpp's perplexity tool: the text is cut into chunks of n_ctx tokens,
each chunk starts with BOS and is evaluated from an empty cache, and the second half of
each chunk is scored (the logits at position j predict token j+1).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .logits import Context, Model, quiet_native_logs
from .metrics import Accumulator, decode_logprobs, encode_logprobs, log_softmax
from .types import cache_type

SCORING_VERSION = 1  # bump when the chunking or scoring changes: stored references are then redone


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


def cache_root() -> Path:
    base = os.environ.get("PYADAQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pyadaq")
    return Path(base) / "eval-ref"


class ReferenceStore:
    """The f16/f16 reference of one model, text and context size, chunk by chunk, on disk.

    The key covers everything the reference depends on: the model file's sha256, the text's
    sha256, the context size, the scoring version and the native build (upstream pin and
    patch set); change any of them and the reference is computed again.
    """

    def __init__(self, root: Path, *, model_sha256: str, text_sha256: str, n_ctx: int):
        from ._native import native

        self.meta = {
            "model_sha256": model_sha256, "text_sha256": text_sha256, "n_ctx": n_ctx,
            "scoring": SCORING_VERSION, "native": native().build_info["info"],
        }
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = Path(root) / key
        self.hits = 0
        self.misses = 0

    def _paths(self, i: int) -> tuple[Path, Path]:
        return self.dir / f"chunk{i:04d}-lp.npy", self.dir / f"chunk{i:04d}-top1.npy"

    def get(self, i: int):
        lp, top1 = self._paths(i)
        if lp.exists() and top1.exists():
            try:
                out = decode_logprobs(np.load(lp, mmap_mode="r")), np.load(top1)
                self.hits += 1
                return out
            except (OSError, ValueError):
                pass  # a damaged entry is recomputed
        self.misses += 1
        return None

    def put(self, i: int, logits: np.ndarray):
        """Store the reference of chunk i from its logits; return (log-probs, top-1) as stored."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            meta.write_text(json.dumps(self.meta, indent=1))
        q = encode_logprobs(log_softmax(logits))
        top1 = np.asarray(logits).argmax(-1).astype(np.int32)
        for path, arr in zip(self._paths(i), (q, top1)):
            tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
            np.save(tmp, arr)
            os.replace(tmp, path)
        return decode_logprobs(q), top1


def compare(model_path: str, configs: list[tuple[str, str]], text: str | None = None, n_ctx: int = 512,
            n_chunks: int = 20, attn_rot: bool = True, n_threads: int | None = None,
            progress: bool = True, store: ReferenceStore | None | bool = None) -> dict:
    """Score each K/V config against an f16/f16 cache on the same chunks.

    store: a ReferenceStore, True for the default one (keyed by model, text and n_ctx), or
    None/False to compute the reference in memory only.
    """
    quiet_native_logs()
    text = text if text is not None else default_text()
    model = Model(model_path)
    toks = model.tokenize(text, add_bos=True)
    bos = int(toks[0])
    parts = chunks(toks, n_ctx, n_chunks, bos)
    first = n_ctx // 2
    if store is True:
        from .gguf_info import read_model_info

        store = ReferenceStore(cache_root(), model_sha256=read_model_info(model_path).sha256,
                               text_sha256=hashlib.sha256(text.encode()).hexdigest(), n_ctx=n_ctx)
    ref: Context | None = None
    ctxs = {cfg: Context(model, cfg[0], cfg[1], n_ctx, n_threads, attn_rot=attn_rot) for cfg in configs}
    acc = {cfg: Accumulator() for cfg in configs}
    secs = {cfg: 0.0 for cfg in configs}
    bar = tqdm(total=len(parts) * (len(configs) + 1), desc="chunks x configs", disable=not progress)
    for i, ch in enumerate(parts):
        got = store.get(i) if store else None
        if got is None:
            if ref is None:
                ref = Context(model, "f16", "f16", n_ctx, n_threads, attn_rot=attn_rot)
            ref_logits = ref.logits(ch, first)[:-1]
            if store:
                got = store.put(i, ref_logits)
            else:
                lp = log_softmax(ref_logits)
                got = lp, lp.argmax(-1)
        lp_ref, top1 = got
        bar.update()
        nxt = ch[first + 1:]
        for cfg, ctx in ctxs.items():
            t0 = time.perf_counter()
            lg = ctx.logits(ch, first)[:-1]
            secs[cfg] += time.perf_counter() - t0
            acc[cfg].add_logprobs(lp_ref, top1, lg, nxt)
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
    if ref is None:  # the reference came from the store: size an f16 cache all the same
        ref = Context(model, "f16", "f16", n_ctx, n_threads)
    f16_bytes = ref.kv_cache_bytes
    out = {
        "model": str(model_path), "n_ctx": n_ctx, "chunks": len(parts), "attn_rot": attn_rot,
        "f16_kv_bytes": f16_bytes, "results": results,
        "reference": ({"dir": str(store.dir), "hits": store.hits, "misses": store.misses} if store else None),
    }
    for c in [*ctxs.values(), ref]:
        c.close()
    model.close()
    return out
