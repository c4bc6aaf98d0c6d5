"""The calibrated section of RESULTS.md (`pyadaq results --calibrated`): the K x V matrix of the
transform-coded types (kvt*, with the model's default calibration) on the same text, context and
chunks as the flat matrix, the paper's equal-budget comparison rerun with them, and each
calibrated pair against the flat pair of its size."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pyadaq.cli._common import DEFAULT_OUT

# rows (K) and columns (V) of the calibrated matrix: q8_0, then the steep key profiles and the
# value profiles at 4.5, 3.5 and 2.5 bits per value
K_TYPES = ["q8_0", "kvt4s", "kvt3s", "kvt2s"]
V_TYPES = ["q8_0", "kvt4", "kvt3", "kvt2"]
# the row-trellis values, added where every value head is a multiple of their rows of 256
ROW_V_TYPES = ["kvt3r", "kvt2r"]
# (calibrated pair, flat pair of the same size in the matrix run)
AGAINST_FLAT = ((("q8_0", "kvt2"), ("q8_0", "kvq2")), (("q8_0", "kvt3"), ("q8_0", "kvq3")),
                (("kvt2s", "q8_0"), ("kvq2", "q8_0")), (("kvt4s", "kvt2"), ("q4_0", "kvq2")),
                (("kvt4s", "kvt4"), ("q4_0", "q4_0")), (("kvt3s", "kvt2"), ("kvq3", "kvq2")),
                (("q8_0", "kvt2r"), ("q8_0", "kvq2")), (("q8_0", "kvt3r"), ("q8_0", "kvq3")),
                (("kvt4s", "kvt2r"), ("q4_0", "kvq2")), (("kvt3s", "kvt2r"), ("kvq3", "kvq2")))
# the paper's comparison: (more bits for keys, more bits for values), each pair at equal size
PAPER = ((("kvt4s", "kvt2"), ("kvt2s", "kvt4")), (("kvt4s", "kvt2r"), ("kvt2s", "kvt4")),
         (("q8_0", "kvt4"), ("kvt4s", "q8_0")), (("kvt3s", "kvt2"), ("kvt2s", "kvt3")))


def v_types(info) -> list[str]:
    """The matrix's value types for a model: V_TYPES, and ROW_V_TYPES where its value heads fit."""
    from pyadaq.runtime.llama import undivided_head_sizes

    rows = not any(undivided_head_sizes(info, t, "v") for t in ROW_V_TYPES)
    return V_TYPES + (ROW_V_TYPES if rows else [])


def configs(info) -> str:
    return ",".join(f"{k}:{v}+cal" for k in K_TYPES for v in v_types(info))


def work(info, n_chunks: int) -> tuple:
    """(what measure() computes, its forward passes) for the announcement; the default
    calibration, when it is not cached yet, is made first (a few minutes)."""
    from pyadaq.cli._common import counted

    n = len(K_TYPES) * len(v_types(info))
    return (f"the calibrated matrix ({n} configurations on {counted(n_chunks, 'chunk')}, with the model's "
            "default KV calibration, made first if it is not cached)"), n * n_chunks


def measure(res: dict, json_out: Path) -> dict:
    """Measure the calibrated matrix for the flat matrix run `res` (same model, text, context,
    chunks and rotation setting); its figures go to json_out."""
    from pyadaq.eval.calibration import _text_sha
    from pyadaq.eval.run import evaluate
    from pyadaq.eval.texts import calibration_text, default_text
    from pyadaq.model.header import read_model_info
    from pyadaq.plan.spec import parse_configs, resolve_configs

    s = res["settings"]
    model = s["model"]
    info = read_model_info(model)
    text = default_text()
    if s.get("text_sha256") and s["text_sha256"] != _text_sha(text):
        raise ValueError("the matrix run read another text than the default one; measure the calibrated matrix "
                         "with a matrix run of the default text")
    t0 = time.time()
    resolved = resolve_configs(parse_configs(configs(info)), model)
    t_cal = time.time() - t0
    cal = resolved[0].calibration
    out = evaluate(model, info, resolved, text=text, text_name=s["text"], ctx=s["ctx"], chunks=res["chunks"],
                   attn_rot=s["attn_rot"])
    out["calibration"] = {"path": str(cal.path), "fingerprint": cal.fingerprint, "text_sha256": cal.text_sha256,
                          "text_tokens": cal.text_tokens, "n_ctx": cal.n_ctx, "chunks": cal.chunks,
                          "created": cal.created, "seconds": t_cal,
                          # made from the held-out half (the default calibration text), not another text
                          "held_out": cal.text_sha256 == _text_sha(calibration_text())}
    Path(json_out).write_text(json.dumps(out, indent=1))
    return out


def _line(a: dict, b: dict) -> str:
    """a against b: KL, perplexity and top-1, and which has less KL by how much."""
    ratio = b["kl_mean"] / a["kl_mean"] if a["kl_mean"] > 0 else float("inf")
    return (f"KL {a['kl_mean']:.4f} ± {a['kl_stderr']:.4f} against {b['kl_mean']:.4f} ± {b['kl_stderr']:.4f}, "
            f"perplexity {a['ppl']:.3f} against {b['ppl']:.3f}, top-1 {a['top1']:.1%} against {b['top1']:.1%}: "
            + (f"{ratio:.1f} times less KL" if ratio >= 1 else f"{1 / ratio:.1f} times more KL"))


def render_calibrated(cr: dict, res: dict, out_dir: str = DEFAULT_OUT) -> str:
    """The calibrated section of RESULTS.md (written in out_dir) from measure()'s figures `cr` and
    the flat matrix run `res`; every figure in the text comes from them."""
    from pyadaq.report.markdown import kv_grid

    s, cal = cr["settings"], cr["calibration"]
    by = {(r["k"], r["v"]): r for r in cr["results"]}
    flat = {(r["k"], r["v"]): r for r in res["results"] if not r.get("per_layer")}
    present = {v for _, v in by}
    grid = {"ks": K_TYPES, "vs": [v for v in V_TYPES + ROW_V_TYPES if v in present]}
    out = [
        "## Calibrated transform coding (kvt types)",
        "",
        ("The kvt types store each layer's keys and values in a calibration's whitened principal coordinates "
         "with more bits for the leading components (docs/CALIBRATION.md). Every configuration below runs with "
         f"the model's default KV calibration (`pyadaq calibrate`: {cal['chunks']} chunks of {cal['n_ctx']} "
         f"tokens, {cal['text_tokens']} tokens of text, fingerprint `{cal['fingerprint'][:16]}…`), which "
         + ("reads only the second half of the text, as chat exchanges and prose "
            "(`pyadaq.eval.texts.calibration_text`); the evaluation reads chunks from the start of the first half, "
            "so none of the evaluated text is in-sample for it. "
            if cal.get("held_out") else "was made from another text than the default calibration text. ")
         + f"Measured the same way as the flat matrix: {cr['chunks']} chunks of {s['ctx']} tokens, KL against "
         f"the f16 cache; {s['machine']}, {s['date']}, {s['seconds_quality']:.0f} s of wall time."),
        "",
        (f"Rerun: `pyadaq results --from-json {Path(out_dir) / 'results-matrix.json'} --calibrated --out {out_dir}` "
         "(this section only; without --from-json the flat matrix is measured again too; the pass-key section "
         "is kept only with the same `--passkey-from` file that wrote it)."),
        "",
        "### Mean KL divergence against f16 (nats)",
        "", *kv_grid(by, "kl_mean", "{:.4f}", **grid), "",
        "### Top-1 agreement with f16",
        "", *kv_grid(by, "top1", "{:.1%}", **grid), "",
        "### Bits per cached value",
        "", *kv_grid(by, "bits_per_value", "{:.2f}", **grid), "",
        "### The paper's comparison with the calibrated types", "",
    ]
    for hi, lo in PAPER:
        a, b = by.get(hi), by.get(lo)
        if a and b:
            out.append(f"- K={hi[0]} with V={hi[1]} against K={lo[0]} with V={lo[1]} (both "
                       f"{a['bits_per_value']:.2f} bits per value): {_line(a, b)}.")
    out += ["", "### Against the flat types of the same size", ""]
    for c, f in AGAINST_FLAT:
        a, b = by.get(c), flat.get(f)
        if a and b and abs(a["bits_per_value"] - b["bits_per_value"]) < 1e-9:
            out.append(f"- {c[0]}:{c[1]} (calibrated) against {f[0]}:{f[1]} ({a['bits_per_value']:.2f} bits per "
                       f"value): {_line(a, b)}.")
    out.append("")
    return "\n".join(out)
