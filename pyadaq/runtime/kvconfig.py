"""A K/V configuration ready to run, and the context for it.

A configuration is either a uniform pair of cache type names ``(k, v)`` or a
:class:`LayerConfig` (one K and one V type name per layer, from a plan), either of them possibly
wrapped in :class:`Calibrated` (run with a calibration's K/V transforms). All are validated
values: config specs (``q8_0:kvq2``, ``plan:FILE``, ``budget:BITS``) become them in
:mod:`pyadaq.plan.spec`. Everything that runs configurations (evaluation, pass-key, bench)
opens its contexts with :func:`open_context` and labels its results with :func:`config_row`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyadaq.runtime.context import Context
from pyadaq.types import cache_type

__all__ = ["Calibrated", "LayerConfig", "Windowed", "config_label", "config_row", "open_context"]


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


@dataclass(frozen=True)
class Calibrated:
    """A uniform pair or a LayerConfig run with a calibration (pyadaq.model.calibration)."""
    base: object
    calibration: object = field(compare=False)

    @property
    def label(self) -> str:
        return config_label(self.base) + "+cal"


@dataclass(frozen=True)
class Windowed:
    """A config run with a KV window of ``cells`` cells (pyadaq.runtime.kv_window); the config is
    a spec as parsed (pyadaq.plan.spec) or one resolved for a model, the window the same."""
    base: object
    cells: int

    @property
    def label(self) -> str:
        return f"{config_label(self.base)}+w{self.cells}"


def config_label(cfg) -> str:
    """'q8_0:kvq2' for a uniform pair, else the config's own label."""
    return f"{cfg[0]}:{cfg[1]}" if isinstance(cfg, tuple) else cfg.label


def open_context(model, cfg, n_ctx: int, n_threads=None, attn_rot: bool = True, flash_attn: bool = True,
                 n_batch: int | None = None, swa_full: bool = True, kv_window: int = 0):
    """A Context for a uniform (k, v) pair, a LayerConfig, or either of them Calibrated, any of
    them Windowed (its window replaces ``kv_window``)."""
    if isinstance(cfg, Windowed):
        cfg, kv_window = cfg.base, cfg.cells
    cal = None
    if isinstance(cfg, Calibrated):
        cfg, cal = cfg.base, cfg.calibration
    if isinstance(cfg, LayerConfig):
        return Context(model, cfg.k, cfg.v, n_ctx, n_threads, attn_rot=attn_rot, flash_attn=flash_attn,
                       layer_types=(list(cfg.types_k), list(cfg.types_v)), kv_calibration=cal, n_batch=n_batch,
                       swa_full=swa_full, kv_window=kv_window)
    return Context(model, cache_type(cfg[0]), cache_type(cfg[1]), n_ctx, n_threads, attn_rot=attn_rot,
                   flash_attn=flash_attn, kv_calibration=cal, n_batch=n_batch, swa_full=swa_full,
                   kv_window=kv_window)


def config_row(cfg) -> dict:
    """The identifying fields of a result row."""
    if isinstance(cfg, Windowed):
        return {**config_row(cfg.base), "config": cfg.label, "kv_window": cfg.cells}
    if isinstance(cfg, Calibrated):
        cal = cfg.calibration
        return {**config_row(cfg.base), "config": cfg.label, "calibrated": True,
                "calibration": str(cal.path) if cal.path else None, "calibration_fingerprint": cal.fingerprint}
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
