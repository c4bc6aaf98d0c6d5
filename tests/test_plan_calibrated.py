"""Plans for calibrated contexts (issue 12, item 4): the KL sensitivities measured with a KV
calibration's transforms, among the transform-coded types too; the errors a calibration's
spectra predict (pyadaq.plan.spectra) against the formats themselves on Gaussian data of that
spectrum; pyadaq.Llama(kv_budget=) with a calibration (its own, the default one, or none);
`pyadaq plan --kv-calibration`; and their bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_planner import assert_best_plan

import pyadaq
from pyadaq.cli import main
from pyadaq.eval.calibration import calibrate as calibrate_kv
from pyadaq.model.calibration import CalibrationMismatchError, write_calibration
from pyadaq.plan.calibrate import CALIBRATED_TYPES, calibrate, errors_from, plan_for_budget
from pyadaq.plan.spectra import position_errors, predicted_errors, unit_error
from pyadaq.runtime.kv_transform import hadamard, matrix_and_scale, part_components
from pyadaq.runtime.layer_types import context_transform_layers
from pyadaq.types import cache_type

TEXT = " ".join(f"Sentence number {i} talks about the weather, the sea and the {i % 7} ships." for i in range(300))
TYPES = ["f16", "q8_0", "kvt4s", "q4_0", "kvt2s", "kvq2"]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """(model path, its KV calibration, that calibration's file)."""
    path = tiny_model(arch="llama", head_dim=64, n_head=4, n_head_kv=2, n_layer=3)
    cal = calibrate_kv(path, TEXT, n_ctx=256, n_chunks=2, n_threads=2, progress=False)
    f = write_calibration(cal, tmp_path_factory.mktemp("cal") / "cal.gguf")
    return path, dataclasses.replace(cal, path=f), f


def test_unit_errors_order_the_types():
    """On unit Gaussians: more bits, less error; a transform-coded type's error follows its bit
    profile (its 7-bit positions far below its 0-bit one, which loses the whole variance)."""
    assert unit_error(cache_type("f16").id) == 0.0
    e = [unit_error(cache_type(t).id) for t in ("q8_0", "q4_0", "kvq3", "kvq2")]
    assert e == sorted(e) and e[0] < 1e-3 and 0.05 < e[-1] < 0.2
    prof = position_errors(cache_type("kvt1").id)  # widths 4,2,2,1,1,1,0,0 in groups of 8
    group = prof.reshape(8, 8).mean(axis=1)
    assert group[0] < group[1] < group[3] < group[6]
    assert 0.8 < group[6] < 1.2 and 0.8 < group[7] < 1.2  # 0 bits: the value is read back as 0
    # the mean over the block is the type's unit error
    assert prof.mean() == pytest.approx(unit_error(cache_type("kvt1").id), rel=1e-9)


@pytest.mark.parametrize("name", ["q4_0", "kvq2", "kvt4s", "kvt2s"])
def test_predicted_error_matches_the_format(setup, name):
    """The spectra's prediction for a layer equals the squared error the format itself gives to
    Gaussian data with that layer's spectrum, stored in the coordinates a calibrated context uses
    (x M / s through the real quantizer and back; values in a uniform type: llama.cpp's
    rotation), within 8 %."""
    _, cal, _ = setup
    t = cache_type(name)
    ek, ev = predicted_errors(cal, [t])
    rng = np.random.default_rng(3)
    for is_v, pred in ((False, ek), (True, ev)):
        comps = part_components(cal, 1, is_v)
        d = comps.head_size
        if t.calibrated or not is_v:
            matrix, scale = matrix_and_scale(comps, t)
        else:
            matrix, scale = np.stack([hadamard(d)] * comps.n_head), None
        total = 0.0
        for h in range(comps.n_head):
            x = (rng.standard_normal((4096, d)) * np.sqrt(comps.var[h])) @ comps.basis[h].T
            s = 1.0 if scale is None else scale[h]
            stored = (x @ matrix[h]) / s
            back = pyadaq.native().roundtrip(t.id, stored).reshape(stored.shape)
            total += float((((back - stored) * s) ** 2).sum(axis=1).mean())  # M is orthonormal
        assert total == pytest.approx(float(pred[1, 0]), rel=0.08), (name, is_v)


def test_kl_calibration_runs_with_the_transforms(setup, cache):
    """With a KV calibration the per-layer KL runs use its transforms: a kvt type costs more the
    fewer its bits, the figures differ from the uncalibrated ones, each is cached apart, and the
    plan made from them records the calibration; a transform-coded type without one is refused."""
    path, cal, _ = setup
    with pytest.raises(ValueError, match="needs one"):
        calibrate(path, TYPES, TEXT, n_ctx=64, n_chunks=1, n_threads=1, progress=False)
    plain = calibrate(path, ["f16", "q4_0"], TEXT, n_ctx=64, n_chunks=1, n_threads=1, progress=False)
    res = calibrate(path, TYPES, TEXT, n_ctx=64, n_chunks=1, n_threads=1, progress=False, kv_calibration=cal)
    assert res["settings"]["kv_calibration"] == cal.fingerprint
    col = {t: i for i, t in enumerate(res["types"])}
    for rows in (res["errors_k"], res["errors_v"]):
        for r in rows:
            assert r[col["f16"]] == 0.0
            assert 0.0 < r[col["kvt4s"]] < r[col["kvt2s"]]
    # q4_0 keys in principal coordinates with a Hadamard rotation, not llama.cpp's rotation
    assert [r[1] for r in plain["errors_k"]] != [r[col["q4_0"]] for r in res["errors_k"]]
    assert len(list((cache / "adaptive").glob("calibration-*.json"))) == 2
    info = pyadaq.read_model_info(path)
    ek, ev = errors_from(res, TYPES)
    plan = plan_for_budget(path, 3.5, types=TYPES, source_result=res, kv_calibration=cal)
    assert_best_plan(plan, ek, ev, TYPES, 3.5, info)
    assert plan.notes["kv_calibration"] == cal.fingerprint
    # figures measured without the calibration do not plan for it, nor the other way round
    with pytest.raises(ValueError, match="without a KV calibration"):
        plan_for_budget(path, 6.0, types=["f16", "q4_0"], source_result=plain, kv_calibration=cal)
    with pytest.raises(ValueError, match="with KV calibration"):
        plan_for_budget(path, 12.0, types=TYPES[:2], source_result=res)


def test_calibration_measures_only_the_types_it_has_not(setup, cache):
    """A calibration with more types measures only the new ones (2 runs per cache layer each)
    and keeps the figures it had; one with types it has measured runs nothing."""
    path, cal, _ = setup
    kw = {"n_ctx": 64, "n_chunks": 1, "n_threads": 1, "progress": False, "kv_calibration": cal}
    n = len(pyadaq.read_model_info(path).cache_layers())
    first = calibrate(path, ["f16", "kvt2"], TEXT, **kw)
    assert first["settings"]["runs"] == 2 * n
    more = calibrate(path, ["kvt1", "f16", "kvt2"], TEXT, **kw)
    assert more["types"] == ["kvt1", "f16", "kvt2"] and more["settings"]["runs"] == 4 * n
    for old, new in zip(first["errors_k"] + first["errors_v"], more["errors_k"] + more["errors_v"]):
        assert new[1:] == old  # kept, not measured again
    assert sum(r[0] for r in more["errors_v"]) > sum(r[2] for r in more["errors_v"]) > 0  # 1.5 bits cost more
    again = calibrate(path, ["kvt2", "kvt1"], TEXT, **kw)
    assert again["settings"]["runs"] == 4 * n and again["types"] == ["kvt2", "kvt1"]
    assert [r[1] for r in again["errors_v"]] == [r[0] for r in more["errors_v"]]
    files = list((cache / "adaptive").glob("calibration-*.json"))
    assert len(files) == 1
    # a damaged cache file (rows shorter than its types) is measured again, not trusted
    bad = json.loads(files[0].read_text())
    bad["errors_v"][0] = bad["errors_v"][0][:1]
    files[0].write_text(json.dumps(bad))
    assert calibrate(path, ["kvt2"], TEXT, **kw)["settings"]["runs"] == 2 * n


def test_spectra_plan_is_the_best_for_its_errors(setup):
    """The spectra source plans without a run: the least predicted error within each budget
    (brute force), more budget never more error, and the transform-coded key profiles win over
    uniform types of the same size on this model's keys."""
    path, cal, _ = setup
    info = pyadaq.read_model_info(path)
    types = list(CALIBRATED_TYPES)
    ek, ev = predicted_errors(cal, types)
    previous = float("inf")
    for budget in (2.5, 3.0, 4.5, 6.0):
        plan = plan_for_budget(path, budget, source="spectra", kv_calibration=cal)
        assert plan.sensitivity == "calibration-spectra" and plan.notes["kv_calibration"] == cal.fingerprint
        assert_best_plan(plan, ek, ev, types, budget, info)
        assert plan.predicted_error <= previous
        previous = plan.predicted_error
    col = {t: i for i, t in enumerate(types)}
    for il in cal.layers():
        assert ek[il, col["kvt4s"]] < ek[il, col["q4_0"]]
        assert ek[il, col["kvt2s"]] < ek[il, col["kvq2"]]
    with pytest.raises(ValueError, match="KV calibration"):
        plan_for_budget(path, 3.0, source="spectra")
    with pytest.raises(ValueError, match="needs one"):
        plan_for_budget(path, 3.0, types=["f16", "kvt2s"], source="norms")


def test_llama_budget_with_calibration(setup, cache):
    """kv_budget plans for and runs with the calibration given (the context stores its
    coordinates, the plan's types per layer); kv_calibration=False plans and runs without one."""
    path, cal, f = setup
    llm = pyadaq.Llama(str(path), kv_budget=3.0, kv_budget_source="spectra", kv_calibration=str(f), n_ctx=256,
                       n_threads=1)
    try:
        plan = llm.kv_plan
        assert plan.notes["kv_calibration"] == cal.fingerprint
        assert any(cache_type(t).calibrated for t in plan.types_k + plan.types_v)
        k, v = llm.context_layer_types()
        assert [t.name for t in k] == plan.types_k and [t.name for t in v] == plan.types_v
        assert context_transform_layers(llm.ctx) == len(cal.layers())
        out = llm("Sentence number 3 talks", max_tokens=4, temperature=0.0)
        assert out["choices"][0]["text"] is not None
    finally:
        llm.close()
    plain = pyadaq.Llama(str(path), kv_budget=4.0, kv_budget_source="norms", kv_calibration=False, n_ctx=256,
                         n_threads=1)
    try:
        assert "kv_calibration" not in plain.kv_plan.notes
        assert not any(cache_type(t).calibrated for t in plain.kv_plan.types_k + plain.kv_plan.types_v)
        assert context_transform_layers(plain.ctx) == 0
    finally:
        plain.close()
    # one budget per side: keys q8_0 everywhere, values 2 bits per value on average
    split = pyadaq.Llama(str(path), kv_budget="q8_0/2.0", kv_budget_source="spectra", kv_calibration=str(f),
                         n_ctx=256, n_threads=1)
    try:
        k, v = split.context_layer_types()
        assert {t.name for t in k} == {"q8_0"} and "kvt1" in {t.name for t in v}
        assert sum(t.bits_per_value for t in v) / len(v) <= 2.0
        assert split("Sentence number 3 talks", max_tokens=4, temperature=0.0)["choices"][0]["text"] is not None
    finally:
        split.close()
    for bad, err in (("q8_0/1.0", ValueError), ("q8_0/kvq9", ValueError), ([4.5], TypeError)):
        with pytest.raises(err):
            pyadaq.Llama(str(path), kv_budget=bad, kv_budget_source="spectra", kv_calibration=str(f), n_ctx=256)


def test_llama_budget_refuses_a_calibration_for_another_model(setup, tiny_model, tmp_path):
    path, _, _ = setup
    other = tiny_model(arch="llama", head_dim=64, n_head=4, n_head_kv=2, n_layer=2)
    wrong = write_calibration(calibrate_kv(other, TEXT, n_ctx=64, n_chunks=1, n_threads=1, progress=False),
                              tmp_path / "other.gguf")
    with pytest.raises(CalibrationMismatchError):
        pyadaq.Llama(str(path), kv_budget=3.0, kv_budget_source="spectra", kv_calibration=str(wrong), n_ctx=128)
    with pytest.raises(ValueError, match="outside what the types"):
        pyadaq.Llama(str(path), kv_budget=1.0, kv_calibration=str(wrong), n_ctx=128)


def test_plan_cli_with_calibration(setup, tmp_path, capsys):
    path, cal, f = setup
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(path), "--budget", "3.0", "--sensitivity", "spectra",
                 "--kv-calibration", str(f), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["notes"]["kv_calibration"] == cal.fingerprint
    assert f"--kv-calibration {f}" in capsys.readouterr().out
    # the plan runs with its calibration (and kvt types refuse to run without one)
    llm = pyadaq.Llama(str(path), kv_plan=str(out), kv_calibration=str(f), n_ctx=128, n_threads=1)
    llm.close()
    # one budget per side: keys q8_0, values 2.0 bits on average (kvt1 with kvt2 or more)
    assert main(["plan", "--model", str(path), "--budget", "q8_0/2.0", "--sensitivity", "spectra",
                 "--kv-calibration", str(f), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved["types_k"]) == {"q8_0"} and "kvt1" in saved["types_v"]
    assert saved["notes"]["budget_k_v"] == "q8_0/2" and "(budget q8_0/2)" in capsys.readouterr().out
    assert main(["plan", "--model", str(path), "--budget", "q8_0/1.0", "--sensitivity", "spectra",
                 "--kv-calibration", str(f), "--out", str(tmp_path / "x.json")]) != 0
    assert "the V side of budget q8_0/1 bits per value is outside" in capsys.readouterr().err
    assert main(["plan", "--model", str(path), "--budget", "3.0", "--sensitivity", "spectra",
                 "--out", str(tmp_path / "x.json")]) != 0
    assert "--kv-calibration" in capsys.readouterr().err
    assert main(["plan", "--model", str(path), "--budget", "3.0", "--types", "f16,kvt2s", "--sensitivity", "norms",
                 "--out", str(tmp_path / "x.json")]) != 0
    assert "needs one" in capsys.readouterr().err
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(f.read_bytes()[:200])
    assert main(["plan", "--model", str(path), "--budget", "3.0", "--sensitivity", "spectra",
                 "--kv-calibration", str(broken), "--out", str(tmp_path / "x.json")]) != 0
    assert "broken.gguf" in capsys.readouterr().err
