"""Config specs: the one place a user's ``--configs`` string becomes runnable configurations.

``q8_0:kvq2`` is a uniform pair, ``plan:FILE`` a plan file checked against the model, and
``budget:BITS[:kl|:norms|:spectra]`` a plan made for a bit budget (calibrated, cached; BITS a
number, or K/V with one budget per side such as ``budget:q8_0/2.5``); any of
them with ``+cal`` runs with a KV calibration's transforms (a budget is then also planned for
them, among the transform-coded types too) (the one the run names, else the model's
default calibration, made once and cached), and any of those with ``+wN`` (last) with a KV window
of N cells (:mod:`pyadaq.runtime.kv_window`): ``q8_0:kvt2+cal+w128``. :func:`parse_configs`
checks the syntax and the type names without the model; :func:`resolve_configs` turns the
result into the validated values of :mod:`pyadaq.runtime.kvconfig` for one model.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyadaq.model.calibration import calibration_for_model
from pyadaq.model.header import read_model_info
from pyadaq.plan.calibrate import SOURCES, plan_for_budget
from pyadaq.plan.planner import Budget
from pyadaq.runtime.kv_window import check_kv_window
from pyadaq.runtime.kvconfig import Calibrated, LayerConfig, Windowed
from pyadaq.runtime.kvplan import load_checked
from pyadaq.types import cache_type

__all__ = ["CalSpec", "LayerSpec", "parse_configs", "resolve_configs"]


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
class CalSpec:
    """A config written with ``+cal``: its base spec run with a calibration."""
    base: object

    @property
    def label(self) -> str:
        b = self.base
        return (b.label if isinstance(b, LayerSpec) else f"{b[0]}:{b[1]}") + "+cal"


def _window_suffix(item: str) -> tuple:
    """('q8_0:kvt2+cal', 128) for 'q8_0:kvt2+cal+w128'; (item, None) without a window."""
    head, sep, tail = item.rpartition("+w")
    if not sep or not head or not tail.isdigit():
        return item, None
    cells = int(tail)
    try:
        check_kv_window(cells)
    except ValueError as e:
        raise ValueError(f"config '{item}': {e}") from None
    if cells == 0:
        raise ValueError(f"config '{item}': +w0 is no window; leave it out")
    return head, cells


def parse_configs(spec: str) -> list:
    """'q8_0:kvq2,f16:f16,plan:p.json,budget:3.0,q4_0:kvq2+cal' -> [('q8_0', 'kvq2'), ('f16', 'f16'),
    LayerSpec('plan', 'p.json'), LayerSpec('budget', '3.0'), CalSpec(('q4_0', 'kvq2'))]; type names
    are checked."""
    out: list = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        base, cells = _window_suffix(item)
        if cells is not None:
            inner = parse_configs(base)[0]
            if isinstance(inner, Windowed):
                raise ValueError(f"config '{item}' has two windows")
            out.append(Windowed(inner, cells))
            continue
        if item.endswith("+cal"):
            inner = parse_configs(item[: -len("+cal")])[0]
            if isinstance(inner, Windowed):
                raise ValueError(f"config '{item}': the window comes last (K:V+cal+wN)")
            out.append(CalSpec(inner))
            continue
        head, _, rest = item.partition(":")
        if head in ("plan", "budget"):
            if not rest:
                raise ValueError(f"config '{item}' needs an argument: plan:FILE or budget:BITS[:kl|:norms]")
            if head == "budget":
                bits, _, source = rest.partition(":")
                try:
                    Budget.parse(bits)
                except ValueError as e:
                    raise ValueError(f"config '{item}': {e}") from None
                if source and source not in SOURCES:
                    raise ValueError(f"config '{item}': the sensitivity source is one of {', '.join(SOURCES)}, "
                                     f"not '{source}'")
            out.append(LayerSpec(head, rest))
            continue
        if item.count(":") != 1:
            raise ValueError(f"config '{item}' is not K:V (for example q8_0:kvq2), plan:FILE or budget:BITS")
        k, v = item.split(":")
        out.append((cache_type(k).name, cache_type(v).name))
    if not out:
        raise ValueError("no configs given")
    return out



def resolve_configs(configs: list, model_path: str, progress: bool = True, calibration=None,
                    calibration_model: str | None = None, calibration_for_plans=None) -> list:
    """Turn LayerSpec entries into LayerConfig for this model (plans are loaded and checked,
    budgets planned) and CalSpec entries into Calibrated ones: with `calibration` (a file or a
    Calibration), else the default calibration (pyadaq.eval.calibration.calibrate, cached), of
    `calibration_model`, the model the configs run on (default: model_path; with --f32-weights
    its float32 copy), and checked against it; uniform (k, v) pairs pass through. A budget with
    ``+cal`` is planned for its calibration (calibration_for_plans, set by the +cal entry)."""
    info = read_model_info(model_path)
    cal_model = calibration_model or model_path
    out = []
    for c in configs:
        if isinstance(c, Windowed):
            out.append(Windowed(resolve_configs([c.base], model_path, progress, calibration, calibration_model,
                                                calibration_for_plans)[0], c.cells))
            continue
        if isinstance(c, CalSpec):
            if calibration is None:
                from pyadaq.eval.calibration import calibrate

                calibration = calibrate(cal_model, progress=progress)
            calibration = calibration_for_model(calibration, read_model_info(cal_model))
            out.append(Calibrated(resolve_configs([c.base], model_path, progress, calibration_for_plans=calibration)[0],
                                  calibration))
            continue
        if not isinstance(c, LayerSpec):
            out.append(c)
            continue
        if c.kind == "plan":
            plan, _, _ = load_checked(c.arg, info)
        else:
            bits, _, source = c.arg.partition(":")
            plan = plan_for_budget(model_path, bits, source=source or "kl", progress=progress,
                                   kv_calibration=calibration_for_plans)
        out.append(LayerConfig(c.label, tuple(plan.types_k), tuple(plan.types_v), float(plan.bits_per_value)))
    return out
