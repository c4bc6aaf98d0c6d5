"""Quality metrics of a quantized KV cache against an f16 reference, computed from logits.

They follow llama.cpp's perplexity tool: per scored token, the KL divergence
KL(p_ref || p) over the whole vocabulary, whether the top-1 tokens agree, and the
probability of the correct next token under both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(ref || test) per row, in nats."""
    lp_ref = log_softmax(ref_logits)
    lp = log_softmax(logits)
    return np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=-1)


@dataclass
class Accumulator:
    """Running sums over scored tokens for one config."""

    nll: list = field(default_factory=list)  # -log p(correct) of the test config
    kl: list = field(default_factory=list)
    top1: list = field(default_factory=list)
    dp: list = field(default_factory=list)  # p_test(correct) - p_ref(correct)

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, next_tokens: np.ndarray) -> None:
        lp_ref = log_softmax(ref_logits)
        lp = log_softmax(logits)
        rows = np.arange(len(next_tokens))
        self.kl.extend(np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=-1).tolist())
        self.top1.extend((lp_ref.argmax(-1) == lp.argmax(-1)).tolist())
        self.nll.extend((-lp[rows, next_tokens]).tolist())
        self.dp.extend((np.exp(lp[rows, next_tokens]) - np.exp(lp_ref[rows, next_tokens])).tolist())

    def summary(self) -> dict:
        kl = np.asarray(self.kl)
        n = len(kl)
        return {
            "tokens": n,
            "ppl": float(np.exp(np.mean(self.nll))),
            "kl_mean": float(kl.mean()),
            "kl_stderr": float(kl.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
            "kl_p99": float(np.quantile(kl, 0.99)),
            "top1": float(np.mean(self.top1)),
            "rms_dp": float(np.sqrt(np.mean(np.square(self.dp)))),
        }
