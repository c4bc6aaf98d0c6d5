"""The plan file: one K and one V cache type per model layer, and its check against a model.

:class:`KVPlan` is a JSON file (``KVPlan.save`` / ``KVPlan.load``); :func:`make_plan` builds one
for a model from per-layer types, and :func:`check_plan` refuses a plan made for a model with
other layer shapes (:class:`PlanMismatchError`) or with a type whose block size does not divide
a layer's head size (``ValueError``). Bits per value include the scales (q4_0 is 4.5, kvq2 2.5),
and only the layers that own a KV cache (``ModelInfo.cache_layers()``) count.

This is the validated value the runtime takes (``pyadaq.Llama(kv_plan=...)``); the planner
(:mod:`pyadaq.plan.planner`) makes plans.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from pyadaq.types import CacheType, cache_type

__all__ = ["PLAN_VERSION", "KVPlan", "PlanFileError", "PlanMismatchError", "check_plan", "load_checked",
           "make_plan", "model_name", "model_shapes", "plan_cost"]

PLAN_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]
TypeSpec = Union[str, int, CacheType]


class PlanFileError(ValueError):
    """A plan file (or dict) that cannot be read: missing, not JSON, wrong version, bad fields."""

    def __init__(self, message: str, path: PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


class PlanMismatchError(ValueError):
    """A plan made for a model whose layer count, head sizes or KV head counts differ."""



_REQUIRED = ("version", "types_k", "types_v", "model_name", "model_sha256", "n_layer", "head_sizes_k",
             "head_sizes_v", "n_head_kv", "budget", "bits_per_value", "bytes_per_token", "method",
             "sensitivity", "predicted_error")
_PER_LAYER = ("types_k", "types_v", "head_sizes_k", "head_sizes_v", "n_head_kv")


@dataclass
class KVPlan:
    """One K and one V cache type per model layer, with the facts needed to check them.

    types_k / types_v: cache type names for layers 0..n_layer-1. model_name / model_sha256:
    the model file the plan was made for. head_sizes_k / head_sizes_v / n_head_kv: that
    model's per-layer shapes (``check_plan`` compares them). budget: the bits per value asked
    for (None for a hand-made plan). bits_per_value: achieved average over the cache layers,
    scales included (``8 * bytes / values``). bytes_per_token: K plus V row bytes of one token
    over the cache layers. method: "dp", "greedy", "uniform" or "manual". sensitivity: where
    the errors came from ("calibrated-kl", "activation-norm", "weight-norm", "uniform", ...).
    predicted_error: the optimizer's objective (None when not planned). notes: free-form.
    ``source`` is the file the plan was loaded from (not saved, not compared).
    """

    types_k: list[str]
    types_v: list[str]
    model_name: str
    model_sha256: str
    n_layer: int
    head_sizes_k: list[int]
    head_sizes_v: list[int]
    n_head_kv: list[int]
    budget: float | None
    bits_per_value: float
    bytes_per_token: int
    method: str
    sensitivity: str
    predicted_error: float | None
    version: int = PLAN_VERSION
    notes: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    # --- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict (``source`` left out)."""
        return {
            "version": self.version,
            "model_name": self.model_name,
            "model_sha256": self.model_sha256,
            "n_layer": self.n_layer,
            "types_k": list(self.types_k),
            "types_v": list(self.types_v),
            "head_sizes_k": list(self.head_sizes_k),
            "head_sizes_v": list(self.head_sizes_v),
            "n_head_kv": list(self.n_head_kv),
            "budget": self.budget,
            "bits_per_value": self.bits_per_value,
            "bytes_per_token": self.bytes_per_token,
            "method": self.method,
            "sensitivity": self.sensitivity,
            "predicted_error": self.predicted_error,
            "notes": dict(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: PathLike) -> None:
        """Write the plan as JSON to ``path``."""
        Path(os.fspath(path)).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: PathLike) -> KVPlan:
        """Read a plan file; PlanFileError (naming the path) when it cannot be used."""
        p = Path(os.fspath(path))
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanFileError(f"plan file not found: {p}", p) from None
        except UnicodeDecodeError:
            raise PlanFileError(f"{p} is not a plan file: it is not UTF-8 text (a plan is JSON)", p) from None
        except OSError as e:
            raise PlanFileError(f"cannot read plan file {p}: {e.strerror or e}", p) from None
        try:
            d = json.loads(text)
        except ValueError as e:
            raise PlanFileError(f"{p} is not a plan file: it is not valid JSON ({e}); make one with "
                                "`pyadaq plan`", p) from None
        plan = cls.from_dict(d, source=str(p))
        plan.source = str(p)
        return plan

    @classmethod
    def from_dict(cls, d: Any, source: str | None = None) -> KVPlan:
        """A plan from its dict form; PlanFileError for a wrong version, missing keys, lists of
        the wrong length or unknown type names. ``source`` names the file in messages. Keys
        other than the plan's fields are ignored."""
        where = source or "the plan"

        def fail(problem: str) -> PlanFileError:
            return PlanFileError(f"{where}: {problem}", source)

        if not isinstance(d, dict):
            raise fail(f"expected a JSON object with the plan's fields, got a {type(d).__name__}")
        if "version" in d and d["version"] != PLAN_VERSION:
            raise fail(f"plan format version {d['version']!r} is not supported (this pyadaq reads version "
                       f"{PLAN_VERSION}); make the plan again with `pyadaq plan`")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise fail(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")

        def integer(key: str, v: Any, minimum: int = 0) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise fail(f"'{key}' must be an integer >= {minimum}, got {v!r}")
            return v

        def number(key: str, v: Any, optional: bool = False) -> float | None:
            if v is None and optional:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise fail(f"'{key}' must be a number{' or null' if optional else ''}, got {v!r}")
            return float(v)

        def string(key: str) -> str:
            if not isinstance(d[key], str):
                raise fail(f"'{key}' must be a string, got {d[key]!r}")
            return d[key]

        n_layer = integer("n_layer", d["n_layer"], 1)
        for key in _PER_LAYER:
            v = d[key]
            if not isinstance(v, list):
                raise fail(f"'{key}' must be a list with one entry per layer, got {type(v).__name__}")
            if len(v) != n_layer:
                raise fail(f"'{key}' has {len(v)} entries, but the plan has n_layer = {n_layer}")
        types: dict[str, list[str]] = {}
        for key in ("types_k", "types_v"):
            names = []
            for il, name in enumerate(d[key]):
                if not isinstance(name, str):
                    raise fail(f"'{key}'[{il}] must be a cache type name, got {name!r}")
                try:
                    names.append(cache_type(name).name)
                except ValueError as e:
                    raise fail(f"layer {il} of '{key}': {e}") from None
            types[key] = names
        notes = d.get("notes", {})
        if not isinstance(notes, dict):
            raise fail(f"'notes' must be a JSON object, got {notes!r}")
        return cls(
            types_k=types["types_k"],
            types_v=types["types_v"],
            model_name=string("model_name"),
            model_sha256=string("model_sha256"),
            n_layer=n_layer,
            head_sizes_k=[integer("head_sizes_k", x) for x in d["head_sizes_k"]],
            head_sizes_v=[integer("head_sizes_v", x) for x in d["head_sizes_v"]],
            n_head_kv=[integer("n_head_kv", x) for x in d["n_head_kv"]],
            budget=number("budget", d["budget"], optional=True),
            bits_per_value=float(number("bits_per_value", d["bits_per_value"])),
            bytes_per_token=integer("bytes_per_token", d["bytes_per_token"]),
            method=string("method"),
            sensitivity=string("sensitivity"),
            predicted_error=number("predicted_error", d["predicted_error"], optional=True),
            version=PLAN_VERSION,
            notes=dict(notes),
            source=source,
        )

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def uniform(cls, info: Any, type_k: TypeSpec, type_v: TypeSpec, sha256: str) -> KVPlan:
        """A plan with every layer's K in ``type_k`` and V in ``type_v``."""
        return make_plan(info, sha256, [type_k] * info.n_layer, [type_v] * info.n_layer,
                         method="uniform", sensitivity="uniform")


def model_name(info: Any) -> str:
    path = getattr(info, "path", None)
    return Path(path).name if path is not None else (getattr(info, "name", None) or "model")


def model_shapes(info: Any) -> tuple[list[int], list[int], list[int]]:
    n = info.n_layer
    return ([int(info.head_size_k_layer(il)) for il in range(n)],
            [int(info.head_size_v_layer(il)) for il in range(n)],
            [int(info.n_head_kv_layer(il)) for il in range(n)])


def plan_cost(info: Any, tk: list[CacheType], tv: list[CacheType]) -> tuple[float, int]:
    """(bits per value, bytes per token) of per-layer types over the model's cache layers."""
    values = 0
    nbytes = 0
    for il in info.cache_layers():
        n_kv = info.n_head_kv_layer(il)
        nk, nv = n_kv * info.head_size_k_layer(il), n_kv * info.head_size_v_layer(il)
        values += nk + nv
        nbytes += tk[il].row_bytes(nk) + tv[il].row_bytes(nv)
    if values == 0:
        raise ValueError(f"{model_name(info)} has no layer with its own KV cache, so there is nothing to plan")
    return 8.0 * nbytes / values, nbytes


def make_plan(info: Any, sha256: str, types_k: Sequence[TypeSpec], types_v: Sequence[TypeSpec],
              **meta: Any) -> KVPlan:
    """A KVPlan for the model described by ``info`` (a ModelInfo) with the given per-layer types.

    Computes head sizes, KV head counts, bits per value and bytes per token from ``info`` and
    checks the types against the model (``check_plan``). ``meta`` sets the other fields:
    budget (default None), method ("manual"), sensitivity ("none"), predicted_error (None),
    notes ({}).
    """
    allowed = {"budget", "method", "sensitivity", "predicted_error", "notes"}
    unknown = sorted(set(meta) - allowed)
    if unknown:
        raise TypeError(f"make_plan() got unknown field(s) {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}")
    n = info.n_layer
    if len(types_k) != n or len(types_v) != n:
        raise ValueError(f"a plan for {model_name(info)} needs {n} K and {n} V types (one per layer), "
                         f"got {len(types_k)} K and {len(types_v)} V")
    tk = [cache_type(t) for t in types_k]
    tv = [cache_type(t) for t in types_v]
    hk, hv, nkv = model_shapes(info)
    _check_fit(info, tk, tv)
    bits, nbytes = plan_cost(info, tk, tv)
    budget = meta.get("budget")
    predicted = meta.get("predicted_error")
    return KVPlan(
        types_k=[t.name for t in tk],
        types_v=[t.name for t in tv],
        model_name=model_name(info),
        model_sha256=sha256 or "",
        n_layer=n,
        head_sizes_k=hk,
        head_sizes_v=hv,
        n_head_kv=nkv,
        budget=None if budget is None else float(budget),
        bits_per_value=bits,
        bytes_per_token=nbytes,
        method=str(meta.get("method", "manual")),
        sensitivity=str(meta.get("sensitivity", "none")),
        predicted_error=None if predicted is None else float(predicted),
        notes=dict(meta.get("notes") or {}),
    )


def _check_fit(info: Any, tk: list[CacheType], tv: list[CacheType]) -> None:
    """ValueError naming the first layer whose K or V head size a type's block size does not divide."""
    hk, hv, _ = model_shapes(info)
    for il in range(info.n_layer):
        for which, t, head in (("K", tk[il], hk[il]), ("V", tv[il], hv[il])):
            if head % t.block_size:
                raise ValueError(
                    f"layer {il}'s {which} cache type '{t.name}' has block size {t.block_size}, which does not "
                    f"divide that layer's {which} head size {head} in {model_name(info)}; give layer {il} a "
                    f"{which} type whose block size divides {head} (f16 always fits)")


def check_plan(plan: KVPlan, info: Any, sha256: str | None = None) -> tuple[list[CacheType], list[CacheType]]:
    """Check that ``plan`` can be used with the model described by ``info`` (a ModelInfo).

    Raises PlanMismatchError when the plan's layer count, per-layer head sizes or KV head
    counts differ from the model's, and ValueError for an unknown type name or a type whose
    block size does not divide a layer's head size. When ``sha256`` is given and differs from
    the plan's while the shapes match, only warns (the same architecture quantized another
    way is fine). Returns the per-layer (K types, V types) as CacheType lists.
    """
    where = plan.source or "the plan"
    model = model_name(info)
    made_for = f"{plan.model_name}" if plan.model_name else "another model"
    if plan.n_layer != info.n_layer:
        raise PlanMismatchError(
            f"{where} was made for a model with {plan.n_layer} layers ({made_for}), this model has "
            f"{info.n_layer} layers ({model}): make a plan for this model with `pyadaq plan`")
    for key in _PER_LAYER:
        if len(getattr(plan, key)) != plan.n_layer:
            raise ValueError(f"{where}: '{key}' has {len(getattr(plan, key))} entries for {plan.n_layer} layers")
    hk, hv, nkv = model_shapes(info)
    diffs = []
    for what, theirs, ours in (("K head size", plan.head_sizes_k, hk), ("V head size", plan.head_sizes_v, hv),
                               ("KV head count", plan.n_head_kv, nkv)):
        for il, (a, b) in enumerate(zip(theirs, ours)):
            if int(a) != int(b):
                diffs.append(f"layer {il} {what} {a} in the plan, {b} in this model")
    if diffs:
        more = f" (and {len(diffs) - 3} more differences)" if len(diffs) > 3 else ""
        raise PlanMismatchError(
            f"{where} was made for a model with other layer shapes ({made_for}) than this model ({model}): "
            f"{'; '.join(diffs[:3])}{more}; make a plan for this model with `pyadaq plan`")
    tk = [cache_type(t) for t in plan.types_k]
    tv = [cache_type(t) for t in plan.types_v]
    _check_fit(info, tk, tv)
    if sha256 and plan.model_sha256 and sha256 != plan.model_sha256:
        warnings.warn(
            f"{where} was made for {made_for} (sha256 {plan.model_sha256[:12]}…), not this file ({model}, "
            f"sha256 {sha256[:12]}…); the layer shapes match, so it is used anyway", UserWarning, stacklevel=2)
    return tk, tv


def load_checked(plan: KVPlan | PathLike, info: Any) -> tuple[KVPlan, list[CacheType], list[CacheType]]:
    """A plan (a KVPlan or a plan file) checked against the model described by ``info``:
    ``(plan, types_k, types_v)``. The one way the runtime and the config specs take a plan."""
    plan = plan if isinstance(plan, KVPlan) else KVPlan.load(plan)
    types_k, types_v = check_plan(plan, info, info.sha256)
    return plan, types_k, types_v
