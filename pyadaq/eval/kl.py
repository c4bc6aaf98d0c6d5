"""Compare KV-cache configurations by KL divergence against an f16 cache, chunk by chunk.

Scoring follows llama.cpp's perplexity tool: the text is cut into chunks of n_ctx tokens,
each chunk starts with BOS and is evaluated from an empty cache, and the second half of
each chunk is scored (the logits at position j predict token j+1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pyadaq._atomic import atomic_write, atomic_write_text
from pyadaq._native import native
from pyadaq._paths import cache_dir
from pyadaq.eval.metrics import Accumulator, decode_logprobs, encode_logprobs, log_softmax, row_blocks
from pyadaq.eval.texts import default_text
from pyadaq.model.header import read_model_info
from pyadaq.runtime.context import Context, Model, quiet_native_logs
from pyadaq.runtime.kvconfig import config_row, open_context

SCORING_VERSION = 1  # bump when the chunking or scoring changes: stored references are then redone


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
    """Where the f16 references live: one subdirectory per model, text, context size and build."""
    return cache_dir("eval-ref")


DEFAULT_REF_CACHE_BYTES = 4 << 30


def ref_cache_limit() -> int:
    """The size the f16 reference store is kept under: $PYADAQ_REF_CACHE_GB (GiB), else 4 GiB."""
    raw = os.environ.get("PYADAQ_REF_CACHE_GB", "").strip()
    if not raw:
        return DEFAULT_REF_CACHE_BYTES
    try:
        gb = float(raw)
    except ValueError:
        raise ValueError(f"PYADAQ_REF_CACHE_GB must be a number of GiB, not {raw!r}") from None
    if gb < 0:
        raise ValueError(f"PYADAQ_REF_CACHE_GB must be >= 0, not {raw!r}")
    return int(gb * (1 << 30))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def evict(root: Path, limit: int, keep: Path | None = None) -> list:
    """Remove whole reference directories under ``root``, least recently used first (by their
    ``used`` stamp), until the rest fits in ``limit`` bytes; ``keep`` (the one in use) stays.
    Returns the removed directories."""
    import shutil

    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir()]
    sizes = {d: dir_bytes(d) for d in dirs}
    total = sum(sizes.values())

    def last_used(d: Path) -> float:
        stamp = d / "used"
        return stamp.stat().st_mtime if stamp.exists() else d.stat().st_mtime

    removed = []
    for d in sorted(dirs, key=last_used):
        if total <= limit:
            break
        if keep is not None and d.resolve() == keep.resolve():
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= sizes[d]
        removed.append(d)
    return removed


class ReferenceStore:
    """The f16/f16 reference of one model, text and context size, chunk by chunk, on disk.

    The key covers everything the reference depends on: the model file's sha256, the text's
    sha256, the context size, the scoring version and the native build (upstream pin and
    patch set); change any of them and the reference is computed again.

    Stored log-probabilities take 2 bytes per vocabulary entry and scored token (134 MB per
    512-token chunk of a 262k-token vocabulary), so the store is bounded: after each chunk it
    writes, whole references are evicted, least recently used first, until the store fits in
    ``limit`` bytes (:func:`ref_cache_limit`: $PYADAQ_REF_CACHE_GB, default 4 GiB). The
    reference in use is never evicted. ``pyadaq cache`` shows and clears it.
    """

    def __init__(self, root: Path, *, model_sha256: str, text_sha256: str, n_ctx: int, limit: int | None = None):
        self.root = Path(root)
        self.limit = ref_cache_limit() if limit is None else limit
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

    def load(self, i: int):
        """(log-probs as stored, :func:`encode_logprobs`; top-1) of chunk i, or None if it is not
        stored (or damaged)."""
        lp, top1 = self._paths(i)
        try:
            return np.load(lp, mmap_mode="r"), np.load(top1)
        except (OSError, ValueError):
            return None  # missing or damaged: computed again

    def contains(self, i: int) -> bool:
        """Whether chunk i is stored, counted as a hit or a miss."""
        lp, top1 = self._paths(i)
        try:
            ok = np.load(lp, mmap_mode="r").ndim == 2 and np.load(top1).ndim == 1
        except (OSError, ValueError):
            ok = False
        if ok:
            self.hits += 1
            self._touch()
        else:
            self.misses += 1
        return ok

    def _touch(self) -> None:
        """Mark this reference as just used (what eviction orders by)."""
        with contextlib.suppress(OSError):
            (self.dir / "used").touch()

    def put(self, i: int, logits: np.ndarray):
        """Store the reference of chunk i from its logits; return (log-probs, top-1) as stored
        (log-probs encoded, :func:`encode_logprobs`)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            atomic_write_text(meta, json.dumps(self.meta, indent=1))
        logits = np.asarray(logits)
        q = np.concatenate([encode_logprobs(log_softmax(logits[s])) for s in row_blocks(*logits.shape)])
        top1 = logits.argmax(-1).astype(np.int32)
        for path, arr in zip(self._paths(i), (q, top1)):
            atomic_write(path, partial(np.save, arr=arr))
        self._touch()
        evict(self.root, self.limit, keep=self.dir)
        return q, top1


def compare(model_path: str, configs: list[tuple[str, str]], text: str | None = None, n_ctx: int = 512,
            n_chunks: int = 20, attn_rot: bool = True, n_threads: int | None = None,
            progress: bool = True, store: ReferenceStore | bool | None = None, flash_attn: bool = True) -> dict:
    """Score each K/V config against an f16/f16 cache on the same chunks.

    The f16 reference of every chunk is computed first (or found in `store`), then one
    configuration at a time gets a context and runs all chunks, so only two contexts are alive
    at once. store: a ReferenceStore, True for the default one on disk (keyed by model, text
    and n_ctx), or None/False for a temporary one deleted afterwards. flash_attn: for the
    configurations' contexts (the reference always runs with flash attention).
    """
    import tempfile

    quiet_native_logs()
    text = text if text is not None else default_text()
    model = Model(model_path)
    toks = model.tokenize(text, add_bos=True)
    # like llama-perplexity: each chunk starts with BOS if the model adds one
    parts = chunks(toks, n_ctx, n_chunks, int(toks[0]) if model.adds_bos else None)
    first = n_ctx // 2
    tmp = None
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    if store is True:
        store = ReferenceStore(cache_root(), model_sha256=read_model_info(model_path).sha256,
                               text_sha256=text_sha, n_ctx=n_ctx)
    elif not store:
        tmp = tempfile.TemporaryDirectory(prefix="pyadaq-ref-")
        store = ReferenceStore(Path(tmp.name), model_sha256="-", text_sha256=text_sha, n_ctx=n_ctx)
    bar = tqdm(total=len(parts) * (len(configs) + 1), desc="chunks x configs", disable=not progress)
    try:
        ref = Context(model, "f16", "f16", n_ctx, n_threads, attn_rot=attn_rot)
        f16_bytes = ref.kv_cache_bytes
        for i, ch in enumerate(parts):
            if not store.contains(i):
                store.put(i, ref.logits(ch, first)[:-1])
            bar.update()
        ref.close()
        results = []
        ref_nll: list = []  # the f16 reference's own perplexity, from the stored log-probs
        for n_cfg, cfg in enumerate(configs):
            ctx = open_context(model, cfg, n_ctx, n_threads, attn_rot, flash_attn)
            acc, secs = Accumulator(), 0.0
            for i, ch in enumerate(parts):
                q_ref, top1 = store.load(i)
                if n_cfg == 0:
                    nxt = ch[first + 1:]
                    ref_nll.extend((-decode_logprobs(q_ref[np.arange(len(nxt)), nxt])).tolist())
                t0 = time.perf_counter()
                lg = ctx.logits(ch, first)[:-1]
                secs += time.perf_counter() - t0
                acc.add_encoded(q_ref, top1, lg, ch[first + 1:])
                bar.update()
            results.append({
                **config_row(cfg),
                "kv_bytes": ctx.kv_cache_bytes + ctx.kv_window_bytes,  # a KV window's f16 rows count
                "kv_window_bytes": ctx.kv_window_bytes,
                "seconds": secs,
                **acc.summary(),
            })
            ctx.close()
    finally:
        bar.close()
        model.close()
        if tmp is not None:
            tmp.cleanup()
    return {
        "model": str(model_path), "n_ctx": n_ctx, "chunks": len(parts), "attn_rot": attn_rot,
        "f16_kv_bytes": f16_bytes, "f16_ppl": float(np.exp(np.mean(ref_nll))) if ref_nll else None,
        "results": results,
        "reference": None if tmp is not None else {"dir": str(store.dir), "hits": store.hits, "misses": store.misses},
    }
