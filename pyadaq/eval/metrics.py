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


def row_blocks(n_rows: int, n_cols: int):
    """Slices of rows that keep each float64 temporary of a computation over n_cols columns (a
    vocabulary) near 8 MiB, so that they are reused from the heap: whole-array temporaries of
    the 256 scored rows of a chunk with a vocabulary of 262144 are 512 MiB each, fresh pages that
    the kernel zeroes, which took most of the scoring time. Every operation is per row: the
    results are the same, bit for bit."""
    step = max(1, (1 << 20) // max(1, n_cols))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _kl_rows(lp_ref: np.ndarray, lp: np.ndarray) -> np.ndarray:
    return np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=-1)


def token_kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(ref || test) per row, in nats."""
    ref_logits, logits = np.asarray(ref_logits), np.asarray(logits)
    if ref_logits.ndim != 2:
        return _kl_rows(log_softmax(ref_logits), log_softmax(logits))
    return np.concatenate([_kl_rows(log_softmax(ref_logits[s]), log_softmax(logits[s]))
                           for s in row_blocks(*ref_logits.shape)])


@dataclass
class Accumulator:
    """Running sums over scored tokens for one config."""

    nll: list = field(default_factory=list)  # -log p(correct) of the test config
    kl: list = field(default_factory=list)
    top1: list = field(default_factory=list)
    dp: list = field(default_factory=list)  # p_test(correct) - p_ref(correct)

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, next_tokens: np.ndarray) -> None:
        ref_logits = np.asarray(ref_logits)
        self._add(lambda s: log_softmax(ref_logits[s]), None, logits, next_tokens)

    def add_logprobs(self, lp_ref: np.ndarray, ref_top1: np.ndarray, logits: np.ndarray,
                     next_tokens: np.ndarray) -> None:
        """Like add(), with the reference given as log-probabilities and its top-1 tokens."""
        self._add(lambda s: np.asarray(lp_ref[s], dtype=np.float64), ref_top1, logits, next_tokens)

    def add_encoded(self, q_ref: np.ndarray, ref_top1: np.ndarray, logits: np.ndarray,
                    next_tokens: np.ndarray) -> None:
        """Like add_logprobs(), with the reference as stored (:func:`encode_logprobs`), decoded a
        block of rows at a time."""
        self._add(lambda s: decode_logprobs(q_ref[s]), ref_top1, logits, next_tokens)

    def _add(self, ref_rows, ref_top1, logits, next_tokens) -> None:
        """ref_rows(s): the reference's log-probs of the rows s; ref_top1: its top-1 tokens (None:
        from those log-probs)."""
        logits, next_tokens = np.asarray(logits), np.asarray(next_tokens)
        ref_top1 = None if ref_top1 is None else np.asarray(ref_top1)
        for s in row_blocks(len(next_tokens), logits.shape[-1]):
            lp_ref, lp, nxt = ref_rows(s), log_softmax(logits[s]), next_tokens[s]
            rows = np.arange(len(nxt))
            top1 = lp_ref.argmax(-1) if ref_top1 is None else ref_top1[s]
            self.kl.extend(_kl_rows(lp_ref, lp).tolist())
            self.top1.extend((top1 == lp.argmax(-1)).tolist())
            self.nll.extend((-lp[rows, nxt]).tolist())
            self.dp.extend((np.exp(lp[rows, nxt]) - np.exp(lp_ref[rows, nxt])).tolist())

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


# The f16 reference is stored as log-probabilities clamped to [LP_FLOOR, 0] on a uniform
# 16-bit grid (step 4.6e-4 nats): an entry below the floor has p < 1e-13. Rounding errors
# are zero-mean, so the mean KL over thousands of tokens moves by ~1e-6.
LP_FLOOR = -30.0
_LP_STEP = -LP_FLOOR / 65535.0


def encode_logprobs(lp: np.ndarray) -> np.ndarray:
    q = np.rint((np.clip(lp, LP_FLOOR, 0.0) - LP_FLOOR) / _LP_STEP)
    return q.astype(np.uint16)


def decode_logprobs(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) * _LP_STEP + LP_FLOOR
