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
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ._atomic import atomic_write, atomic_write_text
from .logits import Context, Model, quiet_native_logs
from .metrics import Accumulator, decode_logprobs, encode_logprobs, log_softmax
from .types import cache_type

SCORING_VERSION = 1  # bump when the chunking or scoring changes: stored references are then redone


def default_text() -> str:
    """English prose every Python install carries: the topics of the standard library's pydoc."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass(frozen=True)
class LayerSpec:
    """A per-layer config as written in --configs, before the model is known:
    kind "plan" (arg: a plan file) or "budget" (arg: bits per value, optional ":kl"/":norms")."""
    kind: str
    arg: str

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.arg}"


@dataclass(frozen=True)
class LayerConfig:
    """A per-layer config ready to run: one K and one V type name per layer."""
    label: str
    types_k: tuple
    types_v: tuple
    bits_per_value: float | None = None  # a plan's own figure; None: the mean over K and V types

    @property
    def k(self) -> str:
        return max(set(self.types_k), key=self.types_k.count)

    @property
    def v(self) -> str:
        return max(set(self.types_v), key=self.types_v.count)


def parse_configs(spec: str) -> list:
    """'q8_0:kvq2,f16:f16,plan:p.json,budget:3.0' -> [('q8_0', 'kvq2'), ('f16', 'f16'),
    LayerSpec('plan', 'p.json'), LayerSpec('budget', '3.0')]; type names are checked."""
    out: list = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        head, _, rest = item.partition(":")
        if head in ("plan", "budget"):
            if not rest:
                raise ValueError(f"config '{item}' needs an argument: plan:FILE or budget:BITS[:kl|:norms]")
            if head == "budget":
                bits, _, source = rest.partition(":")
                try:
                    float(bits)
                except ValueError:
                    raise ValueError(f"config '{item}': '{bits}' is not a number of bits per value") from None
                if source and source not in ("kl", "norms"):
                    raise ValueError(f"config '{item}': the sensitivity source is kl or norms, not '{source}'")
            out.append(LayerSpec(head, rest))
            continue
        if item.count(":") != 1:
            raise ValueError(f"config '{item}' is not K:V (for example q8_0:kvq2), plan:FILE or budget:BITS")
        k, v = item.split(":")
        out.append((cache_type(k).name, cache_type(v).name))
    if not out:
        raise ValueError("no configs given")
    return out


def resolve_configs(configs: list, model_path: str, progress: bool = True) -> list:
    """Turn LayerSpec entries into LayerConfig for this model (plans are loaded and checked,
    budgets planned); uniform (k, v) pairs pass through."""
    from .gguf_info import read_model_info
    from .planner import KVPlan, check_plan

    info = read_model_info(model_path)
    out = []
    for c in configs:
        if not isinstance(c, LayerSpec):
            out.append(c)
            continue
        if c.kind == "plan":
            plan = KVPlan.load(c.arg)
            check_plan(plan, info, info.sha256)
        else:
            from .adaptive import plan_for_budget

            bits, _, source = c.arg.partition(":")
            plan = plan_for_budget(model_path, float(bits), source=source or "kl", progress=progress)
        out.append(LayerConfig(c.label, tuple(plan.types_k), tuple(plan.types_v), float(plan.bits_per_value)))
    return out


def config_label(cfg) -> str:
    return cfg.label if isinstance(cfg, LayerConfig) else f"{cfg[0]}:{cfg[1]}"


def open_context(model, cfg, n_ctx: int, n_threads=None, attn_rot: bool = True):
    """A Context for a uniform (k, v) pair or a LayerConfig."""
    if isinstance(cfg, LayerConfig):
        return Context(model, cfg.k, cfg.v, n_ctx, n_threads, attn_rot=attn_rot,
                       layer_types=(list(cfg.types_k), list(cfg.types_v)))
    return Context(model, cache_type(cfg[0]), cache_type(cfg[1]), n_ctx, n_threads, attn_rot=attn_rot)


def config_row(cfg) -> dict:
    """The identifying fields of a result row."""
    if isinstance(cfg, LayerConfig):
        def mean_bits(ts):
            return sum(cache_type(t).bits_per_value for t in ts) / len(ts)

        bits_k, bits_v = mean_bits(cfg.types_k), mean_bits(cfg.types_v)
        return {"config": cfg.label, "k": cfg.k, "v": cfg.v, "per_layer": True,
                "types_k": list(cfg.types_k), "types_v": list(cfg.types_v), "bits_k": bits_k, "bits_v": bits_v,
                "bits_per_value": cfg.bits_per_value if cfg.bits_per_value is not None else (bits_k + bits_v) / 2}
    k, v = cache_type(cfg[0]), cache_type(cfg[1])
    return {"config": f"{k.name}:{v.name}", "k": k.name, "v": v.name,
            "bits_k": k.bits_per_value, "bits_v": v.bits_per_value,
            "bits_per_value": (k.bits_per_value + v.bits_per_value) / 2}


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


def cache_base() -> Path:
    """pyadaq's cache directory: $PYADAQ_CACHE_DIR, else $XDG_CACHE_HOME/pyadaq or ~/.cache/pyadaq."""
    base = os.environ.get("PYADAQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pyadaq")
    return Path(base)


def cache_root() -> Path:
    return cache_base() / "eval-ref"


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

    def load(self, i: int):
        """(log-probs, top-1) of chunk i, or None if it is not stored (or damaged)."""
        lp, top1 = self._paths(i)
        try:
            return decode_logprobs(np.load(lp, mmap_mode="r")), np.load(top1)
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
        else:
            self.misses += 1
        return ok

    def put(self, i: int, logits: np.ndarray):
        """Store the reference of chunk i from its logits; return (log-probs, top-1) as stored."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            atomic_write_text(meta, json.dumps(self.meta, indent=1))
        q = encode_logprobs(log_softmax(logits))
        top1 = np.asarray(logits).argmax(-1).astype(np.int32)
        for path, arr in zip(self._paths(i), (q, top1)):
            atomic_write(path, partial(np.save, arr=arr))
        return decode_logprobs(q), top1


def compare(model_path: str, configs: list[tuple[str, str]], text: str | None = None, n_ctx: int = 512,
            n_chunks: int = 20, attn_rot: bool = True, n_threads: int | None = None,
            progress: bool = True, store: ReferenceStore | None | bool = None) -> dict:
    """Score each K/V config against an f16/f16 cache on the same chunks.

    The f16 reference of every chunk is computed first (or found in `store`), then one
    configuration at a time gets a context and runs all chunks, so only two contexts are alive
    at once. store: a ReferenceStore, True for the default one on disk (keyed by model, text
    and n_ctx), or None/False for a temporary one deleted afterwards.
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
        from .gguf_info import read_model_info

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
        for cfg in configs:
            ctx = open_context(model, cfg, n_ctx, n_threads, attn_rot)
            acc, secs = Accumulator(), 0.0
            for i, ch in enumerate(parts):
                lp_ref, top1 = store.load(i)
                t0 = time.perf_counter()
                lg = ctx.logits(ch, first)[:-1]
                secs += time.perf_counter() - t0
                acc.add_logprobs(lp_ref, top1, lg, ch[first + 1:])
                bar.update()
            results.append({
                **config_row(cfg),
                "kv_bytes": ctx.kv_cache_bytes,
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
        "f16_kv_bytes": f16_bytes, "results": results,
        "reference": None if tmp is not None else {"dir": str(store.dir), "hits": store.hits, "misses": store.misses},
    }
