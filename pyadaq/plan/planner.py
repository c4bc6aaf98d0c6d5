"""Per-layer KV-cache plans: which cache type each layer's K and V get for a bit budget.

Two parts:

* the optimizer (pure numpy, no native calls): :func:`optimize` picks one type per *item*
  (an item is "layer l's K" or "layer l's V") so that the summed predicted error is least
  while the average bits per cached value stay within a budget. ``method="dp"`` solves this
  multiple-choice knapsack exactly by dynamic programming on an integer cost grid;
  ``method="greedy"`` is the rate-distortion greedy of the paper (Hariri et al., "More for
  Keys, Less for Values"). :func:`rate_distortion_errors` turns per-item sensitivities into
  errors with the paper's model ``error = sensitivity**2 * 2**(-2 * bits)``.
* :func:`plan_budget`: the optimizer applied to a model (:class:`pyadaq.model.header.ModelInfo`),
  giving a :class:`pyadaq.runtime.kvplan.KVPlan` (the plan file and its checks live there).

A budget (:class:`Budget`) is one number for K and V together ("3.0": the plan moves bits
between keys and values as well as between layers) or one per side, written ``K/V``: each side
a number of bits (that side's layers share it) or a type name (every layer of that side in that
type), as in "q8_0/2.5" (keys q8_0, values 2.5 bits per value on average) or "4.5/2.5".

Bits per value always include the scales (q4_0 is 4.5, kvq2 2.5), so a plan's
``bits_per_value`` is exactly ``8 * bytes_per_token / values_per_token``. Only the layers that
own a KV cache (``ModelInfo.cache_layers()``) count; the others share another layer's cache
and allocate nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from pyadaq.runtime.kvplan import KVPlan, make_plan, model_name, model_shapes
from pyadaq.types import CacheType, cache_type

__all__ = [
    "DEFAULT_TYPES",
    "DP_MAX_CELLS",
    "Budget",
    "optimize",
    "plan_budget",
    "rate_distortion_errors",
]

DEFAULT_TYPES = ("f16", "q8_0", "q4_0", "kvq3", "kvq2")

# The DP fills (capacity + 1) x n_types cells per item; above this it falls back to greedy.
DP_MAX_CELLS = 2_000_000
# Relative slack on the budget, so that a budget met exactly is not lost to float rounding.
_BUDGET_RTOL = 1e-9
# Bits per value must be multiples of 1/2**k for some k up to this for the DP's integer grid.
_MAX_SCALE_LOG2 = 6

TypeSpec = Union[str, int, CacheType]


def _bits_value(text: str, what: str) -> float:
    try:
        b = float(text)
    except ValueError:
        raise ValueError(f"{what}: '{text}' is not a number of bits per value") from None
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"{what}: '{text}' is not a positive number of bits per value")
    return b


@dataclass(frozen=True)
class Budget:
    """A bit budget: ``total`` bits per value for K and V together, or one budget per side
    (``k``, ``v``), each a number of bits per value or a cache type name (that side uniform).

    ``Budget.parse`` reads a number, "3.0", "q8_0/2.5" or "4.5/2.5" (or returns a Budget as is);
    ``label`` writes it back. Raises ValueError for anything else (an unknown type name, a
    non-positive number, a third part)."""

    total: float | None = None
    k: float | str | None = None
    v: float | str | None = None

    def __post_init__(self):
        if (self.total is None) == (self.k is None or self.v is None) or (self.k is None) != (self.v is None):
            raise ValueError("a budget is a total, or a K and a V budget")

    @classmethod
    def parse(cls, x: Any) -> Budget:
        if isinstance(x, Budget):
            return x
        if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating, str)):
            raise TypeError(f"a budget is a number of bits per value or a 'K/V' string, not {type(x).__name__}")
        if not isinstance(x, str):
            return cls(total=_bits_value(str(x), "budget"))
        text = x.strip()
        if "/" not in text:
            return cls(total=_bits_value(text, f"budget '{x}'"))
        parts = [p.strip() for p in text.split("/")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"budget '{x}' is not K/V (for example q8_0/2.5 or 4.5/2.5)")

        def side(p: str, which: str) -> float | str:
            try:
                float(p)
            except ValueError:
                try:
                    return cache_type(p).name
                except (ValueError, KeyError) as e:
                    raise ValueError(f"budget '{x}': the {which} side '{p}' is neither a number of bits per value "
                                     f"nor a cache type ({e})") from None
            return _bits_value(p, f"budget '{x}', {which} side")

        return cls(k=side(parts[0], "K"), v=side(parts[1], "V"))

    @property
    def split(self) -> bool:
        return self.total is None

    @property
    def label(self) -> str:
        def fmt(b):
            return b if isinstance(b, str) else f"{b:g}"

        return fmt(self.total) if not self.split else f"{fmt(self.k)}/{fmt(self.v)}"

    def sides(self) -> tuple:
        """(k, v) with type names turned into their bits per value."""
        return tuple(cache_type(b).bits_per_value if isinstance(b, str) else float(b) for b in (self.k, self.v))


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


def rate_distortion_errors(sensitivity: Sequence[float], bits: Sequence[float]) -> np.ndarray:
    """Predicted errors ``[n_items, n_types]`` from the rate-distortion model.

    ``errors[i, j] = sensitivity[i]**2 * 2**(-2 * bits[j])``, except that a type with 16 or
    more bits per value (f16, bf16, f32: the reference cache) has error 0.
    """
    s = np.asarray(sensitivity, dtype=float).reshape(-1)
    b = np.asarray(bits, dtype=float).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("sensitivities must be finite numbers")
    if not np.all(np.isfinite(b)) or np.any(b <= 0):
        raise ValueError(f"bits per value must be positive finite numbers, got {b.tolist()}")
    errors = np.outer(s * s, np.exp2(-2.0 * b))
    errors[:, b >= 16] = 0.0
    return errors


def optimize(errors: Any, weights: Sequence[int], bits: Sequence[float], budget: float,
             method: str = "dp", *, type_names: Sequence[str] | None = None) -> np.ndarray:
    """The type index of each item that minimizes the summed error within the bit budget.

    errors: ``[n_items, n_types]`` predicted error of item i stored in type j; ``+inf``
    forbids the pair (for example a block size that does not divide the item's head size).
    weights: cached values per token of each item (positive integers, e.g. n_head_kv *
    head_size). bits: bits per value of each type, scales included. budget: the average bits
    per value allowed: ``sum(weights[i] * bits[t[i]]) <= budget * sum(weights)`` (with a
    relative slack of 1e-9 for float rounding). type_names: names of the types, used in
    error messages only.

    method "dp": exact, by dynamic programming over the items on an integer cost grid (bits
    times the smallest power of two up to 64 that makes them all integral, divided by the gcd
    of all costs). Among plans with exactly the same total error it gives item 0 the most
    bits it can, then item 1, and so on (``plan_budget`` lists all K items before the V
    items, so ties favour keys). If the grid would have more than ``DP_MAX_CELLS`` cells
    times types it warns and uses the greedy instead.

    method "greedy": start every item at its cheapest allowed type (the lower error among
    equally cheap ones), then repeatedly take, among all upgrades of one item to a more
    expensive allowed type that lower its error and still fit the budget, the one with the
    largest error reduction per extra bit; ties go to the lower item index, then to the
    cheaper upgrade. Stops when no upgrade fits. Fast, but not always optimal.

    Returns an integer array with one type index per item. Raises ValueError when an item has
    no allowed type or the budget is below what the cheapest allowed types need.
    """
    return _optimize(errors, weights, bits, budget, method, type_names)[0]


def _optimize(errors: Any, weights: Sequence[int], bits: Sequence[float], budget: float, method: str,
              type_names: Sequence[str] | None) -> tuple[np.ndarray, str]:
    """optimize(), also returning the method actually used ("greedy" after a DP fallback)."""
    e, w, b = _check_problem(errors, weights, bits, budget, type_names)
    if method not in ("dp", "greedy"):
        raise ValueError(f"unknown planning method '{method}': use 'dp' (exact) or 'greedy'")
    allowed = np.isfinite(e)
    names = list(type_names) if type_names is not None else [f"{x:g}-bit" for x in b]
    for i in range(e.shape[0]):
        if not allowed[i].any():
            raise ValueError(f"item {i} has no allowed type (every type's error is +inf): add a type whose "
                             f"block size divides its head size, such as f16")
    cheapest = sum(int(w[i]) * float(b[allowed[i]].min()) for i in range(len(w)))
    total = float(w.sum())
    if cheapest > budget * total * (1 + _BUDGET_RTOL):
        raise ValueError(
            f"budget {budget:g} bits/value is below the smallest possible {cheapest / total:g} with types "
            f"{', '.join(names)} (each item in its cheapest allowed type): raise the budget or add cheaper types")
    if method == "greedy":
        return _greedy(e, w, b, budget), "greedy"
    return _dp(e, w, b, budget, names)


def _check_problem(errors, weights, bits, budget, type_names) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    e = np.array(errors, dtype=float)
    if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
        raise ValueError(f"errors must be a 2-D array [n_items, n_types] with at least one of each, "
                         f"got shape {e.shape}")
    n_items, n_types = e.shape
    if np.any(np.isnan(e)) or np.any(e == -np.inf):
        raise ValueError("errors must be numbers or +inf (a forbidden pair), not NaN or -inf")
    b = np.array(bits, dtype=float).reshape(-1)
    if b.shape[0] != n_types:
        raise ValueError(f"bits has {b.shape[0]} entries for {n_types} types (columns of errors)")
    if not np.all(np.isfinite(b)) or np.any(b <= 0):
        raise ValueError(f"bits per value must be positive finite numbers, got {b.tolist()}")
    w_raw = np.array(weights).reshape(-1)
    if w_raw.shape[0] != n_items:
        raise ValueError(f"weights has {w_raw.shape[0]} entries for {n_items} items (rows of errors)")
    if w_raw.dtype.kind not in "iuf" or not np.all(np.isfinite(w_raw.astype(float))) \
            or np.any(w_raw != np.round(w_raw)) or np.any(w_raw <= 0):
        raise ValueError(f"weights must be positive integers (values per token), got {w_raw.tolist()}")
    w = w_raw.astype(np.int64)
    if type_names is not None and len(type_names) != n_types:
        raise ValueError(f"type_names has {len(type_names)} names for {n_types} types")
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(budget)) or float(budget) <= 0:
        raise ValueError(f"budget must be a positive number of bits per value, got {budget!r}")
    return e, w, b


def _grid_scale(bits: np.ndarray) -> int:
    """The smallest power of two (up to 2**6) that makes every entry of bits an integer."""
    for k in range(_MAX_SCALE_LOG2 + 1):
        s = 2 ** k
        x = bits * s
        if np.all(np.abs(x - np.round(x)) <= 1e-9 * np.maximum(1.0, np.abs(x))):
            return s
    raise ValueError(f"bits per value {bits.tolist()} are not all multiples of 1/{2 ** _MAX_SCALE_LOG2}, so the "
                     "exact planner cannot put them on an integer grid: use method='greedy'")


def _dp(e: np.ndarray, w: np.ndarray, b: np.ndarray, budget: float, names: list[str]) -> tuple[np.ndarray, str]:
    n_items, n_types = e.shape
    allowed = np.isfinite(e)
    used_cols = allowed.any(axis=0)
    scale = _grid_scale(b[used_cols])
    ib = np.where(used_cols, np.round(b * scale), 0).astype(np.int64)
    cost = w[:, None] * ib[None, :]  # [n_items, n_types]
    g = 0
    for c in cost[allowed]:
        g = math.gcd(g, int(c))
    cost //= g
    total = int(w.sum())
    capacity = math.floor(budget * total * scale / g * (1 + _BUDGET_RTOL))
    most = sum(int(cost[i][allowed[i]].max()) for i in range(n_items))
    capacity = min(capacity, most)  # more capacity than the dearest plan needs changes nothing
    if (capacity + 1) * n_types > DP_MAX_CELLS:
        warnings.warn(f"the exact planner would need a grid of {capacity + 1} x {n_types} cells (more than "
                      f"{DP_MAX_CELLS}); using the greedy planner instead", RuntimeWarning, stacklevel=3)
        return _greedy(e, w, b, budget), "greedy"

    # Types tried from most to fewest bits (then by column); a later type replaces the kept one
    # only with a strictly lower error, so on exact ties the type with more bits stays.
    order = sorted(np.flatnonzero(used_cols).tolist(), key=lambda j: (-b[j], j))
    # best[c]: least error of items i..n-1 within capacity c; filled from the last item back, so
    # that the choice is read from item 0 forward and its ties favour the earlier items.
    best = np.zeros(capacity + 1)
    choice = np.empty((n_items, capacity + 1), dtype=np.int32)
    for i in range(n_items - 1, -1, -1):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int32)
        for j in order:
            if not allowed[i, j]:
                continue
            c = int(cost[i, j])
            if c > capacity:
                continue
            cand = best[: capacity + 1 - c] + e[i, j]
            better = cand < new[c:]
            new[c:][better] = cand[better]
            pick[c:][better] = j
        best, choice[i] = new, pick
    if not np.isfinite(best[capacity]):  # unreachable after the cheapest-plan check; kept as a guard
        raise ValueError(f"no plan fits a budget of {budget:g} bits/value with types {', '.join(names)}")
    out = np.empty(n_items, dtype=np.intp)
    c = capacity
    for i in range(n_items):
        j = int(choice[i, c])
        out[i] = j
        c -= int(cost[i, j])
    return out, "dp"


def _greedy(e: np.ndarray, w: np.ndarray, b: np.ndarray, budget: float) -> np.ndarray:
    n_items, n_types = e.shape
    allowed = np.isfinite(e)
    out = np.empty(n_items, dtype=np.intp)
    for i in range(n_items):
        cols = np.flatnonzero(allowed[i]).tolist()
        out[i] = min(cols, key=lambda j: (b[j], e[i, j], j))
    limit = budget * float(w.sum()) * (1 + _BUDGET_RTOL)
    used = float(sum(int(w[i]) * b[out[i]] for i in range(n_items)))
    while True:
        best_key = None
        best_move = None
        for i in range(n_items):
            cur = int(out[i])
            for j in range(n_types):
                if not allowed[i, j] or b[j] <= b[cur]:
                    continue
                extra = int(w[i]) * (b[j] - b[cur])
                gain = e[i, cur] - e[i, j]
                if gain <= 0 or used + extra > limit:
                    continue
                key = (-gain / extra, i, extra)
                if best_key is None or key < best_key:
                    best_key, best_move = key, (i, j, extra)
        if best_move is None:
            return out
        i, j, extra = best_move
        out[i] = j
        used += extra


# ---------------------------------------------------------------------------------------------
# Plan file
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Planning a model
# ---------------------------------------------------------------------------------------------


def _per_layer_array(name: str, v: Any, n_layer: int, n_types: int) -> np.ndarray:
    a = np.array(v, dtype=float)
    if a.shape != (n_layer, n_types):
        raise ValueError(f"{name} must have shape [n_layer, n_types] = [{n_layer}, {n_types}], got {list(a.shape)}")
    if np.any(np.isnan(a)) or np.any(a == -np.inf):
        raise ValueError(f"{name} must hold numbers or +inf (type not usable), not NaN or -inf")
    return a


def _check_reach(errors: np.ndarray, w: np.ndarray, bits: np.ndarray, budget: float, names: list, model: str,
                 what: str) -> None:
    allowed = np.isfinite(errors)
    lo = sum(int(w[i]) * float(bits[allowed[i]].min()) for i in range(len(w))) / float(w.sum())
    hi = sum(int(w[i]) * float(bits[allowed[i]].max()) for i in range(len(w))) / float(w.sum())
    if not (lo * (1 - _BUDGET_RTOL) <= float(budget) <= hi * (1 + _BUDGET_RTOL)):
        raise ValueError(f"{what}budget {budget:g} bits per value is outside what the types {', '.join(names)} can "
                         f"reach on {model}: {lo:g} to {hi:g} bits per value")


def plan_budget(info: Any, sha256: str, sensitivity_k: Sequence[float], sensitivity_v: Sequence[float],
                budget: float | str | Budget, types: Sequence[TypeSpec] | None = None, method: str = "dp",
                errors_k: Any = None, errors_v: Any = None,
                sensitivity_source: str | None = None, notes: dict | None = None) -> KVPlan:
    """The plan with the least predicted error whose average bits per value stay within ``budget``:
    a number (K and V together), or a :class:`Budget` or "K/V" string (each side on its own, a
    side given as a type name in that type for every layer).

    Items are the K and the V of each cache layer (all K items first, then all V), weighted by
    their values per token (n_head_kv * head size). A type whose block size does not divide an
    item's head size is not used for it. The errors are ``errors_k`` / ``errors_v`` (measured,
    ``[n_layer, len(types)]``, +inf for "not usable") when given, else the rate-distortion model
    of ``sensitivity_k`` / ``sensitivity_v`` (one per layer). ``types`` defaults to
    f16, q8_0, q4_0, kvq3, kvq2. ``sensitivity_source`` is recorded in the plan (default
    "calibrated-kl" with measured errors, "activation-norm" without); ``notes`` are added to the
    plan's notes (for example the KV calibration it was made for).

    Layers without their own KV cache allocate nothing; they get the cheapest type in
    ``types`` that fits their head size (f16 when none does).

    Raises ValueError for a budget outside what the types can reach on this model (the message
    gives the range), for unknown types, or for sensitivities/errors of the wrong shape.
    """
    cts = [cache_type(t) for t in (types if types is not None else DEFAULT_TYPES)]
    if not cts:
        raise ValueError("types is empty: give at least one cache type")
    names = [t.name for t in cts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"types lists {', '.join(dup)} more than once")
    if (errors_k is None) != (errors_v is None):
        raise ValueError("give both errors_k and errors_v, or neither")
    n_layer = info.n_layer
    n_types = len(cts)
    bits = np.array([t.bits_per_value for t in cts])
    if errors_k is not None:
        ek = _per_layer_array("errors_k", errors_k, n_layer, n_types)
        ev = _per_layer_array("errors_v", errors_v, n_layer, n_types)
        label = sensitivity_source or "calibrated-kl"
    else:
        sk = np.array(sensitivity_k, dtype=float).reshape(-1)
        sv = np.array(sensitivity_v, dtype=float).reshape(-1)
        if sk.shape[0] != n_layer or sv.shape[0] != n_layer:
            raise ValueError(f"give one K and one V sensitivity per layer: the model has {n_layer} layers, got "
                             f"{sk.shape[0]} K and {sv.shape[0]} V sensitivities")
        ek, ev = rate_distortion_errors(sk, bits), rate_distortion_errors(sv, bits)
        label = sensitivity_source or "activation-norm"

    layers = info.cache_layers()
    hk, hv, nkv = model_shapes(info)
    rows, weights = [], []
    for which, errs, heads in (("K", ek, hk), ("V", ev, hv)):
        for il in layers:
            row = errs[il].copy()
            row[[heads[il] % t.block_size != 0 for t in cts]] = np.inf
            if not np.isfinite(row).any():
                raise ValueError(f"none of the types {', '.join(names)} can hold layer {il}'s {which} cache "
                                 f"(head size {heads[il]}, or no finite error given): add f16 to the types")
            rows.append(row)
            weights.append(nkv[il] * heads[il])
    if not rows:
        raise ValueError(f"{model_name(info)} has no layer with its own KV cache, so there is nothing to plan")
    errors = np.array(rows)
    w = np.array(weights, dtype=np.int64)
    try:
        b = Budget.parse(budget)
    except TypeError as e:
        raise ValueError(str(e)) from None
    n = len(layers)
    if not b.split:
        _check_reach(errors, w, bits, b.total, names, model_name(info), "")
        choice, used = _optimize(errors, w, bits, b.total, method, names)
        total = b.total
    else:
        choice, used = np.zeros(len(w), dtype=np.int64), method
        for lo, which, side in ((0, "K", b.k), (n, "V", b.v)):
            e = errors[lo:lo + n].copy()
            if isinstance(side, str):
                if side not in names:
                    raise ValueError(f"budget {b.label}: {which} in {side} needs {side} among the types "
                                     f"({', '.join(names)})")
                j = names.index(side)
                if not np.isfinite(e[:, j]).all():
                    raise ValueError(f"budget {b.label}: {side} cannot hold every layer's {which} cache on "
                                     f"{model_name(info)} (head size)")
                choice[lo:lo + n] = j
                continue
            _check_reach(e, w[lo:lo + n], bits, float(side), names, model_name(info), f"the {which} side of ")
            choice[lo:lo + n], side_used = _optimize(e, w[lo:lo + n], bits, float(side), method, names)
            used = side_used if side_used != method else used
        bk, bv = b.sides()
        total = (bk * float(w[:n].sum()) + bv * float(w[n:].sum())) / float(w.sum())
    predicted = float(errors[np.arange(len(choice)), choice].sum())

    def cheapest_fitting(head: int) -> CacheType:
        fits = [t for t in cts if head % t.block_size == 0]
        return min(fits, key=lambda t: t.bits_per_value) if fits else cache_type("f16")

    types_k = [cheapest_fitting(hk[il]) for il in range(n_layer)]
    types_v = [cheapest_fitting(hv[il]) for il in range(n_layer)]
    for pos, il in enumerate(layers):
        types_k[il] = cts[int(choice[pos])]
        types_v[il] = cts[int(choice[n + pos])]
    notes = {"types": names, **(notes or {})}
    if b.split:
        notes["budget_k_v"] = b.label
    if used != method:
        notes["fallback"] = f"{method} grid too large, used {used}"
    return make_plan(info, sha256, types_k, types_v, budget=float(total), method=used, sensitivity=label,
                     predicted_error=predicted, notes=notes)
