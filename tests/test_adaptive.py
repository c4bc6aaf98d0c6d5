"""Plans in use: calibration, pyadaq.Llama(kv_plan=, kv_budget=), `pyadaq plan` and
`pyadaq eval --configs plan:...,budget:...` on tiny generated models, and their bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_planner import assert_best_plan, assert_more_sensitive_more_bits

import pyadaq
from pyadaq.cli import main
from pyadaq.plan.calibrate import cached_analysis, calibrate, errors_from, norm_sensitivities, plan_for_budget
from pyadaq.plan.planner import DEFAULT_TYPES, rate_distortion_errors
from pyadaq.runtime.kvplan import KVPlan, PlanMismatchError

TEXT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog near the river." for i in range(300))


@pytest.fixture(scope="module")
def model4(tiny_model):
    return tiny_model(head_dim=64, n_layer=4)


def test_calibration_measures_each_layer(model4, cache):
    cal = calibrate(model4, ["f16", "q8_0", "kvq2"], TEXT, n_ctx=64, n_chunks=2, n_threads=1, progress=False)
    assert cal["types"] == ["f16", "q8_0", "kvq2"]
    for rows in (cal["errors_k"], cal["errors_v"]):
        assert len(rows) == 4
        for f16, q8, q2 in rows:
            assert f16 == 0.0
            assert 0.0 < q8 < q2  # one layer in q8_0 costs something, in kvq2 much more
    # cached: the second call reads the file (same figures, no new runs)
    files = list((cache / "adaptive").glob("calibration-*.json"))
    assert len(files) == 1
    again = calibrate(model4, ["f16", "q8_0", "kvq2"], TEXT, n_ctx=64, n_chunks=2, n_threads=1, progress=False)
    assert again == json.loads(files[0].read_text())


def test_plan_from_calibration_is_the_best_within_budget(model4, cache):
    """A calibrated plan minimizes the measured errors: for each budget its predicted error is
    the sum of the calibration's figures (above the floor) for its types, and no plan within the
    budget has a smaller sum (brute force over all 5**8); more budget never predicts more error;
    the budget's ends give all kvq2 and all f16 (error 0)."""
    types = ["f16", "q8_0", "q4_0", "kvq3", "kvq2"]
    cal = calibrate(model4, types, TEXT, n_ctx=64, n_chunks=1, n_threads=1, progress=False)
    ek, ev = errors_from(cal, types)
    info = pyadaq.read_model_info(model4)
    previous = float("inf")
    for budget in (2.5, 3.0, 4.5, 6.0, 16.0):
        plan = plan_for_budget(model4, budget, types=types, source_result=cal)
        assert plan.n_layer == 4 and len(plan.types_k) == len(plan.types_v) == 4
        assert plan.sensitivity == "calibrated-kl"
        assert_best_plan(plan, ek, ev, types, budget, info)
        assert plan.predicted_error <= previous
        previous = plan.predicted_error
        if budget == 2.5:
            assert plan.types_k == plan.types_v == ["kvq2"] * 4
    assert plan.types_k == plan.types_v == ["f16"] * 4 and plan.predicted_error == 0.0
    # the figures decide: when layer 2's V suffers 1000 times more in every lossy type, it gets
    # the most bits of all items
    hurt = dict(cal, errors_v=[list(r) for r in cal["errors_v"]])
    hurt["errors_v"][2] = [x if t == "f16" else 1000 * x for t, x in zip(cal["types"], cal["errors_v"][2])]
    ek2, ev2 = errors_from(hurt, types)
    plan = plan_for_budget(model4, 4.0, types=types, source_result=hurt)
    assert_best_plan(plan, ek2, ev2, types, 4.0, info)
    bits = [pyadaq.cache_type(t).bits_per_value for t in plan.types_k + plan.types_v]
    assert bits[4 + 2] == max(bits) > min(bits)


def test_llama_with_plan_file(model4, tmp_path):
    plan = KVPlan.uniform(pyadaq.read_model_info(model4), "q8_0", "kvq2", pyadaq.read_model_info(model4).sha256)
    plan.types_k[1] = "kvq3"
    plan.types_v[2] = "q4_0"
    path = tmp_path / "plan.json"
    plan.save(path)
    llm = pyadaq.Llama(str(model4), kv_plan=str(path), n_ctx=256, n_threads=1)
    try:
        k, v = llm.context_layer_types()
        assert [t.name for t in k] == ["q8_0", "kvq3", "q8_0", "q8_0"]
        assert [t.name for t in v] == ["kvq2", "kvq2", "q4_0", "kvq2"]
        assert llm.kv_cache_bytes == llm.kv_cache_bytes_expected
        out = llm("Line 1: the quick", max_tokens=4, temperature=0.0)
        assert out["choices"][0]["text"] is not None
    finally:
        llm.close()
    # a later plain Llama on the same file is uniform again
    plain = pyadaq.Llama(str(model4), n_ctx=256, n_threads=1)
    try:
        k, v = plain.context_layer_types()
        assert {t.name for t in k} == {"f16"} and {t.name for t in v} == {"f16"}
    finally:
        plain.close()


def test_llama_with_budget(model4, cache):
    """kv_budget gives the context the least-error plan within the budget for the model's own
    activation norms: more sensitive items never get fewer bits, and a larger budget never
    predicts more error."""
    llm = pyadaq.Llama(str(model4), kv_budget=4.0, kv_budget_source="norms", n_ctx=256, n_threads=1)
    try:
        plan = llm.kv_plan
        assert plan is not None and plan.sensitivity == "activation-norm"
        k, v = llm.context_layer_types()
        assert [t.name for t in k] == plan.types_k and [t.name for t in v] == plan.types_v
    finally:
        llm.close()
    # the norms it planned with: the analysis plan_for_budget cached (its defaults: 512 tokens, 2 chunks)
    sk, sv = norm_sensitivities(cached_analysis(model4, None, 512, 2, None, False, True))
    types = list(DEFAULT_TYPES)
    bits = [pyadaq.cache_type(t).bits_per_value for t in types]
    ek, ev = rate_distortion_errors(sk, bits), rate_distortion_errors(sv, bits)
    info = pyadaq.read_model_info(model4)
    assert_best_plan(plan, ek, ev, types, 4.0, info)
    assert_more_sensitive_more_bits(plan, sk, sv)
    assert plan.types_k + plan.types_v != ["kvq2"] * 8  # the budget is spent
    more = plan_for_budget(model4, 6.0, source="norms")
    assert more.predicted_error < plan.predicted_error


def test_plan_for_another_model_is_refused(model4, tiny_model, tmp_path):
    other = tiny_model(head_dim=64, n_layer=2)
    info = pyadaq.read_model_info(other)
    path = tmp_path / "plan2.json"
    KVPlan.uniform(info, "q8_0", "kvq2", info.sha256).save(path)
    with pytest.raises(PlanMismatchError, match="2 layers"):
        pyadaq.Llama(str(model4), kv_plan=str(path))
    info128 = pyadaq.read_model_info(tiny_model(head_dim=128, n_layer=4))
    KVPlan.uniform(info128, "q8_0", "kvq2", info128.sha256).save(path)
    with pytest.raises(PlanMismatchError):
        pyadaq.Llama(str(model4), kv_plan=str(path))


@pytest.mark.parametrize("kw, message", [
    ({"kv_budget": 1.0}, "outside what the types"),
    ({"kv_budget": 20.0}, "outside what the types"),
    ({"kv_budget": 3.0, "kv_plan": "x.json"}, "not both"),
    ({"kv_plan": "/nonexistent/plan.json"}, "plan.json"),
])
def test_llama_bad_plan_arguments(model4, cache, kw, message):
    with pytest.raises(ValueError, match=message):
        pyadaq.Llama(str(model4), **kw)


def test_quantized_v_plan_without_flash_attention(model4, tmp_path):
    info = pyadaq.read_model_info(model4)
    path = tmp_path / "p.json"
    KVPlan.uniform(info, "f16", "kvq2", info.sha256).save(path)
    with pytest.raises(ValueError, match="flash attention"):
        pyadaq.Llama(str(model4), kv_plan=str(path), flash_attn=False)


def test_plan_and_eval_cli(model4, cache, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    plan_path = tmp_path / "plan.json"
    analysis = tmp_path / "a.json"
    assert main(["analyze", "--model", str(model4), "--text", str(text), "--ctx", "64", "--chunks", "2",
                 "--threads", "1", "--json", str(analysis)]) == 0
    rc = main(["plan", "--model", str(model4), "--budget", "3.5", "--from", str(analysis), "--out", str(plan_path)])
    assert rc == 0
    plan = KVPlan.load(plan_path)
    assert plan.sensitivity == "activation-norm"
    # the best plan within 3.5 bits for the norms in the analysis file the command was given
    sk, sv = norm_sensitivities(json.loads(analysis.read_text()))
    bits = [pyadaq.cache_type(t).bits_per_value for t in DEFAULT_TYPES]
    assert_best_plan(plan, rate_distortion_errors(sk, bits), rate_distortion_errors(sv, bits), list(DEFAULT_TYPES),
                     3.5, pyadaq.read_model_info(model4))
    capsys.readouterr()
    out_json = tmp_path / "e.json"
    rc = main(["eval", "--model", str(model4), "--text", str(text), "--ctx", "64", "--chunks", "2",
               "--threads", "1", "--configs", f"f16:f16,q8_0:kvq2,plan:{plan_path}", "--json", str(out_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"plan:{plan_path}"[:16] in printed
    res = json.loads(out_json.read_text())
    row = res["results"][2]
    assert row["per_layer"] and row["types_k"] == plan.types_k and row["bits_per_value"] == plan.bits_per_value
    assert row["kl_mean"] > 0


@pytest.mark.parametrize("args, message", [
    (["--budget", "1.0"], "outside what the types"),
    (["--budget", "3.0", "--types", "q8_0,kvq9"], "kvq9"),
    (["--budget", "3.0", "--from", "/nonexistent.json"], "cannot read"),
])
def test_plan_cli_bad_input(model4, capsys, args, message):
    rc = main(["plan", "--model", str(model4), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_plan_cli_from_another_model(model4, tiny_model, tmp_path, capsys):
    other = tiny_model(head_dim=64, n_layer=2)
    a = tmp_path / "a.json"
    assert main(["analyze", "--model", str(other), "--text", str(_write(tmp_path)), "--ctx", "64", "--chunks", "1",
                 "--threads", "1", "--json", str(a)]) == 0
    capsys.readouterr()
    rc = main(["plan", "--model", str(model4), "--budget", "3.0", "--from", str(a)])
    err = capsys.readouterr().err
    assert rc == 2 and "another model" in err


def test_eval_bad_plan_config(model4, tmp_path, capsys):
    rc = main(["eval", "--model", str(model4), "--configs", "budget:abc"])
    assert rc == 2 and "not a number" in capsys.readouterr().err
    rc = main(["eval", "--model", str(model4), "--configs", f"plan:{tmp_path / 'none.json'}"])
    assert rc == 2 and "none.json" in capsys.readouterr().err


def _write(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


def test_errors_from_calibration_subtract_the_floor():
    from pyadaq.plan.calibrate import calibration_floor, errors_from

    cal = {"kind": "pyadaq-calibration", "types": ["f16", "q8_0", "kvq2"],
           "errors_k": [[0.0, 0.007, 0.10], [0.0, 0.006, 0.50]],
           "errors_v": [[0.0, 0.008, 0.02], [0.0, None, None]]}
    assert calibration_floor(cal) == pytest.approx(0.007)  # median of 0.007, 0.006, 0.008
    ek, ev = errors_from(cal, ["kvq2", "f16"])  # columns follow the requested order
    assert np.allclose(ek, [[0.093, 0.0], [0.493, 0.0]])
    assert ev[0].tolist() == pytest.approx([0.013, 0.0])
    assert ev[1, 0] == float("inf")  # not measured (does not fit): forbidden
    with pytest.raises(ValueError, match="q4_0"):
        errors_from(cal, ["q4_0"])
    assert errors_from({"activations": {}}, ["q8_0"]) == (None, None)
