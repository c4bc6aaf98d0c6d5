#!/usr/bin/env python3
"""KL divergence on short chat exchanges, the kind of text a calibration made on prose has not
seen: for each question, the model's greedy answer with an f16 cache (in the plain "User: /
Assistant:" transcript of `pyadaq chat`), then, for each K:V config, the next-token
distribution at every position of that transcript (teacher-forced: the same tokens for every
config) against f16's: KL mean ± standard error over tokens, and top-1 agreement.

    python scripts/chat_kl.py [--model M] [--configs q8_0:kvq2,q8_0:kvt2+cal] [--set general|factual]
                              [--kv-calibration FILE] [--json OUT]

--set general (default): 30 general-knowledge questions that scripts/factual.py does not ask
(the set on which half-whitened values were tried, pyadaq/runtime/kv_transform.py); --set factual:
the questions of scripts/factual.py. Configs are `pyadaq eval` specs (+cal: the model's default
KV calibration, or --kv-calibration FILE). --values-whitening A: the values' kvt profiles scale
each component by sd ** A instead of whitening it fully (pyadaq.runtime.kv_transform.WHITENING):
the comparison of docs/CALIBRATION.md, "Values on other text".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GENERAL = [
    "Who was the first person to walk on the Moon?", "What is the capital of Australia?",
    "How many sides does a hexagon have?", "What is the largest mammal?",
    "Which metal is liquid at room temperature?", "What is the currency of the United Kingdom?",
    "Who discovered penicillin?", "What is the closest star to Earth?", "How many hours are in a day?",
    "What organ pumps blood through the body?", "Which country has the largest population?",
    "What is the capital of Russia?", "What color do you get by mixing blue and yellow?",
    "How many strings does a violin have?", "Who invented the telephone?", "What is the largest desert in the world?",
    "What is the main ingredient of guacamole?", "Which bird is a symbol of peace?", "What is the capital of Kenya?",
    "How many minutes are in an hour?", "What instrument has 88 keys?", "Which planet has the most moons?",
    "What do bees make?", "What is the capital of Argentina?", "What is the opposite of hot?",
    "Which ocean lies between Africa and Australia?", "What is frozen water called?",
    "Who wrote Pride and Prejudice?", "What is the fastest land animal?", "How many players are on a soccer team?",
]


def _llama(model: str, cfg):
    import pyadaq
    from pyadaq.runtime.kvconfig import Calibrated, LayerConfig, Windowed

    kw: dict = {"n_ctx": 512, "verbose": False, "logits_all": True}
    if isinstance(cfg, Windowed):
        kw["kv_window"] = cfg.cells
        cfg = cfg.base
    if isinstance(cfg, Calibrated):
        kw["kv_calibration"] = cfg.calibration
        cfg = cfg.base
    if isinstance(cfg, LayerConfig):
        raise SystemExit("plans are not supported here: give K:V pairs")
    return pyadaq.Llama(model, cache_type_k=cfg[0], cache_type_v=cfg[1], **kw)


def _scores(llm, tokens) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--configs", default="q8_0:q8_0,q8_0:kvq2,q8_0:kvq3,q8_0:kvt2+cal,q8_0:kvt3+cal,kvt4s:kvt2+cal")
    ap.add_argument("--set", choices=("general", "factual"), default="general")
    ap.add_argument("--kv-calibration", metavar="FILE")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens of each f16 answer (default 16)")
    ap.add_argument("--values-whitening", type=float, metavar="A",
                    help="the values' kvt profiles scale by sd ** A (default: kv_transform.WHITENING)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.values_whitening is not None:
        from pyadaq.runtime import kv_transform

        kv_transform.WHITENING.update(dict.fromkeys(("kvt2", "kvt3", "kvt4"), args.values_whitening))

    from tqdm import tqdm

    from pyadaq.eval.metrics import token_kl
    from pyadaq.model.embedded import embedded_model_path
    from pyadaq.plan.spec import parse_configs, resolve_configs
    from pyadaq.report.machine import machine
    from pyadaq.runtime.kvconfig import config_label

    if args.set == "general":
        questions = GENERAL
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from factual import QUESTIONS

        questions = [q for q, _ in QUESTIONS]
    model = args.model or str(embedded_model_path())
    configs = resolve_configs(parse_configs(args.configs), model, calibration=args.kv_calibration)
    ref = _llama(model, ("f16", "f16"))
    try:
        texts, refs = [], []
        for q in questions:
            prompt = f"User: {q}\nAssistant:"
            answer = ref(prompt, max_tokens=args.max_tokens, temperature=0.0)["choices"][0]["text"]
            toks = ref.tokenize((prompt + answer).encode())
            texts.append(toks)
            refs.append(_scores(ref, toks))
    finally:
        ref.close()
    rows = []
    for cfg in tqdm(configs, desc="configs"):
        llm = _llama(model, cfg)
        try:
            kls, top = [], []
            for toks, r in zip(texts, refs):
                g = _scores(llm, toks)
                kls.extend(token_kl(r[1:], g[1:]).tolist())  # after BOS
                top.extend((r.argmax(-1) == g.argmax(-1))[1:].tolist())
        finally:
            llm.close()
        kl = np.array(kls)
        rows.append({"config": config_label(cfg), "kl_mean": float(kl.mean()),
                     "kl_stderr": float(kl.std(ddof=1) / np.sqrt(len(kl))), "top1": float(np.mean(top)),
                     "tokens": len(kl)})
    print(f"{len(questions)} questions ({args.set}), f16 answers of {args.max_tokens} tokens, teacher-forced; "
          "KL against f16 per token")
    for r in rows:
        print(f"{r['config']:<20} KL {r['kl_mean']:.4f} ± {r['kl_stderr']:.4f}  top-1 {100 * r['top1']:.1f} %  "
              f"({r['tokens']} tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python scripts/chat_kl.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": model, "set": args.set, "values_whitening": args.values_whitening,
            "questions": questions, "machine": machine(), "results": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
