"""The adaptive section of RESULTS.md (`pyadaq results --adaptive`): norm analysis, calibration,
and planned per-layer allocations at several budgets against the uniform K/V pairs of the
matrix (same text, context and chunks, so the figures compare directly)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pyadaq.cli._common import DEFAULT_OUT

SOURCES = (("kl", "calibrated KL"), ("norms", "activation norms"))
ANALYSIS_CHUNKS = 4
CALIBRATION_CTX, CALIBRATION_CHUNKS = 512, 2


def work(info, budgets: list, n_chunks: int) -> tuple:
    """(what measure() computes, its forward passes) for the announcement, the plans evaluated on
    n_chunks chunks; the calibration counts only when it is not cached."""
    from pyadaq.cli._common import calibration_work, counted
    from pyadaq.plan.calibrate import DEFAULT_TYPES

    runs, cal_passes = calibration_work(info, DEFAULT_TYPES, CALIBRATION_CTX, CALIBRATION_CHUNKS)
    n_plans = len(SOURCES) * len(budgets)
    what = (f"the adaptive section (norm analysis on {counted(ANALYSIS_CHUNKS, 'chunk')}"
            + (f", calibration: {counted(runs, 'run')} on {counted(CALIBRATION_CHUNKS, 'chunk')}"
               if runs else "")
            + f", {counted(n_plans, 'planned allocation')} on {counted(n_chunks, 'chunk')})")
    return what, ANALYSIS_CHUNKS + cal_passes + n_plans * n_chunks


def measure(res: dict, budgets: list, json_out: Path, out_dir: Path) -> dict:
    """Measure the adaptive section for the matrix run `res`; its figures go to json_out, the
    analysis and its plots to out_dir."""
    from pyadaq.eval.analyze import analyze
    from pyadaq.eval.kl import compare
    from pyadaq.plan.calibrate import DEFAULT_TYPES, calibrate, plan_for_budget
    from pyadaq.report.machine import machine
    from pyadaq.report.plots import plot_norms, plot_spectra
    from pyadaq.runtime.kvconfig import LayerConfig

    s = res["settings"]
    model = s["model"]
    t0 = time.time()
    analysis = analyze(model, n_chunks=ANALYSIS_CHUNKS)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "analysis.json").write_text(json.dumps(_rounded(analysis), separators=(",", ":")))
    plot_norms(analysis, out_dir / "analysis-norms.png")
    plot_spectra(analysis, out_dir / "analysis-spectra.png")
    t_analysis = time.time() - t0
    t1 = time.time()
    calibration = calibrate(model, DEFAULT_TYPES, n_ctx=CALIBRATION_CTX, n_chunks=CALIBRATION_CHUNKS)
    t_cal = time.time() - t1
    plans, configs = [], []
    for b in budgets:
        for source, _ in SOURCES:
            src = calibration if source == "kl" else analysis
            plan = plan_for_budget(model, b, types=DEFAULT_TYPES, source_result=src)
            greedy = plan_for_budget(model, b, types=DEFAULT_TYPES, source_result=src, method="greedy")
            label = f"budget:{b:g}:{source}"
            plans.append({"budget": b, "source": source, "label": label, "types_k": plan.types_k,
                          "types_v": plan.types_v, "bits_per_value": plan.bits_per_value,
                          "bytes_per_token": plan.bytes_per_token, "predicted": plan.predicted_error,
                          "greedy_predicted": greedy.predicted_error,
                          "greedy_same": greedy.types_k == plan.types_k and greedy.types_v == plan.types_v})
            configs.append(LayerConfig(label, tuple(plan.types_k), tuple(plan.types_v), float(plan.bits_per_value)))
    t2 = time.time()
    ev = compare(model, configs, n_ctx=s["ctx"], n_chunks=res["chunks"], attn_rot=s["attn_rot"], store=True)
    by = {r["config"]: r for r in ev["results"]}
    for p in plans:
        p["result"] = by[p["label"]]
    out = {
        "settings": {"model": model, "model_sha256": s["model_sha256"], "ctx": s["ctx"], "chunks": res["chunks"],
                     "machine": machine(), "seconds_analysis": t_analysis, "seconds_calibration": t_cal,
                     "calibration_cached": calibration["settings"].get("seconds", 0) > t_cal + 1,
                     "seconds_eval": time.time() - t2, "calibration": calibration["settings"],
                     "analysis": {k: analysis["settings"][k] for k in ("n_ctx", "chunks")},
                     "types": list(DEFAULT_TYPES)},
        "verdict": analysis["verdict"],
        "calibration": {k: calibration[k] for k in ("kind", "types", "errors_k", "errors_v")},
        "plans": plans,
    }
    Path(json_out).write_text(json.dumps(out, indent=1))
    return out


def _rounded(x, digits: int = 5):
    """x with floats to `digits` significant digits (the spectra make the JSON large)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    return x


def _uniform(res: dict) -> list:
    return [r for r in res["results"] if not r.get("per_layer")]


def _in_sample(cal: dict, res: dict) -> str:
    """How much of the evaluation text the calibration read, from both runs' settings."""
    s = res["settings"]
    if cal.get("text_sha256") != s.get("text_sha256"):
        return "The calibration read another text, so none of the evaluation text is in-sample for it."
    share = min(1.0, cal["chunks"] * cal["n_ctx"] / (res["chunks"] * s["ctx"]))
    return (f"The calibration reads the first {cal['chunks']} chunks of {cal['n_ctx']} tokens of the same text, "
            f"so {share:.0%} of the evaluation text is in-sample for it.")


def _combination(ad: dict, res: dict) -> list:
    """How the calibration's per-item errors add up, checked against the uniform pairs of the
    matrix: markdown lines, every figure from this run's calibration and matrix."""
    from pyadaq.plan.calibrate import calibration_floor, errors_from
    from pyadaq.report.markdown import MATRIX, kv_grid

    cal = ad.get("calibration")
    if cal is None:
        return [("(This run's figures do not include the calibration's per-item errors; "
                "`pyadaq results --adaptive` records them.)"), ""]
    types = [t for t in MATRIX if t in cal["types"]]
    floor = calibration_floor(cal)
    ek, ev = errors_from(cal, types)
    uni = {(r["k"], r["v"]): r for r in _uniform(res)}
    by = {}
    for (k, v), r in uni.items():
        if k not in types or v not in types or k == v == "f16":
            continue
        predicted = floor + ek[:, types.index(k)].sum() + ev[:, types.index(v)].sum()
        if np.isfinite(predicted) and r["kl_mean"] > 0:
            by[(k, v)] = {"error": predicted / r["kl_mean"] - 1, "pair": f"{k}/{v}"}
    lossy = [j for j, t in enumerate(cal["types"]) if t != "f16"]
    n_items = sum(any(r[j] is not None for j in lossy) for r in cal["errors_k"] + cal["errors_v"])
    text = (f"How the measured errors are combined: the planner minimizes the sum of the items' excesses over "
            f"a floor, the median over the {n_items} items (one layer's K or V) of their least lossy error "
            f"(`pyadaq.plan.calibrate.calibration_floor`): {floor:.4f} nats in this calibration")
    if ("q8_0", "q8_0") in uni:
        text += f"; all {n_items} items in q8_0 (uniform q8_0/q8_0) cost {uni[('q8_0', 'q8_0')]['kl_mean']:.4f}"
    lines = [text + ". Floor + summed excesses against the measured KL of the uniform pairs (relative error "
                    "of the prediction; – : not predicted):"]
    lines += ["", *kv_grid(by, "error", "{:+.0%}"), ""]
    if by:
        lo, hi = min(by.values(), key=lambda d: d["error"]), max(by.values(), key=lambda d: d["error"])
        lines += [(f"The prediction ranges from {lo['error']:+.0%} ({lo['pair']}) to {hi['error']:+.0%} "
                  f"({hi['pair']}) of the measured KL."), ""]
    return lines


def render_adaptive(ad: dict, res: dict, out_dir: str = DEFAULT_OUT) -> str:
    """The adaptive section of RESULTS.md (written in out_dir) from measure()'s figures `ad` and the
    matrix run `res`; every figure in the text comes from them."""
    s = ad["settings"]
    cal = s["calibration"]
    analysis = s.get("analysis")
    read = (f"while it reads {analysis['chunks']} chunks of {analysis['n_ctx']} tokens" if analysis else
            "while it reads the text")
    types = ", ".join(s["types"]) if s.get("types") else "the candidate types"
    out = [
        "## Adaptive allocation (KV-AdaQuant)",
        "",
        "### Norms of keys and values",
        "",
        (f"`pyadaq analyze` on `{Path(s['model']).name}` (keys and values captured before the cache {read}): "
        f"**{ad['verdict']['text']}.**"),
        "",
        "![K and V norms per layer](analysis-norms.png)",
        "",
        "![singular values of K and V per layer](analysis-spectra.png)",
        "",
        "### Planned allocations against uniform pairs",
        "",
        (f"`pyadaq plan` gives each layer's K and V one of {types} so that the average bits "
        f"per cached value (scales included) stay within the budget and the predicted error is least (exact "
        f"dynamic programme over the error model; the paper's greedy reaches the same predicted error unless "
        f"a plan's line below says otherwise). Sensitivities: *calibrated KL* quantizes one layer's K or V at a "
        f"time ({cal['runs']} runs on {cal['chunks']} chunks of {cal['n_ctx']} tokens, {cal['seconds']:.0f} s) "
        f"and adds the measured KL divergences; *activation norms* use the per-token Frobenius norms above in "
        f"the rate-distortion model error = norm² · 2^(−2·bits). Every row below is measured the same way as "
        f"the matrix: {s['chunks']} chunks of {s['ctx']} tokens, KL against the f16 cache. {_in_sample(cal, res)}"),
        "",
        *_combination(ad, res),
    ]
    uni = _uniform(res)
    for b in sorted({p["budget"] for p in ad["plans"]}):
        plans = [p for p in ad["plans"] if p["budget"] == b]
        out += [f"#### Budget {b:g} bits per value", "",
                "| configuration | bits/value | KL mean | ± se | PPL | top-1 |", "|---|---:|---:|---:|---:|---:|"]
        for p in plans:
            r = p["result"]
            name = f"plan ({dict(SOURCES)[p['source']]})"
            out.append(f"| **{name}** | {p['bits_per_value']:.3f} | **{r['kl_mean']:.4f}** | {r['kl_stderr']:.4f} | "
                       f"{r['ppl']:.3f} | {r['top1']:.1%} |")
        lo = min(p["bits_per_value"] for p in plans)
        near = sorted([r for r in uni if lo - 1e-9 <= r["bits_per_value"] <= b + 2.0],
                      key=lambda r: (r["bits_per_value"], r["kl_mean"]))
        for r in near:
            out.append(f"| uniform {r['k']}/{r['v']} | {r['bits_per_value']:.2f} | {r['kl_mean']:.4f} | "
                       f"{r['kl_stderr']:.4f} | {r['ppl']:.3f} | {r['top1']:.1%} |")
        out.append("")
        best = min(plans, key=lambda p: p["result"]["kl_mean"])
        kl = best["result"]["kl_mean"]
        equal = [r for r in uni if abs(r["bits_per_value"] - b) < 1e-9]
        larger = [r for r in uni if r["bits_per_value"] >= best["bits_per_value"] - 1e-9]
        beaten_by = sorted([r for r in larger if r["kl_mean"] < kl], key=lambda r: r["bits_per_value"])
        if equal:
            best_eq = min(equal, key=lambda r: r["kl_mean"])
            verdict = (f"the best plan ({dict(SOURCES)[best['source']]}) has "
                       f"{best_eq['kl_mean'] / kl:.1f}× less KL than "
                       f"the best uniform pair of the same size ({best_eq['k']}/{best_eq['v']})"
                       if kl < best_eq["kl_mean"] else
                       f"the best plan does **not** beat the uniform {best_eq['k']}/{best_eq['v']} of the same size: "
                       f"{kl / best_eq['kl_mean']:.2f}× its KL")
        else:
            verdict = "no uniform pair has exactly this size"
        smallest = (f"the smallest uniform pair with less KL is {beaten_by[0]['k']}/{beaten_by[0]['v']} at "
                    f"{beaten_by[0]['bits_per_value']:.2f} bits per value" if beaten_by else
                    "no uniform pair of this size or larger has less KL")
        others = []
        if equal:
            for p in plans:
                if p is not best and p["result"]["kl_mean"] >= best_eq["kl_mean"]:
                    others.append(f" The plan from {dict(SOURCES)[p['source']]} does not beat it "
                                  f"({p['result']['kl_mean']:.4f} against {best_eq['kl_mean']:.4f}).")
        out += [f"At {b:g} bits: {verdict}; {smallest}.{''.join(others)}", ""]
        for p in plans:
            out.append(f"- plan ({dict(SOURCES)[p['source']]}): K {' '.join(p['types_k'])}; "
                       f"V {' '.join(p['types_v'])}" + ("" if p["greedy_same"] else
                       f" (greedy: predicted error {p['greedy_predicted']:.4g} against {p['predicted']:.4g})"))
        out.append("")
    out += [(f"Rerun: `pyadaq results --adaptive --out {out_dir}` (analysis {s['seconds_analysis']:.0f} s, "
            f"calibration {s['seconds_calibration']:.0f} s{' (cached)' if s.get('calibration_cached') else ''}, "
            f"plans evaluated in {s['seconds_eval']:.0f} s of wall time on {s['machine']})."), ""]
    return "\n".join(out)
