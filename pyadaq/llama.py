"""``pyadaq.Llama``: the runtime's Llama (:mod:`pyadaq.runtime.llama`) plus ``kv_budget``.

``kv_budget=3.0`` asks for a plan with that many bits per cached value on average (scales
included): :func:`pyadaq.plan.calibrate.plan_for_budget` makes it (calibrated KL
sensitivities, ``kv_budget_source="kl"``; a KV calibration's spectra, ``"spectra"``; or the
activation norms, ``"norms"``) and caches it, and the runtime runs it as a ``kv_plan``. The
plan is made for, and run with, a KV calibration: ``kv_calibration`` when given, else the
model's default one (``pyadaq calibrate``'s, made once and cached); ``kv_calibration=False``
plans and runs without one. Everything else is the runtime's: see
:class:`pyadaq.runtime.llama.Llama`. This module sits above the planner, so that the runtime
never imports it.
"""

from __future__ import annotations

import os
from typing import Any

from pyadaq.model.header import read_model_info
from pyadaq.plan.calibrate import check_budget_range, default_types, kv_calibration_for, plan_for_budget
from pyadaq.plan.planner import Budget
from pyadaq.runtime import llama as _runtime

__all__ = ["Llama"]


class Llama(_runtime.Llama):
    __doc__ = (_runtime.Llama.__doc__ or "") + """
    ``kv_budget`` (bits per value, or "K/V" with one budget per side such as "q8_0/2.5";
    ``kv_budget_source`` "kl", "spectra" or "norms") plans the
    per-layer types for that budget (:func:`pyadaq.plan.calibrate.plan_for_budget`, cached)
    instead of ``kv_plan``, with ``kv_calibration`` (default: the model's default calibration;
    False: none). A budget outside what the types reach raises before anything is measured.
    """

    def __init__(self, model_path: str | os.PathLike, *, kv_budget: float | str | None = None,
                 kv_budget_source: str = "kl", **kwargs: Any) -> None:
        if kv_budget is not None:
            if kwargs.get("kv_plan") is not None:
                raise ValueError("pass kv_plan or kv_budget, not both")
            if kwargs.get("cache_type_k") is not None or kwargs.get("cache_type_v") is not None:
                raise TypeError(
                    "pass either cache_type_k/cache_type_v (one K and one V type for every layer) or a plan "
                    "(kv_plan/kv_budget: a type per layer), not both: a plan sets every layer's K and V type"
                )
            kv_budget = Budget.parse(kv_budget)  # TypeError for anything but a number or a string
            spec = kwargs.get("kv_calibration")
            spec = None if spec is False else "default" if spec is None else spec
            info = read_model_info(model_path)
            check_budget_range(info, kv_budget, default_types(kv_budget_source, spec))
            cal = kv_calibration_for(model_path, info, spec)
            kwargs["kv_plan"] = plan_for_budget(model_path, kv_budget, source=kv_budget_source,
                                                kv_calibration=cal)
            kwargs["kv_calibration"] = cal
        elif kwargs.get("kv_calibration") is False:
            kwargs["kv_calibration"] = None
        super().__init__(model_path, **kwargs)
