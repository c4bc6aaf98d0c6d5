"""`pyadaq calibrate`: the mean and principal components of each layer's keys and values per KV
head (pyadaq.model.calibration), captured while the model reads a text from an f16 cache, over
every ubatch of every chunk. Results are cached under ``$PYADAQ_CACHE_DIR/kv-calibrations``, keyed by
the model's sha256, the text's sha256, the context size, the chunk count and pyadaq's native
build."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

from pyadaq import _paths
from pyadaq._native import native
from pyadaq._version import __version__
from pyadaq.eval.analyze import capture_moments
from pyadaq.eval.texts import calibration_text
from pyadaq.model.calibration import (
    Calibration,
    CalibrationFileError,
    components_from_moments,
    read_calibration,
    write_calibration,
)
from pyadaq.model.header import read_model_info

__all__ = ["DEFAULT_CHUNKS", "DEFAULT_CTX", "cache_dir", "cached_path", "calibrate"]

DEFAULT_CTX = 2048
DEFAULT_CHUNKS = 4


def cache_dir() -> Path:
    """Where calibrations are cached: kv-calibrations/ of pyadaq's cache directory."""
    return _paths.cache_dir("kv-calibrations")


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cached_path(model_path: str | Path, text: str | None = None, n_ctx: int = DEFAULT_CTX,
                n_chunks: int = DEFAULT_CHUNKS) -> Path:
    """Where calibrate() keeps its result for these arguments."""
    info = read_model_info(model_path)
    text = text if text is not None else calibration_text()
    key = json.dumps(["kv-calibration", 1, info.sha256, _text_sha(text), n_ctx, n_chunks,
                      native().build_info["info"]])
    return cache_dir() / f"{info.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.gguf"


def calibrate(model_path: str | Path, text: str | None = None, n_ctx: int = DEFAULT_CTX,
              n_chunks: int = DEFAULT_CHUNKS, out: str | Path | None = None, n_threads: int | None = None,
              progress: bool = True, use_cache: bool = True) -> Calibration:
    """The calibration of the model on `text` (default: :func:`calibration_text`), from the cache
    when it holds one for the same arguments, written to `out` too when given."""
    text = text if text is not None else calibration_text()
    cached = cached_path(model_path, text, n_ctx, n_chunks)
    cal = None
    if use_cache and cached.exists():
        try:
            cal = read_calibration(cached)
        except CalibrationFileError:
            cached.unlink(missing_ok=True)  # a damaged cache entry is measured again
    if cal is None:
        info = read_model_info(model_path)
        tokens, n_read, layers = capture_moments(model_path, text, n_ctx, n_chunks, n_threads, progress,
                                                 desc="calibrating (K/V means and principal components)")
        k, v = {}, {}
        n_head_kv, hk, hv, rows = [], [], [], []
        for il, moments in enumerate(layers):
            if not moments:
                n_head_kv.append(0), hk.append(0), hv.append(0), rows.append(0)
                continue
            k[il] = components_from_moments(moments["k"].rows, moments["k"].gram, moments["k"].sum)
            v[il] = components_from_moments(moments["v"].rows, moments["v"].gram, moments["v"].sum)
            n_head_kv.append(k[il].n_head)
            hk.append(k[il].head_size)
            hv.append(v[il].head_size)
            rows.append(moments["k"].rows)
        cal = Calibration(
            model_sha256=info.sha256, model_name=info.name or info.path.name, architecture=info.architecture,
            n_layer=info.n_layer, n_head_kv=tuple(n_head_kv), head_size_k=tuple(hk), head_size_v=tuple(hv),
            tokens=tuple(rows), text_sha256=_text_sha(text), text_tokens=tokens, n_ctx=n_ctx, chunks=n_read,
            pyadaq_version=__version__, build=native().build_info["info"],
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(), k=k, v=v,
        )
        write_calibration(cal, cached)
        cal = read_calibration(cached)
    if out is not None:
        write_calibration(cal, out)
        cal = read_calibration(out)
    return cal
