"""`pyadaq calibrate`: the mean and principal components of each layer's keys and values per KV
head (pyadaq.model.calibration), captured while the model reads a text from an f16 cache, over
every ubatch of every chunk. Results are cached under ``$PYADAQ_CACHE_DIR/kv-calibrations``, keyed by
the model's sha256, the text's sha256, the context size, the chunk count and pyadaq's native
build."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from pathlib import Path

from pyadaq import _paths
from pyadaq._native import native
from pyadaq._version import __version__
from pyadaq.eval.analyze import capture_moments, first_token_rows
from pyadaq.eval.texts import calibration_text
from pyadaq.model.calibration import (
    FORMAT,
    Calibration,
    CalibrationFileError,
    read_calibration,
    write_calibration,
)
from pyadaq.model.header import read_model_info

__all__ = ["DEFAULT_CHUNKS", "DEFAULT_CTX", "cache_dir", "cached_path", "calibrate", "offsets_kept"]

# 8192 tokens in chunks of 4096: keys are cached after RoPE, and a calibration covers the
# positions it read (one made of chunks of 2048 cost kvt keys up to twice their KL at 4096; one of
# 4096 costs about 4 % at 512, docs/CALIBRATION.md)
DEFAULT_CTX = 4096
DEFAULT_CHUNKS = 2


def cache_dir() -> Path:
    """Where calibrations are cached: kv-calibrations/ of pyadaq's cache directory."""
    return _paths.cache_dir("kv-calibrations")


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _cached_path(info, text: str, n_ctx: int, n_chunks: int) -> Path:
    key = json.dumps(["kv-calibration", FORMAT, info.sha256, _text_sha(text), n_ctx, n_chunks,
                      native().build_info["info"]])
    return cache_dir() / f"{info.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.gguf"


def cached_path(model_path: str | Path, text: str | None = None, n_ctx: int = DEFAULT_CTX,
                n_chunks: int = DEFAULT_CHUNKS) -> Path:
    """Where calibrate() keeps its result for these arguments."""
    return _cached_path(read_model_info(model_path), text if text is not None else calibration_text(), n_ctx,
                        n_chunks)


def offsets_kept(model_path) -> frozenset[tuple[int, bool]]:
    """(layer, is_v) whose K or V offset the model keeps in the data: libllama's answer
    (pyadaq_model_kv_offsets; soft-capped attention logits keep the keys', attention sinks both)."""
    from pyadaq.runtime.context import Model

    n = native()
    m = Model(str(model_path), n_gpu_layers=0)  # a flag of the model's layers: no weights on a GPU
    try:
        out = set()
        for il in range(m.info.n_layer):
            lets = int(n.llama.pyadaq_model_kv_offsets(n.ffi.cast("void *", m.ptr), il))
            out |= {(il, is_v) for is_v, bit in ((False, 1), (True, 2)) if lets >= 0 and not lets & bit}
        return frozenset(out)
    finally:
        m.close()


def _measure(model_path, info, text: str, n_ctx: int, n_chunks: int, n_threads, progress: bool) -> Calibration:
    tokens, n_read, layers = capture_moments(model_path, text, n_ctx, n_chunks, n_threads, progress,
                                             desc="calibrating (K/V means and principal components)")
    k = {il: m["k"].components() for il, m in enumerate(layers) if m}
    v = {il: m["v"].components() for il, m in enumerate(layers) if m}
    first = first_token_rows(model_path, n_threads)  # None: the model adds no BOS token
    return Calibration(
        model_sha256=info.sha256, model_name=info.name or info.path.name, architecture=info.architecture,
        n_layer=info.n_layer,
        n_head_kv=tuple(k[il].n_head if il in k else 0 for il in range(info.n_layer)),
        head_size_k=tuple(k[il].head_size if il in k else 0 for il in range(info.n_layer)),
        head_size_v=tuple(v[il].head_size if il in v else 0 for il in range(info.n_layer)),
        tokens=tuple(m["k"].rows if m else 0 for m in layers), text_sha256=_text_sha(text), text_tokens=tokens,
        n_ctx=n_ctx, chunks=n_read, pyadaq_version=__version__, build=native().build_info["info"],
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(), k=k, v=v,
        first_token=None if first is None else first[0],
        k_first=None if first is None else {il: rows["k"] for il, rows in first[1].items()},
        v_first=None if first is None else {il: rows["v"] for il, rows in first[1].items()},
        offsets_kept=offsets_kept(model_path),
    )


def calibrate(model_path: str | Path, text: str | None = None, n_ctx: int = DEFAULT_CTX,
              n_chunks: int = DEFAULT_CHUNKS, out: str | Path | None = None, n_threads: int | None = None,
              progress: bool = True, use_cache: bool = True) -> Calibration:
    """The calibration of the model on `text` (default: :func:`calibration_text`), from the cache
    when it holds one for the same arguments, written to `out` too when given."""
    text = text if text is not None else calibration_text()
    info = read_model_info(model_path)
    cached = _cached_path(info, text, n_ctx, n_chunks)
    cal = None
    if use_cache and cached.exists():
        try:
            cal = read_calibration(cached)
        except CalibrationFileError:
            cached.unlink(missing_ok=True)  # a damaged cache entry is measured again
        if cal is not None and cal.offsets_kept is None:  # made before offsets_kept was recorded
            cal = dataclasses.replace(cal, offsets_kept=offsets_kept(model_path))
            write_calibration(cal, cached)  # (cal.path is already this file)
    if cal is None:
        cal = _measure(model_path, info, text, n_ctx, n_chunks, n_threads, progress)
        cal = dataclasses.replace(cal, path=write_calibration(cal, cached))
    if out is not None:
        cal = dataclasses.replace(cal, path=write_calibration(cal, out))
    return cal
