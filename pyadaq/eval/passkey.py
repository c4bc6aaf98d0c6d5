"""Passkey retrieval: a random number hidden in filler text at a given depth, the model must repeat it.

The prompt is plain completion text (no chat template), so it suits base and instruction-tuned
models alike::

    There is a pass key hidden in the text below. Remember it.
    The grass is green. The sky is blue. ... The pass key is 12345. Remember it. 12345 is the
    pass key. ... Here we go. There and back again.
    What is the pass key? The pass key is

and the model is greedily decoded for a few tokens; a hit is when the digits it produces
right away are exactly the pass key. Each prompt is evaluated from an empty KV cache, so the
result depends only on the prompt and the cache types under test.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
from tqdm import tqdm

from pyadaq._native import native
from pyadaq.runtime.context import Batch, Model, quiet_native_logs
from pyadaq.runtime.kvconfig import config_row, open_context

_llama_cpp = native().llama_cpp

INSTRUCTION = "There is a pass key hidden in the text below. Remember it.\n\n"
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def make_key(seed: int) -> str:
    """The 5-digit pass key for `seed` (numpy.random.default_rng, so fully reproducible)."""
    return str(int(np.random.default_rng(seed).integers(10000, 100000)))


def prompt_text(n_filler: int, depth: float, key: str) -> str:
    """The prompt with n_filler filler sentences and the needle after round(depth * n_filler) of them."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is not in [0, 1]")
    sentences = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    sentences.insert(round(depth * n_filler), NEEDLE.format(key=key))
    return INSTRUCTION + " ".join(sentences) + QUESTION


def make_prompt(model: Model, n_tokens: int, depth: float, seed: int) -> tuple[np.ndarray, str]:
    """Tokens (with BOS) of a passkey prompt of at most n_tokens tokens, and the pass key.

    The number of filler sentences is the largest that fits n_tokens (one sentence is ~5
    tokens, so the prompt is within a few tokens of n_tokens).
    """
    key = make_key(seed)

    def tokens(n_filler: int) -> np.ndarray:
        return model.tokenize(prompt_text(n_filler, depth, key), add_bos=True)

    if len(tokens(0)) > n_tokens:
        raise ValueError(f"{n_tokens} tokens cannot hold a passkey prompt (it needs {len(tokens(0))})")
    lo, hi = 0, max(1, n_tokens)  # every sentence takes at least one token: hi filler never fits
    while hi - lo > 1:  # invariant: tokens(lo) fits, tokens(hi) does not
        mid = (lo + hi) // 2
        if len(tokens(mid)) <= n_tokens:
            lo = mid
        else:
            hi = mid
    return tokens(lo), key


_LEADING_NOISE = ":*\"'`"


def leading_number(text: str) -> str:
    """The digits a generated continuation starts with ('' if none).

    Whitespace is ignored everywhere (digits may come as separate tokens), as are a few
    leading quote/markdown characters (' **12345**' -> '12345').
    """
    s = re.sub(r"\s+", "", text).lstrip(_LEADING_NOISE)
    m = re.match(r"\d+", s)
    return m.group(0) if m else ""


def answer_matches(text: str, answer: str) -> bool:
    """Whether the generated text starts with exactly the pass key (no digit more, none less)."""
    return leading_number(text) == answer


def _ctx_ptr(ctx):
    return ctx.ptr if hasattr(ctx, "ptr") else ctx


def token_piece(vocab, token: int) -> bytes:
    buf = (ctypes.c_char * 64)()
    n = _llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, False)
    if n < 0:  # buffer too small: -n is the size needed
        buf = (ctypes.c_char * -n)()
        n = _llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, False)
    return bytes(buf[:n])


def detokenize(vocab, tokens) -> str:
    return b"".join(token_piece(vocab, t) for t in tokens).decode("utf-8", errors="replace")


def _done(text: str) -> bool:
    """Greedy decoding can stop: the answer (or its absence) is settled."""
    s = re.sub(r"\s+", "", text).lstrip(_LEADING_NOISE)
    return bool(s) and (not s[0].isdigit() or len(leading_number(s)) < len(s))


def generate(ctx, tokens: np.ndarray, n_gen: int = 8, stop_when_settled: bool = True) -> list[int]:
    """Greedy-decode up to n_gen tokens after `tokens`, from an empty cache.

    ctx is a pyadaq.runtime.context.Context (or anything with a llama_context pointer in .ptr, or the
    pointer itself). The prompt is decoded in chunks of the context's n_ubatch (only the last
    token's logits are computed), then one token at a time; decoding stops at an
    end-of-generation token, and with stop_when_settled once a number and the token after it
    have been generated (or the continuation does not start with a digit).
    """
    L = _llama_cpp
    ptr = _ctx_ptr(ctx)
    n = len(tokens)
    n_ctx = L.llama_n_ctx(ptr)
    if n == 0:
        raise ValueError("empty prompt")
    if n + n_gen > n_ctx:
        raise ValueError(f"{n} prompt tokens + {n_gen} generated do not fit a context of {n_ctx}")
    vocab = _ctx_vocab(ptr)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    step = max(1, min(L.llama_n_ubatch(ptr), L.llama_n_batch(ptr)))
    L.llama_memory_clear(L.llama_get_memory(ptr), True)
    batch = Batch(step)
    try:
        batch.decode(ptr, tokens, 0, logits_from=n - 1)
        out: list[int] = []
        pieces = b""
        for i in range(n_gen):
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ptr, -1), shape=(n_vocab,))
            tok = int(np.argmax(logits))
            if L.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            pieces += token_piece(vocab, tok)
            if stop_when_settled and _done(pieces.decode("utf-8", errors="replace")):
                break
            if i + 1 < n_gen:
                batch.decode(ptr, [tok], n + i, logits_from=0)
        return out
    finally:
        batch.close()


def score(ctx, tokens: np.ndarray, answer: str, n_gen: int = 8) -> bool:
    """Greedy-decode after the prompt; True when the continuation starts with the pass key."""
    gen = generate(ctx, tokens, n_gen)
    return answer_matches(detokenize(_ctx_vocab(ctx), gen), answer)


def _ctx_vocab(ctx):
    L = _llama_cpp
    return L.llama_model_get_vocab(L.llama_get_model(_ctx_ptr(ctx)))


def context_size(length: int, n_gen: int = 8, multiple: int = 256) -> int:
    """n_ctx for prompts of up to `length` tokens plus n_gen generated: rounded up to `multiple`."""
    need = length + n_gen
    return -(-need // multiple) * multiple


def run_passkey(model_path: str, configs: list[tuple[str, str]], lengths=DEFAULT_LENGTHS,
                depths=DEFAULT_DEPTHS, seeds: int = 1, n_threads: int | None = None, progress: bool = True,
                n_gen: int = 8, attn_rot: bool = True) -> dict:
    """Passkey accuracy for each K/V config and prompt length, over depths x seeds.

    Seeds are 0..seeds-1; the prompt for (length, depth, seed) is the same for every config.
    Results (JSON-able): {"model", "lengths", "depths", "seeds", "n_gen", "results": [{"k", "v",
    "length", "n_ctx", "accuracy", "n", "hits": [{"depth", "seed", "answer", "generated", "hit"}]}]}.
    """
    quiet_native_logs()
    lengths = [int(x) for x in lengths]
    depths = [float(d) for d in depths]
    model = Model(model_path)
    prompts = {(length, d, s): make_prompt(model, length, d, s)
               for length in lengths for d in depths for s in range(seeds)}
    results = []
    bar = tqdm(total=len(configs) * len(prompts), desc="passkey prompts x configs", disable=not progress)
    try:
        for cfg in configs:
            row = config_row(cfg)
            for length in lengths:
                n_ctx = context_size(length, n_gen)
                ctx = open_context(model, cfg, n_ctx, n_threads, attn_rot)
                try:
                    hits = []
                    for d in depths:
                        for s in range(seeds):
                            toks, answer = prompts[(length, d, s)]
                            gen = detokenize(model.vocab, generate(ctx, toks, n_gen))
                            hits.append({"depth": d, "seed": s, "answer": answer, "generated": gen,
                                         "hit": answer_matches(gen, answer)})
                            bar.update()
                finally:
                    ctx.close()
                n_hit = sum(h["hit"] for h in hits)
                results.append({"config": row["config"], "k": row["k"], "v": row["v"], "length": length, "n_ctx": n_ctx,
                                "accuracy": n_hit / len(hits), "n": len(hits), "hits": hits})
    finally:
        bar.close()
        model.close()
    return {"model": str(model_path), "lengths": lengths, "depths": depths, "seeds": seeds,
            "n_gen": n_gen, "results": results}
