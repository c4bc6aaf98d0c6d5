"""pyadaq.plan.planner: the optimizer against brute force, the rate-distortion model, plan files,
check_plan against tiny generated models, and plan_budget on synthetic sensitivities.

Pure numpy and header reads only (no llama.cpp context is created); a few seconds at most.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
import warnings

import numpy as np
import pytest

import pyadaq
from pyadaq.plan.planner import Budget, optimize, plan_budget, rate_distortion_errors
from pyadaq.runtime.kvplan import KVPlan, PlanFileError, PlanMismatchError, check_plan, make_plan

RTOL = 1e-9


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def all_choices(n: int, m: int) -> np.ndarray:
    """Every choice of one of m types for each of n items: [m**n, n]."""
    return np.array(list(itertools.product(range(m), repeat=n)))


def brute_force(errors, weights, bits, budget):
    """(best objective, its assignment) over every assignment, or (inf, None) if none fits."""
    errors, weights, bits = np.asarray(errors, float), np.asarray(weights), np.asarray(bits, float)
    n, m = errors.shape
    combos = all_choices(n, m)
    cost = (weights[None, :] * bits[combos]).sum(axis=1)
    err = errors[np.arange(n)[None, :], combos].sum(axis=1)
    ok = (cost <= budget * weights.sum() * (1 + RTOL)) & np.isfinite(err)
    if not ok.any():
        return math.inf, None
    k = np.flatnonzero(ok)[np.argmin(err[ok])]
    return float(err[k]), combos[k]


def objective(errors, choice):
    errors = np.asarray(errors, float)
    return float(errors[np.arange(len(choice)), choice].sum())


def fits(weights, bits, budget, choice):
    weights, bits = np.asarray(weights), np.asarray(bits, float)
    return float((weights * bits[choice]).sum()) <= budget * weights.sum() * (1 + RTOL)


def best_model_plan(info, errors_k, errors_v, types, budget):
    """(least summed error, its (types_k, types_v)) over every choice of one of `types` for the K
    and the V of each layer of a model whose layers all have their own cache and fit every type,
    within the budget in bits per value: brute force, the check of plan_budget."""
    n = info.n_layer
    assert info.cache_layers() == list(range(n))
    weights = [info.n_head_kv_layer(il) * info.head_size_k_layer(il) for il in range(n)]
    weights += [info.n_head_kv_layer(il) * info.head_size_v_layer(il) for il in range(n)]
    bits = [pyadaq.cache_type(t).bits_per_value for t in types]
    best, combo = brute_force(np.vstack([errors_k, errors_v]), np.array(weights), bits, budget)
    assert combo is not None
    return best, ([types[j] for j in combo[:n]], [types[j] for j in combo[n:]])


def plan_error(plan, errors_k, errors_v, types) -> float:
    """The summed error of a plan's types, read off the error tables."""
    col = {t: j for j, t in enumerate(types)}
    return float(sum(errors_k[il][col[t]] for il, t in enumerate(plan.types_k))
                 + sum(errors_v[il][col[t]] for il, t in enumerate(plan.types_v)))


def assert_best_plan(plan, errors_k, errors_v, types, budget, info):
    """plan is within the budget and no plan within it has a smaller summed error."""
    assert plan.bits_per_value <= budget * (1 + RTOL)
    best, _ = best_model_plan(info, errors_k, errors_v, types, budget)
    got = plan_error(plan, errors_k, errors_v, types)
    assert plan.predicted_error == pytest.approx(got, rel=1e-12, abs=1e-15)
    assert got == pytest.approx(best, rel=1e-12, abs=1e-15), (budget, plan.types_k, plan.types_v)


def assert_more_sensitive_more_bits(plan, sensitivity_k, sensitivity_v):
    """Of two items with equal weights, the more sensitive one never has fewer bits: under the
    rate-distortion model, swapping their types would lower the summed error at the same cost."""
    items = [(s, pyadaq.cache_type(t).bits_per_value) for s, t in
             zip(list(sensitivity_k) + list(sensitivity_v), plan.types_k + plan.types_v)]
    for s_a, b_a in items:
        for s_b, b_b in items:
            if s_a > s_b:
                assert b_a >= b_b, (plan.types_k, plan.types_v)


BIT_POOL = [2.25, 2.5, 3.5, 4.5, 5.5, 6.0, 8.5, 16.0]
WEIGHT_POOL = [32, 48, 64, 96, 128, 256, 80]


def random_case(rng):
    n = int(rng.integers(2, 7))
    m = int(rng.integers(2, 5))
    bits = np.sort(rng.choice(BIT_POOL, size=m, replace=False))[::-1]
    weights = rng.choice(WEIGHT_POOL, size=n)
    if rng.random() < 0.3:
        weights[:] = weights[0]  # equal weights too
    errors = rng.exponential(1.0, size=(n, m)) * np.exp2(-bits)[None, :] * rng.uniform(0.1, 10, size=(n, 1))
    forbid = rng.random((n, m)) < 0.2
    for i in range(n):
        if forbid[i].all():
            forbid[i, rng.integers(m)] = False
    errors[forbid] = np.inf
    allowed = ~forbid
    lo = sum(w * bits[allowed[i]].min() for i, w in enumerate(weights)) / weights.sum()
    hi = sum(w * bits[allowed[i]].max() for i, w in enumerate(weights)) / weights.sum()
    r = rng.random()
    if r < 0.15:
        budget = lo  # exactly the cheapest plan
    elif r < 0.3:
        # exactly the cost of some allowed assignment (the budget boundary)
        choice = [int(rng.choice(np.flatnonzero(allowed[i]))) for i in range(n)]
        budget = float((weights * bits[choice]).sum() / weights.sum())
    else:
        budget = float(rng.uniform(lo, hi + 0.5))
    return errors, weights, bits, budget


# ---------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------


def test_dp_matches_brute_force_and_greedy_is_feasible():
    rng = np.random.default_rng(1234)
    n_greedy_worse = 0
    for case in range(300):
        errors, weights, bits, budget = random_case(rng)
        best, _ = brute_force(errors, weights, bits, budget)
        assert math.isfinite(best), (case, budget)
        dp = optimize(errors, weights, bits, budget, method="dp")
        assert dp.shape == (len(weights),) and dp.dtype.kind == "i"
        assert fits(weights, bits, budget, dp), case
        assert np.all(np.isfinite(errors[np.arange(len(dp)), dp])), case  # never a forbidden pair
        assert objective(errors, dp) == pytest.approx(best, rel=1e-12, abs=0), case
        gr = optimize(errors, weights, bits, budget, method="greedy")
        assert fits(weights, bits, budget, gr), case
        assert np.all(np.isfinite(errors[np.arange(len(gr)), gr])), case
        assert objective(errors, gr) >= best * (1 - 1e-12), case
        n_greedy_worse += objective(errors, gr) > best * (1 + 1e-9)
    assert n_greedy_worse > 0  # the random cases do exercise the greedy's sub-optimality


def test_greedy_is_optimal_with_equal_weights_equal_steps_and_convex_errors():
    # Equal weights and equally spaced bits: every upgrade costs a whole number of equal steps,
    # and with errors strictly convex in bits each item's gains per step decrease, so taking the
    # largest gain per step first is optimal for any budget that is a whole number of steps.
    rng = np.random.default_rng(7)
    bits = np.array([2.5, 3.5, 4.5, 5.5])
    for _ in range(20):
        n = int(rng.integers(2, 6))
        weights = np.full(n, 128)
        errors = rate_distortion_errors(rng.uniform(0.5, 20.0, n), bits)
        for steps in range(3 * n + 1):
            budget = 2.5 + steps / n
            best, _ = brute_force(errors, weights, bits, budget)
            gr = optimize(errors, weights, bits, budget, method="greedy")
            assert objective(errors, gr) == pytest.approx(best, rel=1e-12)
            assert objective(errors, optimize(errors, weights, bits, budget)) == pytest.approx(best, rel=1e-12)


def test_greedy_can_be_worse_than_dp():
    # item 0: +2 bit-cost for -3 error (ratio 1.5); item 1: +4 for -5 (ratio 1.25); 4 spare:
    # the greedy takes item 0 first and then item 1 no longer fits; the optimum upgrades item 1.
    errors = np.array([[0.0, 3.0], [0.0, 5.0]])
    weights = [1, 2]
    bits = [4.0, 2.0]
    budget = 10 / 3
    assert list(optimize(errors, weights, bits, budget, method="greedy")) == [0, 1]
    assert list(optimize(errors, weights, bits, budget, method="dp")) == [1, 0]


def test_dp_tie_break_gives_earlier_items_more_bits():
    # all errors equal: any plan is optimal; the DP gives item 0 the most bits, then item 1
    errors = np.zeros((3, 3))
    bits = [16.0, 8.5, 4.5]
    weights = [64, 64, 64]
    assert list(optimize(errors, weights, bits, (16 + 4.5 + 4.5) / 3)) == [0, 2, 2]
    assert list(optimize(errors, weights, bits, (16 + 8.5 + 4.5) / 3)) == [0, 1, 2]
    assert list(optimize(errors, weights, bits, 16.0)) == [0, 0, 0]
    # the greedy takes no upgrade that does not lower the error: cheapest types
    assert list(optimize(errors, weights, bits, 16.0, method="greedy")) == [2, 2, 2]


def test_optimize_rejects_bad_budgets_and_items():
    errors = np.ones((2, 2))
    with pytest.raises(ValueError, match=r"budget 2 bits/value is below the smallest possible 2\.5 with types "
                                         r"q4_0, kvq2"):
        optimize(errors, [32, 32], [4.5, 2.5], 2.0, type_names=["q4_0", "kvq2"])
    for method in ("dp", "greedy"):
        with pytest.raises(ValueError, match="below the smallest possible 3"):
            optimize(np.array([[1.0, np.inf], [1.0, 1.0]]), [32, 32], [3.5, 2.5], 2.9, method=method)
    with pytest.raises(ValueError, match="item 1 has no allowed type"):
        optimize(np.array([[1.0, 2.0], [np.inf, np.inf]]), [32, 32], [4.5, 2.5], 4.0)
    with pytest.raises(ValueError, match="unknown planning method 'best'"):
        optimize(errors, [32, 32], [4.5, 2.5], 4.0, method="best")
    with pytest.raises(ValueError, match="weights must be positive integers"):
        optimize(errors, [32, 0.5], [4.5, 2.5], 4.0)
    with pytest.raises(ValueError, match="weights has 3 entries for 2 items"):
        optimize(errors, [32, 32, 32], [4.5, 2.5], 4.0)
    with pytest.raises(ValueError, match="NaN"):
        optimize(np.array([[1.0, np.nan], [1.0, 1.0]]), [32, 32], [4.5, 2.5], 4.0)
    # over budget is fine for the optimizer: everything in the most expensive type
    assert list(optimize(np.array([[0.0, 1.0], [0.0, 1.0]]), [32, 32], [4.5, 2.5], 99.0)) == [0, 0]


def test_dp_needs_dyadic_bits_and_falls_back_on_a_huge_grid():
    errors = np.array([[0.0, 1.0], [0.0, 2.0]])
    with pytest.raises(ValueError, match=r"integer grid.*method='greedy'"):
        optimize(errors, [32, 32], [16.0, 3.3], 8.0)
    assert list(optimize(errors, [32, 32], [16.0, 3.3], 9.65, method="greedy")) == [1, 0]
    # coprime weights: gcd 1, a capacity of millions of cells
    with pytest.warns(RuntimeWarning, match="greedy"):
        out = optimize(errors, [1_000_003, 999_983], [16.0, 2.5], 9.0)
    assert fits([1_000_003, 999_983], [16.0, 2.5], 9.0, out)


def test_rate_distortion_errors_formula():
    s = [0.5, 3.0, 12.0]
    bits = [16.0, 8.5, 4.5, 3.5, 2.5, 32.0]
    e = rate_distortion_errors(s, bits)
    assert e.shape == (3, 6)
    for i, si in enumerate(s):
        for j, b in enumerate(bits):
            expected = 0.0 if b >= 16 else si * si * 2.0 ** (-2.0 * b)
            assert e[i, j] == pytest.approx(expected, rel=1e-15, abs=0)
    assert e[2, 4] == pytest.approx(144 / 32)  # 12^2 * 2^-5


# ---------------------------------------------------------------------------------------------
# plan files and check_plan
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def info4(tiny_model):
    return pyadaq.read_model_info(tiny_model(head_dim=64, n_layer=4))


def test_uniform_plan_bits_and_bytes(info4):
    # 4 layers, 2 KV heads of 64: 128 values per token for K and for V in each layer
    p = KVPlan.uniform(info4, "q4_0", "q4_0", "abc")
    assert p.bits_per_value == 4.5
    assert p.bytes_per_token == 4 * 2 * (128 // 32 * 18)
    p = KVPlan.uniform(info4, "q8_0", "kvq2", "abc")
    assert p.bits_per_value == 5.5
    assert p.bytes_per_token == 4 * (128 // 32 * 34 + 128 // 32 * 10)
    assert p.types_k == ["q8_0"] * 4 and p.types_v == ["kvq2"] * 4
    assert p.head_sizes_k == p.head_sizes_v == [64] * 4 and p.n_head_kv == [2] * 4
    assert p.model_name == info4.path.name and p.n_layer == 4 and p.budget is None
    # mixed, by hand: K f16 q8_0 kvq3 kvq2, V q4_0 x 4
    p = make_plan(info4, "abc", ["f16", "Q8_0", "kvq3", "kvq2"], ["q4_0"] * 4, budget=6.0)
    nbytes = (256 + 136 + 56 + 40) + 4 * 72
    assert p.types_k == ["f16", "q8_0", "kvq3", "kvq2"]
    assert p.bytes_per_token == nbytes
    assert p.bits_per_value == 8 * nbytes / (8 * 128)


def test_plan_round_trip(info4, tmp_path):
    p = make_plan(info4, info4.sha256, ["q8_0", "kvq3", "q8_0", "q4_0"], ["kvq2", "kvq2", "q4_0", "kvq3"],
                  budget=4.0, method="dp", sensitivity="activation-norm", predicted_error=0.125,
                  notes={"types": ["q8_0", "kvq2"]})
    path = tmp_path / "plan.json"
    p.save(path)
    q = KVPlan.load(path)
    assert q == p
    assert q.source == str(path)
    assert json.loads(path.read_text()) == p.to_dict() == json.loads(p.to_json())
    assert KVPlan.from_dict(p.to_dict()) == p
    check_plan(q, info4, info4.sha256)


def _without(d, key):
    d = dict(d)
    del d[key]
    return d


# variant -> (how to make the file's content from a good plan dict, what the message says)
CORRUPT = {
    "not json": (lambda d: "{ this is not json", "not valid JSON"),
    "not an object": (lambda d: json.dumps([1, 2]), "JSON object"),
    "wrong version": (lambda d: json.dumps({**d, "version": 2}), "version 2 is not supported"),
    "missing key": (lambda d: json.dumps(_without(d, "types_v")), "missing key types_v"),
    "missing version": (lambda d: json.dumps(_without(d, "version")), "missing key version"),
    "short types": (lambda d: json.dumps({**d, "types_k": d["types_k"][:3]}), "'types_k' has 3 entries"),
    "long kv heads": (lambda d: json.dumps({**d, "n_head_kv": d["n_head_kv"] + [2]}), "'n_head_kv' has 5 entries"),
    "unknown type": (lambda d: json.dumps({**d, "types_v": ["q4_0", "kvq9", "q4_0", "q4_0"]}),
                     "layer 1 of 'types_v'.*unknown KV-cache type 'kvq9'"),
    "type not a name": (lambda d: json.dumps({**d, "types_k": ["q4_0", 3, "q4_0", "q4_0"]}), "cache type name"),
    "bad n_layer": (lambda d: json.dumps({**d, "n_layer": "four"}), "'n_layer' must be an integer"),
    "bad budget": (lambda d: json.dumps({**d, "budget": "lots"}), "'budget' must be a number or null"),
    "binary": (lambda d: b"\xff\xfe\x00garbage", "not UTF-8"),
    "missing file": (None, "plan file not found"),
    "directory": (None, "cannot read plan file"),
}


@pytest.mark.parametrize("variant", list(CORRUPT))
def test_corrupt_plan_files(info4, tmp_path, variant):
    make, message = CORRUPT[variant]
    path = tmp_path / "plan.json"
    if variant == "directory":
        path.mkdir()
    elif make is not None:
        content = make(KVPlan.uniform(info4, "q4_0", "q4_0", "abc").to_dict())
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    with pytest.raises(PlanFileError, match=message) as ei:
        KVPlan.load(path)
    assert str(path) in str(ei.value) and ei.value.path == str(path)
    assert isinstance(ei.value, ValueError)


def test_check_plan_wrong_layer_count(info4, tiny_model, tmp_path):
    info2 = pyadaq.read_model_info(tiny_model(head_dim=64, n_layer=2))
    path = tmp_path / "plan.json"
    KVPlan.uniform(info2, "q8_0", "kvq2", info2.sha256).save(path)
    with pytest.raises(PlanMismatchError, match=re.escape(f"{path} was made for a model with 2 layers "
                                                          f"({info2.path.name}), this model has 4 layers")):
        check_plan(KVPlan.load(path), info4, info4.sha256)


def test_check_plan_wrong_head_size_or_kv_heads(info4, tiny_model):
    info128 = pyadaq.read_model_info(tiny_model(head_dim=128, n_layer=4))
    with pytest.raises(PlanMismatchError, match="layer 0 K head size 128 in the plan, 64 in this model"):
        check_plan(KVPlan.uniform(info128, "q8_0", "kvq2", info128.sha256), info4)
    info_kv4 = pyadaq.read_model_info(tiny_model(head_dim=64, n_layer=4, n_head_kv=4))
    with pytest.raises(PlanMismatchError, match="layer 0 KV head count 4 in the plan, 2 in this model"):
        check_plan(KVPlan.uniform(info_kv4, "q8_0", "kvq2", info_kv4.sha256), info4)


def test_check_plan_other_file_same_shapes_only_warns(info4):
    plan = KVPlan.uniform(info4, "q8_0", "kvq2", "0" * 64)
    with pytest.warns(UserWarning, match="sha256 000000000000"):
        tk, tv = check_plan(plan, info4, info4.sha256)
    assert [t.name for t in tk] == ["q8_0"] * 4 and [t.name for t in tv] == ["kvq2"] * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_plan(plan, info4)  # no sha256 given: nothing to compare
        check_plan(KVPlan.uniform(info4, "q8_0", "kvq2", info4.sha256), info4, info4.sha256)


def test_check_plan_type_not_fitting_head_size(tiny_model):
    info48 = pyadaq.read_model_info(tiny_model(head_dim=48, n_layer=2))
    with pytest.raises(ValueError, match="block size 32, which does not divide that layer's K head size 48"):
        KVPlan.uniform(info48, "q4_0", "f16", info48.sha256)
    plan = KVPlan.uniform(info48, "f16", "f16", info48.sha256)
    check_plan(plan, info48, info48.sha256)
    plan.types_v[1] = "kvq2"  # a hand-edited plan
    with pytest.raises(ValueError, match=r"layer 1's V cache type 'kvq2' has block size 32, which does not "
                                         r"divide that layer's V head size 48") as ei:
        check_plan(plan, info48, info48.sha256)
    assert not isinstance(ei.value, PlanMismatchError)
    plan.types_v[1] = "kvq9"
    with pytest.raises(ValueError, match="unknown KV-cache type 'kvq9'"):
        check_plan(plan, info48)


# ---------------------------------------------------------------------------------------------
# plan_budget
# ---------------------------------------------------------------------------------------------


def test_plan_budget_keys_get_more_bits(info4):
    sk, sv = [10.0, 12.0, 9.0, 11.0], [1.0, 1.2, 0.9, 1.1]
    for method in ("dp", "greedy"):
        plan = plan_budget(info4, "abc", sk, sv, 3.5, types=["q4_0", "kvq2"], method=method)
        bits = {"q4_0": 4.5, "kvq2": 2.5}
        assert sum(bits[t] for t in plan.types_k) > sum(bits[t] for t in plan.types_v)
        assert plan.types_k == ["q4_0"] * 4 and plan.types_v == ["kvq2"] * 4
        assert plan.bits_per_value <= 3.5 + 1e-12
        assert plan.budget == 3.5 and plan.method == method and plan.sensitivity == "activation-norm"
        e = rate_distortion_errors(sk, [4.5, 2.5])[:, 0].sum() + rate_distortion_errors(sv, [4.5, 2.5])[:, 1].sum()
        assert plan.predicted_error == pytest.approx(e)
        check_plan(plan, info4, "abc")


@pytest.mark.parametrize("seed, v_scale", [(3, 0.2), (4, 1.0)])
def test_plan_budget_is_the_best_plan_within_budget(info4, seed, v_scale):
    """For every budget, the plan is the least-error plan within it (brute force over all 5**8
    plans of the 8 items), a higher budget never predicts a larger error, and the more sensitive
    item of two never gets fewer bits: K over V per layer when K is the more sensitive
    (v_scale 0.2), whichever is more sensitive when they are alike (v_scale 1.0)."""
    rng = np.random.default_rng(seed)
    sk, sv = rng.uniform(1, 10, 4), v_scale * rng.uniform(1, 10, 4)
    types = ["f16", "q8_0", "q4_0", "kvq3", "kvq2"]
    bits = [pyadaq.cache_type(t).bits_per_value for t in types]
    ek, ev = rate_distortion_errors(sk, bits), rate_distortion_errors(sv, bits)
    previous = math.inf
    for budget in (2.5, 2.75, 3.0, 3.5, 4.0, 5.5, 8.5, 10.0, 16.0):
        plan = plan_budget(info4, "abc", sk, sv, budget)  # the default types
        assert set(plan.types_k + plan.types_v) <= set(types)
        assert_best_plan(plan, ek, ev, types, budget, info4)
        assert_more_sensitive_more_bits(plan, sk, sv)
        assert plan.predicted_error <= previous
        previous = plan.predicted_error
    if v_scale < 1:
        kb = [pyadaq.cache_type(t).bits_per_value for t in plan_budget(info4, "abc", sk, sv, 4.0).types_k]
        vb = [pyadaq.cache_type(t).bits_per_value for t in plan_budget(info4, "abc", sk, sv, 4.0).types_v]
        assert all(k >= v for k, v in zip(kb, vb)) and sum(kb) > sum(vb)
    assert plan_budget(info4, "abc", sk, sv, 2.5).types_k == ["kvq2"] * 4  # the only plan that fits
    top = plan_budget(info4, "abc", sk, sv, 16.0)
    assert top.types_k == top.types_v == ["f16"] * 4 and top.predicted_error == 0.0


def test_plan_budget_with_measured_errors(info4):
    # measured errors say V matters more here: V gets the bits, whatever the sensitivities say
    ek = np.tile([0.0, 1.0], (4, 1))
    ev = np.tile([0.0, 5.0], (4, 1))
    plan = plan_budget(info4, "abc", [100.0] * 4, [1.0] * 4, 3.5, types=["q4_0", "kvq2"],
                       errors_k=ek, errors_v=ev)
    assert plan.types_v == ["q4_0"] * 4 and plan.types_k == ["kvq2"] * 4
    assert plan.sensitivity == "calibrated-kl" and plan.predicted_error == 4.0
    with pytest.raises(ValueError, match="both errors_k and errors_v"):
        plan_budget(info4, "abc", [1.0] * 4, [1.0] * 4, 3.5, types=["q4_0", "kvq2"], errors_k=ek)
    with pytest.raises(ValueError, match=r"errors_v must have shape \[n_layer, n_types\] = \[4, 2\]"):
        plan_budget(info4, "abc", [1.0] * 4, [1.0] * 4, 3.5, types=["q4_0", "kvq2"], errors_k=ek, errors_v=ev[:3])


@pytest.mark.parametrize("budget", [2.0, 4.6, 16.0])
def test_plan_budget_outside_range(info4, budget):
    with pytest.raises(ValueError, match=r"outside what the types q4_0, kvq2 can reach .*: 2\.5 to 4\.5 bits"):
        plan_budget(info4, "abc", [1.0] * 4, [1.0] * 4, budget, types=["q4_0", "kvq2"])


def test_plan_budget_bad_inputs(info4):
    with pytest.raises(ValueError, match="one K and one V sensitivity per layer"):
        plan_budget(info4, "abc", [1.0] * 3, [1.0] * 4, 3.5)
    with pytest.raises(ValueError, match="unknown KV-cache type 'kvq9'"):
        plan_budget(info4, "abc", [1.0] * 4, [1.0] * 4, 3.5, types=["q4_0", "kvq9"])
    with pytest.raises(ValueError, match="q4_0 more than once"):
        plan_budget(info4, "abc", [1.0] * 4, [1.0] * 4, 3.5, types=["q4_0", "Q4_0", "kvq2"])


def test_plan_budget_head_sizes_and_non_cache_layers(info4):
    # layers 0 and 2 are sliding-window layers with head size 48 (no block-32 type fits), and
    # layer 3 has no cache of its own (it shares one)
    info = dataclasses.replace(info4, sliding_window=32, swa_layers=(True, False, True, False),
                               head_size_k_swa=48, head_size_v_swa=48, n_layer_kv=3)
    assert info.cache_layers() == [0, 1, 2]
    plan = plan_budget(info, "abc", [5.0] * 4, [1.0] * 4, 12.0, types=["f16", "q4_0", "kvq2"])
    assert plan.types_k[0] == plan.types_v[0] == plan.types_k[2] == plan.types_v[2] == "f16"
    assert plan.types_k[3] == plan.types_v[3] == "kvq2"  # no cache: the cheapest type that fits
    assert plan.head_sizes_k == [48, 64, 48, 64]
    # bits and bytes over the three cache layers only
    values = 2 * (2 * 48) * 2 + 2 * 128
    nbytes = 4 * 96 * 2 + sum(pyadaq.cache_type(t).row_bytes(128) for t in (plan.types_k[1], plan.types_v[1]))
    assert plan.bytes_per_token == nbytes
    assert plan.types_k[1] == plan.types_v[1] == "q4_0"  # 12 bits leave room for q4_0, not f16
    assert plan.bits_per_value == 8 * nbytes / values <= 12.0
    check_plan(plan, info)
    with pytest.raises(ValueError, match="outside what the types"):
        plan_budget(info, "abc", [5.0] * 4, [1.0] * 4, 4.0, types=["f16", "q4_0", "kvq2"])


# ---------------------------------------------------------------------------------------------
# budgets per side (K/V)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, label, total, k, v", [
    ("3.0", "3", 3.0, None, None), (4.5, "4.5", 4.5, None, None), ("q8_0/2.5", "q8_0/2.5", None, "q8_0", 2.5),
    (" 4.5 / 2.50 ", "4.5/2.5", None, 4.5, 2.5), ("Q4_0/kvq2", "q4_0/kvq2", None, "q4_0", "kvq2")])
def test_budget_parse(text, label, total, k, v):
    b = Budget.parse(text)
    assert (b.total, b.k, b.v, b.label) == (total, k, v, label)
    assert Budget.parse(b.label) == b and Budget.parse(b) is b


@pytest.mark.parametrize("text, match", [
    ("lots", "not a number"), ("-1", "not a positive number"), ("nan", "not a positive number"),
    ("4.5/2.5/1", "is not K/V"), ("/2.5", "is not K/V"), ("q9_0/2.5", "the K side 'q9_0' is neither"),
    ("4.5/0", "V side"), ("4.5/", "is not K/V")])
def test_budget_parse_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        Budget.parse(text)
    with pytest.raises(TypeError, match="not bool"):
        Budget.parse(True)


@pytest.mark.parametrize("seed", [5, 6])
def test_plan_budget_per_side_is_the_best_plan_of_each_side(info4, seed):
    """"K/V": each side is the least-error plan within its own budget (brute force over the
    5**4 plans of its 4 items), whatever the other side's errors; a type name fixes that side."""
    rng = np.random.default_rng(seed)
    types = ["f16", "q8_0", "q4_0", "kvq3", "kvq2"]
    bits = np.array([pyadaq.cache_type(t).bits_per_value for t in types])
    ek, ev = rng.uniform(0, 1, (4, 5)), rng.uniform(0, 1, (4, 5))
    ek[:, 0] = ev[:, 0] = 0.0
    w = np.full(4, 256)
    for kb, vb in ((4.5, 2.5), (8.5, 3.0), (3.0, 6.0), ("q8_0", 2.75), (5.0, "kvq3")):
        plan = plan_budget(info4, "abc", [1.0] * 4, [1.0] * 4, f"{kb}/{vb}", types=types, errors_k=ek, errors_v=ev)
        for side, b, errs, got in (("K", kb, ek, plan.types_k), ("V", vb, ev, plan.types_v)):
            if isinstance(b, str):
                assert got == [b] * 4
                continue
            best, _ = brute_force(errs, w, bits, b)
            assert sum(errs[i, types.index(t)] for i, t in enumerate(got)) == pytest.approx(best, rel=1e-12), side
            assert sum(pyadaq.cache_type(t).bits_per_value for t in got) / 4 <= b + 1e-12
        bk = pyadaq.cache_type(kb).bits_per_value if isinstance(kb, str) else kb
        bv = pyadaq.cache_type(vb).bits_per_value if isinstance(vb, str) else vb
        assert plan.budget == pytest.approx((bk + bv) / 2) and plan.bits_per_value <= plan.budget + 1e-12
        assert plan.notes["budget_k_v"] == Budget.parse(f"{kb}/{vb}").label
        check_plan(plan, info4, "abc")


def test_plan_budget_per_side_bad_inputs(info4):
    kw = {"types": ["q4_0", "kvq2"]}
    with pytest.raises(ValueError, match=r"the V side of budget 2 bits per value is outside .*: 2\.5 to 4\.5"):
        plan_budget(info4, "abc", [1.0] * 4, [1.0] * 4, "4.5/2", **kw)
    with pytest.raises(ValueError, match="q8_0 among the types"):
        plan_budget(info4, "abc", [1.0] * 4, [1.0] * 4, "q8_0/2.5", **kw)
    with pytest.raises(ValueError, match="not bool"):
        plan_budget(info4, "abc", [1.0] * 4, [1.0] * 4, True, **kw)
