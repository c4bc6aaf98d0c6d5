"""Answers people see: 30 short factual questions answered greedily in the plain "User: /
Assistant:" transcript of `pyadaq chat` (for models without a chat template, like the embedded
one), with an f16 cache and with each K:V config, and how many answers match f16's.

    python scripts/factual.py [--model M] [--configs q8_0:kvq2,kvt4s:kvq2+cal] [--json OUT]

A match is the same answer once case, spacing and punctuation are set aside, over the first
--max-tokens tokens (default 32). Each answer is also checked for the expected word (``right``),
so a config that changes a wrong f16 answer into a right one shows as such. Configs are
``pyadaq eval`` specs (plans and budgets too); ``+cal`` runs with the model's default KV calibration (made once and
cached) or --kv-calibration FILE.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

QUESTIONS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of Canada?", "ottawa"),
    ("What is the capital of Egypt?", "cairo"),
    ("What is the largest planet in the solar system?", "jupiter"),
    ("Which planet is known as the Red Planet?", "mars"),
    ("What is the chemical symbol for gold?", "au"),
    ("What is the chemical symbol for water?", "h2o"),
    ("How many days are there in a week?", "seven|7"),
    ("How many legs does a spider have?", "eight|8"),
    ("How many continents are there on Earth?", "seven|7"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("Who wrote the play Romeo and Juliet?", "shakespeare"),
    ("Who painted the Mona Lisa?", "leonardo|da vinci"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("What gas do plants absorb from the air?", "carbon dioxide|co2"),
    ("What is the freezing point of water in degrees Fahrenheit?", "32"),
    ("What is the square root of 81?", "nine|9"),
    ("What is 12 times 12?", "144"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What language is spoken in Brazil?", "portuguese"),
    ("What is the tallest mountain in the world?", "everest"),
    ("What is the longest river in Africa?", "nile"),
    ("In which country are the pyramids of Giza?", "egypt"),
    ("What is the hardest natural substance?", "diamond"),
    ("What is the main language spoken in Mexico?", "spanish"),
    ("What is the smallest prime number?", "two|2"),
]


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answers(model: str, cfg, calibration, max_tokens: int) -> list[str]:
    import pyadaq
    from pyadaq.runtime.kvconfig import Calibrated, LayerConfig, Windowed
    from pyadaq.runtime.kvplan import make_plan

    kw: dict = {"n_ctx": 512, "verbose": False}
    if isinstance(cfg, Windowed):
        kw["kv_window"] = cfg.cells
        cfg = cfg.base
    if isinstance(cfg, Calibrated):
        kw["kv_calibration"] = cfg.calibration
        cfg = cfg.base
    if isinstance(cfg, LayerConfig):  # a plan (plan:FILE, budget:B): its types per layer
        info = pyadaq.read_model_info(model)
        kw["kv_plan"] = make_plan(info, info.sha256, cfg.types_k, cfg.types_v)
    else:
        kw.update(cache_type_k=cfg[0], cache_type_v=cfg[1])
    llm = pyadaq.Llama(model, **kw)
    try:
        out = []
        for q, _ in QUESTIONS:
            # the transcript `pyadaq chat` gives a model without a chat template (the embedded one)
            r = llm(f"User: {q}\nAssistant:", max_tokens=max_tokens, temperature=0.0,
                    stop=["\nUser:", "User:", "\nAssistant:"])
            out.append(r["choices"][0]["text"].strip())
            llm.reset()
        return out
    finally:
        llm.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--configs", default="q8_0:kvq2,q4_0:kvq2,kvt4s:kvq2+cal,kvt4s:q4_0+cal")
    ap.add_argument("--kv-calibration", metavar="FILE")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from pyadaq.model.embedded import embedded_model_path
    from pyadaq.plan.spec import parse_configs, resolve_configs
    from pyadaq.report.machine import machine
    from pyadaq.runtime.kvconfig import config_label

    model = args.model or str(embedded_model_path())
    configs = resolve_configs(parse_configs(args.configs), model, calibration=args.kv_calibration)
    t0 = time.time()
    ref = answers(model, ("f16", "f16"), None, args.max_tokens)
    rows = []
    for cfg in tqdm(configs, desc="configs"):
        got = answers(model, cfg, None, args.max_tokens)
        match = [normalize(a) == normalize(b) for a, b in zip(ref, got)]
        right = [bool(re.search(rf"\b({w})\b", normalize(a))) for a, (_, w) in zip(got, QUESTIONS)]
        rows.append({"config": config_label(cfg), "matches": sum(match), "right": sum(right),
                     "answers": got, "match": match})
    ref_right = sum(bool(re.search(rf"\b({w})\b", normalize(a))) for a, (_, w) in zip(ref, QUESTIONS))
    res = {"model": model, "max_tokens": args.max_tokens, "questions": [q for q, _ in QUESTIONS],
           "f16": {"answers": ref, "right": ref_right}, "results": rows, "machine": machine(),
           "seconds": time.time() - t0}
    print(f"{len(QUESTIONS)} questions, greedy, {args.max_tokens} tokens at most; f16 right {ref_right}")
    for r in rows:
        print(f"{r['config']:<24} same answer as f16 {r['matches']:>2}/{len(QUESTIONS)}   right {r['right']:>2}")
        for q, a, b, m in zip(res["questions"], ref, r["answers"], r["match"]):
            if not m:
                print(f"    {q}\n      f16: {a!r}\n      got: {b!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
