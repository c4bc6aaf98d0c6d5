"""Adaptive KV-AdaQuant: sensitivities of each layer's K and V, and plans for a bit budget.

Three sources of sensitivity: two as in the paper and its follow-up, one from a KV calibration:

* ``"kl"`` (default, "calibrated-kl"): a calibration pass (``calibrate``) stores one
  layer's K (or V) at a time in each candidate type, every other layer in f16, and records
  the mean KL divergence against an f16 cache on a few chunks of text. The planner minimizes
  the sum of these per-item errors above a common floor (``calibration_floor``).
* ``"norms"`` ("activation-norm"): the per-token Frobenius norms of each layer's keys and
  values from ``pyadaq.eval.analyze.activation_stats``, turned into errors by the rate-distortion
  model error = norm^2 * 2^(-2 * bits).
* ``"spectra"`` ("calibration-spectra"): the squared error each type adds to each layer's K and
  V if they were Gaussian with a KV calibration's spectra (:mod:`pyadaq.plan.spectra`); no run.

With a KV calibration (``kv_calibration``: a file, a Calibration, or "default" for the model's
default one), ``"kl"`` measures every layer in contexts with the calibration's transforms, the
candidate types include the transform-coded ones (``CALIBRATED_TYPES``), and the plan records
the calibration's fingerprint: a plan is made for the coordinates its contexts will store.
The KL runs read :func:`pyadaq.eval.texts.calibration_text` (the half of the default text that
evaluations do not read), so an evaluation of a plan is on text the plan never saw.

``plan_for_budget`` runs (or finds in the cache directory) what the source needs and calls
the planner (``pyadaq.plan.planner.plan_budget``). Results are cached under
``~/.cache/pyadaq/adaptive`` (``$PYADAQ_CACHE_DIR/adaptive``), keyed by the model's sha256,
the text, the context size, the chunk count and pyadaq's native build; a calibration with more
types measures only the ones not yet in the cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pyadaq import _paths
from pyadaq._atomic import atomic_write_text
from pyadaq._native import native
from pyadaq._version import __version__
from pyadaq.eval.analyze import analyze
from pyadaq.eval.kl import compare
from pyadaq.eval.texts import calibration_text
from pyadaq.model.calibration import calibration_for_model
from pyadaq.model.header import read_model_info
from pyadaq.plan.planner import Budget, plan_budget
from pyadaq.report.machine import machine
from pyadaq.runtime.kv_transform import require_calibration
from pyadaq.runtime.kvconfig import Calibrated, LayerConfig
from pyadaq.types import cache_type, formats_fingerprint

__all__ = ["CALIBRATED_TYPES", "DEFAULT_TYPES", "SOURCES", "cache_dir", "calibrate", "default_types",
           "missing_types", "norm_sensitivities", "plan_for_budget"]

DEFAULT_TYPES = ("f16", "q8_0", "q4_0", "kvq3", "kvq2")
# With a KV calibration: the transform-coded profiles at 4.5, 3.5, 2.5 and 1.5 bits beside the
# uniform types (each type adds 2 runs per layer to a calibration; kvt1, the rung below 2.5 bits,
# lets a plan take bits from the layers that need them least).
CALIBRATED_TYPES = ("f16", "q8_0", "kvt4s", "kvt4", "q4_0", "kvt3s", "kvt3", "kvq3", "kvt2s", "kvt2", "kvq2",
                    "kvt1")
SOURCES = ("kl", "norms", "spectra")
# 3: under a KV calibration, keys of flat types measured with their mean out and llama.cpp's
# rotation (kv_transform.keys_by_mean), no longer in principal directions
CALIBRATION_VERSION = 3


def cache_dir() -> Path:
    """Where calibrations and analyses are cached: adaptive/ of pyadaq's cache directory."""
    return _paths.cache_dir("adaptive")


def _key(*parts) -> str:
    """A cache key of these parts, the native build and pyadaq's cache formats."""
    h = hashlib.sha256(json.dumps([*parts, native().build_info["info"], formats_fingerprint()],
                                  sort_keys=True).encode())
    return h.hexdigest()[:24]


def default_types(source: str = "kl", kv_calibration=None) -> tuple:
    """The candidate types a plan uses when none are named: with a KV calibration and a source
    that knows the transform-coded types (kl, spectra), CALIBRATED_TYPES; else DEFAULT_TYPES."""
    return CALIBRATED_TYPES if kv_calibration is not None and source != "norms" else DEFAULT_TYPES


def calibration_path(info, text: str | None = None, n_ctx: int = 512, n_chunks: int = 2,
                     kv_calibration=None) -> Path:
    """Where calibrate() caches its results for the model of `info` (a ModelInfo) and these
    arguments: one file, whatever the types, that grows by the types measured."""
    text_sha = hashlib.sha256((text if text is not None else calibration_text()).encode()).hexdigest()
    fp = None if kv_calibration is None else kv_calibration.fingerprint
    key = _key("calibrate", CALIBRATION_VERSION, info.sha256, text_sha, n_ctx, n_chunks, fp)
    return cache_dir() / f"calibration-{key}.json"


def _read_cached(path: Path) -> dict | None:
    """A cached calibration, or None when there is none or it cannot be read (measured again)."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(res, dict) and res.get("kind") == "pyadaq-calibration"
          and isinstance(res.get("types"), list) and isinstance(res.get("errors_k"), list)
          and isinstance(res.get("errors_v"), list) and isinstance(res.get("settings"), dict)
          and all(isinstance(r, list) and len(r) == len(res["types"]) for r in res["errors_k"] + res["errors_v"]))
    return res if ok else None


def missing_types(info, types: Sequence[str], text: str | None = None, n_ctx: int = 512, n_chunks: int = 2,
                  kv_calibration=None) -> list[str]:
    """The types among `types` that the cached calibration for these arguments has not measured
    (all of them when nothing is cached)."""
    names = [cache_type(t).name for t in types]
    cached = _read_cached(calibration_path(info, text, n_ctx, n_chunks, kv_calibration))
    have = set() if cached is None else set(cached["types"])
    return [t for t in names if t not in have]


def _columns(res: dict, types: Sequence[str]) -> dict:
    """`res` (a calibration) with only the columns of `types`, in that order."""
    col = {t: j for j, t in enumerate(res["types"])}

    def pick(rows):
        return [[r[col[t]] for t in types] for r in rows]

    return {**res, "types": list(types), "errors_k": pick(res["errors_k"]), "errors_v": pick(res["errors_v"])}


def calibration_items(info, types: Sequence[str], kv_calibration=None) -> tuple:
    """(errors, jobs, configs) of a calibration: errors["k"|"v"][layer][type] prefilled with 0.0
    (f16, or a layer without a cache) and None (the type does not fit); jobs the (layer, "k"|"v",
    type column) measured, one LayerConfig each in configs (Calibrated with a KV calibration)."""
    n_layer = info.n_layer
    cache_layers = set(info.cache_layers())
    errors = {"k": [[None] * len(types) for _ in range(n_layer)], "v": [[None] * len(types) for _ in range(n_layer)]}
    jobs, configs = [], []
    for il in range(n_layer):
        for kind in ("k", "v"):
            head = info.head_size_k_layer(il) if kind == "k" else info.head_size_v_layer(il)
            for j, t in enumerate(types):
                ct = cache_type(t)
                if head % ct.block_size:
                    continue
                if ct.name == "f16" or il not in cache_layers:
                    errors[kind][il][j] = 0.0
                    continue
                tk = ["f16"] * n_layer
                tv = ["f16"] * n_layer
                (tk if kind == "k" else tv)[il] = ct.name
                jobs.append((il, kind, j))
                cfg = LayerConfig(f"{kind}{il}:{ct.name}", tuple(tk), tuple(tv))
                configs.append(cfg if kv_calibration is None else Calibrated(cfg, kv_calibration))
    return errors, jobs, configs


def calibrate(model_path: str | Path, types: Sequence[str] = DEFAULT_TYPES, text: str | None = None,
              n_ctx: int = 512, n_chunks: int = 2, n_threads: int | None = None, progress: bool = True,
              use_cache: bool = True, kv_calibration=None) -> dict:
    """KL divergence added by storing one layer's K or V in each type (all else f16), on `text`
    (default: :func:`calibration_text`), in contexts with `kv_calibration`'s transforms when given
    (a Calibration checked against the model; needed for transform-coded types).

    Returns {"settings", "types", "errors_k", "errors_v"}: errors_* are [n_layer][n_types]
    lists of mean KL divergence against an f16 cache (0 for f16 itself; None for a type whose
    block size does not fit the layer). Cached on disk unless use_cache is False: one file for
    these arguments, whatever the types; a later call measures only the types it has not measured.
    """
    info = read_model_info(model_path)
    types = [cache_type(t).name for t in types]
    require_calibration(types, kv_calibration)
    text = text if text is not None else calibration_text()
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    path = calibration_path(info, text, n_ctx, n_chunks, kv_calibration)
    cached = _read_cached(path) if use_cache else None
    todo = [t for t in types if cached is None or t not in cached["types"]]
    if not todo:
        return _columns(cached, types)
    t0 = time.time()
    errors, jobs, configs = calibration_items(info, todo, kv_calibration)
    chunks = n_chunks
    if configs:
        # the f16 reference once, then one context per configuration (kl.compare)
        measured = compare(str(model_path), configs, text=text, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads,
                           progress=progress, store=use_cache)
        chunks = measured["chunks"]
        for (il, kind, j), row in zip(jobs, measured["results"]):
            errors[kind][il][j] = float(row["kl_mean"])
    # the columns measured before (their settings stay), then the new ones
    before = cached or {"settings": {}, "types": [], "errors_k": [[]] * info.n_layer, "errors_v": [[]] * info.n_layer}
    settings = {"model": str(model_path), "model_sha256": info.sha256, "text_sha256": text_sha, "n_ctx": n_ctx,
                "chunks": chunks, "pyadaq": __version__, "machine": machine(),
                "kv_calibration": None if kv_calibration is None else kv_calibration.fingerprint,
                **before["settings"],
                "seconds": before["settings"].get("seconds", 0) + time.time() - t0,
                "runs": before["settings"].get("runs", 0) + len(jobs)}
    new = {"kind": "pyadaq-calibration", "version": CALIBRATION_VERSION, "settings": settings,
           "types": before["types"] + todo,
           "errors_k": [a + b for a, b in zip(before["errors_k"], errors["k"])],
           "errors_v": [a + b for a, b in zip(before["errors_v"], errors["v"])]}
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(new))
    return _columns(new, types)


def norm_sensitivities(analysis: dict) -> tuple[list[float], list[float]]:
    """Per-layer K and V sensitivities from an analysis (pyadaq.analyze): the per-token
    Frobenius norm, averaged over KV heads."""
    layers = analysis["activations"]["layers"]
    sk = [float(np.mean(r["k"]["frobenius_per_token"])) for r in layers]
    sv = [float(np.mean(r["v"]["frobenius_per_token"])) for r in layers]
    return sk, sv


def cached_analysis(model_path, text, n_ctx, n_chunks, n_threads, progress, use_cache) -> dict:
    """pyadaq.eval.analyze.analyze(), stored in the cache directory and reused."""
    info = read_model_info(model_path)
    text_sha = None if text is None else hashlib.sha256(text.encode()).hexdigest()
    path = cache_dir() / f"analysis-{_key('analyze', info.sha256, text_sha, n_ctx, n_chunks)}.json"
    if use_cache and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    res = analyze(model_path, text, n_ctx, n_chunks, n_threads, progress)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(res))
    return res


def errors_from(source_result: dict, types: Sequence[str]) -> tuple:
    """(errors_k, errors_v) arrays [n_layer, len(types)] from a calibration result (columns
    picked by type name; +inf where a type was not measured or does not fit), or None for an
    analysis result (the planner then uses the norms)."""
    if source_result.get("kind") != "pyadaq-calibration":
        return None, None
    cols = {t: i for i, t in enumerate(source_result["types"])}
    missing = [t for t in types if t not in cols]
    if missing:
        raise ValueError(f"the calibration has no figures for {', '.join(missing)} "
                         f"(it measured {', '.join(source_result['types'])}); calibrate with these types")

    def pick(rows):
        return np.array([[np.inf if r[cols[t]] is None else r[cols[t]] for t in types] for r in rows], dtype=float)

    ek, ev = pick(source_result["errors_k"]), pick(source_result["errors_v"])
    floor = calibration_floor(source_result)
    lossy = np.array([cache_type(t).name != "f16" for t in types])
    for e in (ek, ev):
        e[:, lossy] = np.maximum(e[:, lossy] - floor, 0.0)
    return ek, ev


def calibration_floor(cal: dict) -> float:
    """The KL divergence that any perturbation of the cache costs once, wherever it is.

    Measured on Gemma 3 270M: storing a single layer's K or V in q8_0 (or bf16) costs ~0.007
    nats whichever layer it is, and all 36 in q8_0 cost 0.008: this first part does not add
    up over layers, the part above it does (the sum of the excesses predicts the uniform
    pairs within ~15 %). The floor is the median over items of their least lossy error; the
    planner minimizes the sum of the excesses above it.
    """
    cols = [j for j, t in enumerate(cal["types"]) if cache_type(t).name != "f16"]
    least = [min(r[j] for j in cols if r[j] is not None)
             for r in cal["errors_k"] + cal["errors_v"] if any(r[j] is not None for j in cols)]
    return float(np.median(least)) if least else 0.0


def plan_for_budget(model_path: str | Path, budget, *, types: Sequence[str] | None = None,
                    source: str = "kl", source_result: dict | None = None, method: str = "dp",
                    text: str | None = None, n_ctx: int = 512, n_chunks: int = 2,
                    n_threads: int | None = None, progress: bool = True, use_cache: bool = True,
                    kv_calibration=None):
    """A KVPlan for `budget` average bits per cached value (scales included): a number for K and
    V together, or a Budget / "K/V" string such as "q8_0/2.5" (pyadaq.plan.planner.Budget).

    source: "kl" (calibration, measured KL per layer, K/V and type), "norms" (activation
    norms, rate-distortion model) or "spectra" (a KV calibration's spectra, no run);
    source_result: a calibration or analysis dict to use instead of running/caching one (its
    kind decides the source). kv_calibration: a KV calibration (file, Calibration, or "default":
    the model's default one, made and cached when missing) the plan's contexts will run with:
    the kl source measures with its transforms, and types default to CALIBRATED_TYPES.
    """
    info = read_model_info(model_path)
    if source not in SOURCES:
        raise ValueError(f"unknown sensitivity source '{source}': use one of {', '.join(SOURCES)}")
    types = [cache_type(t).name for t in (types or default_types(source, kv_calibration))]
    check_budget_range(info, budget, types)
    cal = kv_calibration_for(model_path, info, kv_calibration, progress)
    if source == "spectra" and cal is None and source_result is None:
        raise ValueError("the spectra source predicts errors from a KV calibration: pass kv_calibration "
                         "(a file from `pyadaq calibrate`, or 'default')")
    require_calibration(types, cal)
    notes = {} if cal is None else {"kv_calibration": cal.fingerprint,
                                    "kv_calibration_file": None if cal.path is None else str(cal.path)}
    if source_result is None and source == "spectra":
        from pyadaq.plan.spectra import predicted_errors

        errors_k, errors_v = predicted_errors(cal, types)
        return _plan(info, budget, types, method, errors_k, errors_v, None, None, "calibration-spectra", notes)
    if source_result is None:
        if source == "kl":
            source_result = calibrate(model_path, types, text, n_ctx, n_chunks, n_threads, progress, use_cache,
                                      kv_calibration=cal)
        else:
            source_result = cached_analysis(model_path, text, n_ctx, max(n_chunks, 2), n_threads, progress, use_cache)
    measured_with = source_result.get("settings", {}).get("kv_calibration")
    if source_result.get("kind") == "pyadaq-calibration" and measured_with != (None if cal is None else
                                                                               cal.fingerprint):
        raise ValueError("the sensitivities were measured " + (
            "without a KV calibration" if measured_with is None else f"with KV calibration {measured_with[:12]}…")
            + (", the plan is for contexts without one" if cal is None else
               f", the plan is for contexts with calibration {cal.fingerprint[:12]}…")
            + ": measure them again for these contexts")
    errors_k, errors_v = errors_from(source_result, types)
    if errors_k is not None:
        return _plan(info, budget, types, method, errors_k, errors_v, None, None, "calibrated-kl", notes)
    sk, sv = norm_sensitivities(source_result)
    return _plan(info, budget, types, method, None, None, sk, sv, "activation-norm", notes)


def _plan(info, budget, types, method, errors_k, errors_v, sk, sv, label: str, notes: dict):
    """plan_budget with per-item errors (errors_k/v, [n_layer, n_types]) or per-layer
    sensitivities (sk/sv), after checking that they cover the model's layers."""
    n = len(errors_k) if errors_k is not None else len(sk)
    if n != info.n_layer:
        raise ValueError(f"the sensitivities cover {n} layers, the model has {info.n_layer}")
    if errors_k is not None:
        sk = sv = [1.0] * n
    return plan_budget(info, info.sha256, sk, sv, budget, types=types, method=method,
                       errors_k=errors_k, errors_v=errors_v, sensitivity_source=label, notes=notes)


def kv_calibration_for(model_path, info, kv_calibration, progress: bool = True):
    """A KV calibration argument as a Calibration checked against the model: None stays None,
    "default" is the model's default calibration (pyadaq.eval.calibration.calibrate, cached)."""
    if kv_calibration is None:
        return None
    if isinstance(kv_calibration, str) and kv_calibration == "default":
        from pyadaq.eval.calibration import calibrate as calibrate_kv

        kv_calibration = calibrate_kv(model_path, progress=progress)
    return calibration_for_model(kv_calibration, info)


def check_budget_range(info, budget, types: Sequence[str]) -> None:
    """A budget (a number, a Budget or a "K/V" string) outside what the types can reach, or a
    side named by a type not among them: ValueError before anything is measured."""
    b = Budget.parse(budget)
    bits = [cache_type(t).bits_per_value for t in types]
    lo, hi = min(bits), max(bits)
    names = [cache_type(t).name for t in types]
    for what, side in (("", b.total),) if not b.split else (("the K side of ", b.k), ("the V side of ", b.v)):
        if isinstance(side, str):
            if side not in names:
                raise ValueError(f"budget {b.label}: {side} is not among the types {', '.join(names)}")
            continue
        if not (lo - 1e-9 <= float(side) <= hi + 1e-9):
            raise ValueError(f"{what}budget {b.label} bits per value is outside what the types {', '.join(types)} "
                             f"can reach: {lo:g} to {hi:g} bits per value")
