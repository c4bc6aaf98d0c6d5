"""`pyadaq plan`: give each layer's K and V a cache type so that the average bits per cached
value stay within a budget and the predicted error is least."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    from pyadaq.plan.calibrate import CALIBRATED_TYPES, DEFAULT_TYPES

    p = sub.add_parser("plan", help="per-layer K/V cache types for a bit budget", description=__doc__)
    p.add_argument("--model", help="GGUF model (default: the embedded Gemma 3 270M)")
    p.add_argument("--budget", required=True,
                   help="average bits per cached value, scales included (q4_0/q4_0 is 4.5); K/V for one budget "
                        "per side, each a number or a type (q8_0/2.5: keys q8_0, values 2.5 bits on average)")
    p.add_argument("--from", dest="source_file",
                   help="a `pyadaq analyze --json` file (norm-based sensitivities) or a calibration "
                        "JSON (--save-calibration); default: measure (see --sensitivity)")
    p.add_argument("--sensitivity", choices=("kl", "norms", "spectra"), default="kl",
                   help="kl: calibrate (quantize one layer's K or V at a time, measure KL vs f16; "
                        "cached); norms: the activation norms of `pyadaq analyze`; spectra: the errors "
                        "a KV calibration's spectra predict, no run (needs --kv-calibration) (default kl)")
    p.add_argument("--kv-calibration", metavar="FILE",
                   help="plan for contexts run with this KV calibration (`pyadaq calibrate`; 'default': the "
                        "model's default one, made once and cached): kl measures with its transforms and the "
                        "types include the transform-coded kvt*s; run the plan with the same --kv-calibration")
    p.add_argument("--types", help=f"candidate cache types (default {','.join(DEFAULT_TYPES)}; with "
                                   f"--kv-calibration and a kl or spectra source {','.join(CALIBRATED_TYPES)})")
    p.add_argument("--method", choices=("dp", "greedy"), default="dp",
                   help="dp: exact optimum of the error model; greedy: the paper's greedy (default dp)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per calibration chunk")
    p.add_argument("--chunks", type=int, default=2, help="calibration chunks")
    p.add_argument("--threads", type=int)
    p.add_argument("--save-calibration", help="also write the sensitivities used (JSON)")
    p.add_argument("--out", default="plan.json", help="plan file to write (default plan.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pyadaq.cli._common import model_and_text
    from pyadaq.plan.calibrate import (
        cached_analysis,
        calibrate,
        check_budget_range,
        default_types,
        kv_calibration_for,
        plan_for_budget,
    )
    from pyadaq.plan.planner import Budget
    from pyadaq.runtime.kv_transform import require_calibration
    from pyadaq.types import cache_type

    args.budget = Budget.parse(args.budget)
    model, info, _ = model_and_text(args.model, getattr(args, "text", None))
    if args.sensitivity == "spectra" and not args.kv_calibration:
        raise ValueError("--sensitivity spectra predicts errors from a KV calibration: give --kv-calibration FILE "
                         "(or 'default')")
    names = args.types.split(",") if args.types is not None else default_types(args.sensitivity, args.kv_calibration)
    types = [cache_type(t.strip()).name for t in names if t.strip()]
    if not types:
        raise ValueError("--types is empty")
    check_budget_range(info, args.budget, types)
    if not args.kv_calibration:
        require_calibration(types, None)
    kv_cal = kv_calibration_for(model, info, args.kv_calibration)
    source_result = None
    if args.source_file:
        try:
            source_result = json.loads(Path(args.source_file).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {args.source_file}: {e}") from None
        if not isinstance(source_result, dict) or not (
                source_result.get("kind") == "pyadaq-calibration" or "activations" in source_result):
            raise ValueError(f"{args.source_file} is neither a `pyadaq analyze --json` file nor a calibration")
        sha = source_result.get("settings", {}).get("model_sha256")
        if sha and sha != info.sha256:
            raise ValueError(f"{args.source_file} was measured on another model file (sha256 {sha[:12]}…, "
                             f"this one is {info.sha256[:12]}…)")
    elif args.sensitivity == "kl":
        from pyadaq.cli._common import announce_calibration

        faster = (f"`pyadaq plan --budget {args.budget.label} --sensitivity norms` (sensitivities from the activation "
                  "norms, no calibration)" if kv_cal is None else
                  f"`pyadaq plan --budget {args.budget.label} --sensitivity spectra --kv-calibration "
                  f"{args.kv_calibration}` (errors the calibration's spectra predict, no run)")
        announce_calibration("plan", model, types, args.ctx, args.chunks, args.threads, faster=faster,
                             faster_passes=max(args.chunks, 2) if kv_cal is None else 0, kv_calibration=kv_cal)
        source_result = calibrate(model, types, None, args.ctx, args.chunks, args.threads, kv_calibration=kv_cal)
    elif args.sensitivity == "norms":
        source_result = cached_analysis(model, None, args.ctx, max(args.chunks, 2), args.threads, True, True)
    plan = plan_for_budget(model, args.budget, types=types, source=args.sensitivity, source_result=source_result,
                           method=args.method, kv_calibration=kv_cal)
    if args.save_calibration and source_result is None:
        print(f"nothing written to {args.save_calibration}: the spectra source measures nothing")
    elif args.save_calibration:
        Path(args.save_calibration).write_text(json.dumps(source_result, indent=1))
    plan.save(args.out)
    print_plan(plan)
    print(f"wrote {args.out}")
    if kv_cal is not None:
        print(f"run it with --kv-calibration {kv_cal.path or args.kv_calibration} (the plan is for its coordinates)")
    return 0


def print_plan(plan) -> None:
    budget = plan.notes.get("budget_k_v", plan.budget)
    print(f"\nplan for {plan.model_name}: {plan.bits_per_value:.3f} bits per value (budget {budget}), "
          f"{plan.bytes_per_token} bytes per token, sensitivities: {plan.sensitivity}, method {plan.method}")
    print(f"{'layer':>5}  {'K':<6} {'V':<6}")
    for il, (k, v) in enumerate(zip(plan.types_k, plan.types_v)):
        print(f"{il:>5}  {k:<6} {v:<6}")
