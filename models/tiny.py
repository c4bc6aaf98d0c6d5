"""Tiny random-weight GGUF models for tests.

The files written here are complete GGUF models that the llama.cpp loader
(the copy vendored in llama-cpp-python 0.3.36) accepts: every tensor that
``load_arch_tensors`` creates as required for the architecture is present with
the right shape, no extra tensors are present (the loader rejects files with
unused tensors), and all hyper-parameter keys have the GGUF types the loader
expects.  Only the ``gguf`` Python package and numpy are needed.

Five architectures are supported:

``llama``
    Standard pre-norm llama: ``token_embd``, ``output_norm``, ``output``, and
    per layer ``attn_norm``, ``attn_q/k/v/output``, ``ffn_norm``,
    ``ffn_gate/up/down``.  Full causal attention, rope type NORM.

``gemma3``
    Gemma 3: adds per-layer ``attn_q_norm``, ``attn_k_norm`` (size head_dim),
    ``post_attention_norm`` and ``post_ffw_norm``; GELU FFN; embeddings scaled
    by sqrt(n_embd); rope type NEOX.  With ``sliding_window > 0`` llama.cpp
    builds an interleaved sliding-window (iSWA) KV cache: a layer ``il`` is a
    sliding-window layer iff ``il % swa_pattern < swa_pattern - 1`` (so the
    last layer of every period of ``swa_pattern`` layers uses full attention).
    In a sliding-window layer a query at position p sees keys at positions
    ``p - sliding_window < k <= p``.

``gemma2``
    Gemma 2: the gemma3 layout without ``attn_q_norm``/``attn_k_norm``, with the
    output matrix tied to ``token_embd`` (llama.cpp loads no ``output.weight``
    for it), soft-capped attention logits (``cap * tanh(s / cap)``, 5 here by
    default, so that the cap bites on these weights; Gemma 2 uses 50) and final
    logits (30), one rope base for every layer, and sliding-window attention in
    every other layer (``swa_pattern`` 2) unless ``sliding_window=0``.  The key
    mean cannot be taken out of soft-capped logits, which is what it is for.

``gpt-oss``
    OpenAI's gpt-oss (llama.cpp's openai-moe): attention biases (as qwen2), a
    bias on the attention output, learned attention sinks (one logit per query
    head that joins the softmax and takes its share of the weight, with no
    value), ``post_attention_norm`` before a mixture of ``n_expert`` experts of
    which ``n_expert_used`` run per token (router with a bias, softmax over the
    chosen experts' logits, clamped SwiGLU with biases), rope type NEOX and
    sliding-window attention in every other layer.  With sinks the attention
    weights of the cached tokens no longer sum to one, so neither the key nor
    the value mean can be taken out.

``qwen2``
    The llama layout with attention biases (``attn_q/k/v.bias``), rope type NEOX
    and Qwen 2's rope base: the key bias is a large per-head mean (std
    ``_K_BIAS`` per channel, against keys of std ~1.5), as in the real models,
    where it is what every quantization block of a key must carry.

Vocabulary: a self-contained SentencePiece-style ("llama") vocabulary:
``<unk>``=0, ``<s>``=1 (BOS), ``</s>``=2 (EOS), the 256 byte tokens
``<0x00>``..``<0xFF>`` (ids 3..258), the single characters ``▁`` and printable
ASCII, then word pieces learnt by a small deterministic BPE over an embedded
English text, so ordinary English text tokenizes into word-ish pieces.  If
``n_vocab`` is larger than what the corpus yields, the rest is filled with
``[tokN]`` filler pieces.

Weights are random normal, deterministic from ``seed``, with scales chosen so
that RMS-normed activations are O(1), attention is content/position dependent,
and next-token distributions have an entropy of a few nats (neither uniform nor
one-hot).  A constant "bias channel" (embedding dimension 0; no layer writes to
it) lets the output matrix push the logits of ``<unk>``/``<s>``/``</s>`` and of
non-printable / non-ASCII byte tokens down by ~10-20 (their total probability
is < 1e-4 per step at temperature 1), so sampled generations practically never
stop on EOS and always detokenize to valid UTF-8 (disable with
``suppress_special=False``).

``reference_logits`` is an independent float64 numpy forward pass that reads a
file written here and returns the logits llama.cpp should produce for a token
sequence (up to f16 rounding of activations in llama.cpp's matmuls).

CLI::

    python -m models.tiny OUT.gguf [--arch gemma3] [--head-dim 128] ...
    python -m models.tiny OUT.gguf --corrupt-dir DIR   # also write bad copies
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ARCHS",
    "TinyConfig",
    "build_config",
    "build_vocab",
    "corrupt_copies",
    "expected_tensors",
    "main",
    "make_tiny_model",
    "read_config",
    "read_metadata",
    "reference_logits",
    "simple_tokenize",
]

ARCHS = ("llama", "gemma2", "gemma3", "qwen2", "gpt-oss")
GEMMA = ("gemma2", "gemma3")
SWA_ARCHS = ("gemma2", "gemma3", "gpt-oss")  # archs with sliding-window layers

# llama.cpp token types (LLAMA_TOKEN_TYPE_*; gguf.TokenType)
TT_NORMAL = 1
TT_UNKNOWN = 2
TT_CONTROL = 3
TT_USER_DEFINED = 4
TT_UNUSED = 5
TT_BYTE = 6

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE0_ID = 3  # id of <0x00>
N_FIXED = 3 + 256
SPACE = "\u2581"  # '▁', SentencePiece whitespace marker

# GGUF file types (llama_ftype): 0 = all f32, 1 = mostly f16, 32 = mostly bf16
_FTYPE = {"f32": 0, "f16": 1, "bf16": 32}

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

_CORPUS = """
The quick brown fox jumps over the lazy dog. A small model with random weights
does not know any language, but the tokenizer still needs to split plain
English text into pieces. This is a short story about a cache that stores keys
and values for every token in a long context. When the context grows, the cache
grows with it, and memory becomes the main limit on how many tokens we can keep.
One way to save memory is to store each number with fewer bits. Another way is
to forget the oldest tokens and only remember a sliding window of recent ones.
In the morning the people of the town went to the market to buy bread, fruit,
fish and milk. The children played in the park while their parents talked about
the weather, the news and the price of things. It was a warm day in the middle
of summer, and the sun was shining over the hills and the river.
Once upon a time there was a little girl who lived in a house near the forest.
She liked to read books and to write letters to her friends. Every evening she
would sit by the window and look at the stars in the sky. Her father worked as a
teacher at the school, and her mother was a doctor at the hospital in the city.
What is the capital of France? Paris is the capital and the largest city of
France. How many days are there in a week? There are seven days in a week.
Please answer the question and explain your reasoning step by step.
Hello, world! This is a test of the system. We are testing the model, the
tokenizer and the quantized key value cache with several different settings.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 also appear in text from time to
time, as do words such as first, second, third, before, after, during, because.
The results were good, the error was small, and the output was the same as the
reference within the expected tolerance. We should measure the speed, the size
and the quality of the results for each configuration before we decide.
""".strip()

_BASE_CHARS = (
    [SPACE]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    + [chr(c) for c in range(ord("0"), ord("9") + 1)]
    + list("""!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~""")
)


def _bpe_merges(words: dict[tuple[str, ...], int], alphabet: set, limit: int) -> list[str]:
    """Deterministic BPE: return up to ``limit`` new pieces (in merge order)."""
    vocab = set(alphabet)
    words = dict(words)
    pieces: list[str] = []
    while len(pieces) < limit:
        counts: dict[tuple[str, str], int] = {}
        for w, f in words.items():
            for a, b in zip(w, w[1:]):
                if a in vocab and b in vocab:
                    counts[(a, b)] = counts.get((a, b), 0) + f
        if not counts:
            break
        (a, b), _ = min(counts.items(), key=lambda kv: (-kv[1], kv[0][0] + kv[0][1], kv[0]))
        new = a + b
        if new not in vocab:
            vocab.add(new)
            pieces.append(new)
        merged: dict[tuple[str, ...], int] = {}
        for w, f in words.items():
            out: list[str] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            t = tuple(out)
            merged[t] = merged.get(t, 0) + f
        words = merged
    return pieces


def build_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Return ``(tokens, scores, token_types)`` of length exactly ``n_vocab``."""
    if n_vocab < N_FIXED:
        raise ValueError(f"n_vocab must be >= {N_FIXED} (3 special + 256 byte tokens), got {n_vocab}")
    tokens: list[str] = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types: list[int] = [TT_UNKNOWN, TT_CONTROL, TT_CONTROL] + [TT_BYTE] * 256
    budget = n_vocab - N_FIXED
    base = _BASE_CHARS[: min(budget, len(_BASE_CHARS))]
    budget -= len(base)

    freqs: dict[tuple[str, ...], int] = {}
    for w in _CORPUS.split():
        t = tuple(SPACE + w)
        freqs[t] = freqs.get(t, 0) + 1
    merges = _bpe_merges(freqs, set(base), budget) if budget > 0 else []
    budget -= len(merges)

    n_pieces = len(base) + len(merges)
    # SentencePiece merges higher-scoring pieces first: earlier BPE merges get
    # higher scores; single characters score below every merge.
    merge_scores = [-float(i) for i in range(len(merges))]
    base_scores = [-float(len(merges) + i) for i in range(len(base))]
    fill = [f"[tok{i}]" for i in range(budget)]

    tokens += merges + base + fill
    types += [TT_NORMAL] * (n_pieces + len(fill))
    scores = [0.0] * N_FIXED + merge_scores + base_scores + [-1.0e9] * len(fill)
    assert len(tokens) == len(scores) == len(types) == n_vocab
    assert len(set(tokens)) == n_vocab
    return tokens, scores, types


def _suppressed_ids(n_vocab: int) -> list[int]:
    """Token ids whose logits are pushed down when ``suppress_special``."""
    ids = [UNK_ID, BOS_ID, EOS_ID]
    for b in range(256):
        printable = (0x20 <= b < 0x7F) or b in (0x09, 0x0A)
        if not printable:
            ids.append(BYTE0_ID + b)
    return ids


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_freq_base: float
    rope_freq_base_swa: float | None
    sliding_window: int  # 0 = no sliding window
    swa_pattern: int  # 0 = not written (llama)
    dtype: str
    seed: int
    suppress_special: bool = True
    swa_layers: tuple[bool, ...] = field(default=())
    attn_softcap: float = 0.0  # gemma2: cap of the attention logits (0: none)
    final_softcap: float = 0.0  # gemma2: cap of the output logits (0: none)
    n_expert: int = 0  # gpt-oss: experts per layer (each of n_ff), n_expert_used of them per token
    n_expert_used: int = 0

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["swa_layers"] = list(self.swa_layers)
        return d


def build_config(
    *,
    arch: str = "llama",
    head_dim: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_layer: int = 2,
    n_embd: int | None = None,
    n_ff: int | None = None,
    n_vocab: int = 512,
    n_ctx_train: int = 4096,
    sliding_window: int | None = None,
    seed: int = 0,
    dtype: str = "f16",
    swa_pattern: int | None = None,
    suppress_special: bool = True,
    attn_softcap: float | None = None,
) -> TinyConfig:
    """Validate arguments and fill in defaults (see ``make_tiny_model``)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if dtype not in _FTYPE:
        raise ValueError(f"dtype must be one of {tuple(_FTYPE)}, got {dtype!r}")
    for name, v in (("head_dim", head_dim), ("n_head", n_head), ("n_head_kv", n_head_kv),
                    ("n_layer", n_layer), ("n_ctx_train", n_ctx_train)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rope), got {head_dim}")
    if n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    if n_layer > 512:
        raise ValueError("n_layer must be <= 512 (LLAMA_MAX_LAYERS)")
    if n_embd is None:
        n_embd = n_head * head_dim
    if n_embd < 2:
        raise ValueError(f"n_embd must be >= 2, got {n_embd}")
    if n_ff is None:
        n_ff = 2 * n_embd
    if n_ff < 1:
        raise ValueError(f"n_ff must be >= 1, got {n_ff}")
    if n_vocab < N_FIXED:
        raise ValueError(f"n_vocab must be >= {N_FIXED}, got {n_vocab}")

    if arch in ("llama", "qwen2"):
        if sliding_window not in (None, 0):
            raise ValueError(f"sliding_window is only supported for {', '.join(SWA_ARCHS)} "
                             f"(llama.cpp's {arch} arch has no sliding-window attention)")
        if swa_pattern is not None:
            raise ValueError(f"swa_pattern is only supported for {', '.join(SWA_ARCHS)}")
        if attn_softcap is not None:
            raise ValueError("attn_softcap is only supported for arch='gemma2'")
        qwen = arch == "qwen2"
        return TinyConfig(
            arch=arch, n_vocab=int(n_vocab), n_embd=int(n_embd), n_ff=int(n_ff), n_layer=int(n_layer),
            n_head=int(n_head), n_head_kv=int(n_head_kv), head_dim=int(head_dim),
            n_ctx_train=int(n_ctx_train), rms_eps=1e-6 if qwen else 1e-5,
            rope_freq_base=1_000_000.0 if qwen else 10000.0,
            rope_freq_base_swa=None, sliding_window=0, swa_pattern=0, dtype=dtype, seed=int(seed),
            suppress_special=bool(suppress_special), swa_layers=tuple([False] * n_layer),
        )

    # gemma2, gemma3, gpt-oss
    g2 = arch == "gemma2"
    oss = arch == "gpt-oss"
    if attn_softcap is not None and not g2:
        raise ValueError("attn_softcap is only supported for arch='gemma2'")
    if attn_softcap is None:
        attn_softcap = 5.0 if g2 else 0.0
    if g2 and not attn_softcap > 0:
        raise ValueError(f"attn_softcap must be > 0, got {attn_softcap}")
    if sliding_window is None:
        sliding_window = 64
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0, got {sliding_window}")
    if (g2 or oss) and sliding_window == 0:
        raise ValueError(f"{arch} has sliding-window layers in llama.cpp: sliding_window must be > 0")
    if swa_pattern is None:
        swa_pattern = 2 if g2 or oss else min(6, n_layer)  # Gemma 2, gpt-oss: 1 local : 1 global; Gemma 3: 5 : 1
    if swa_pattern < 1:
        raise ValueError(f"swa_pattern must be >= 1, got {swa_pattern}")
    if sliding_window > 0:
        swa_layers = tuple(il % swa_pattern < swa_pattern - 1 for il in range(n_layer))
    else:
        swa_layers = tuple([False] * n_layer)
    return TinyConfig(
        arch=arch, n_vocab=int(n_vocab), n_embd=int(n_embd), n_ff=int(n_ff), n_layer=int(n_layer),
        n_head=int(n_head), n_head_kv=int(n_head_kv), head_dim=int(head_dim),
        n_ctx_train=int(n_ctx_train), rms_eps=1e-5 if oss else 1e-6,
        rope_freq_base=10000.0 if g2 or oss else 1_000_000.0,
        rope_freq_base_swa=None if g2 or oss else 10000.0, sliding_window=int(sliding_window),
        swa_pattern=int(swa_pattern), dtype=dtype, seed=int(seed), suppress_special=bool(suppress_special),
        swa_layers=swa_layers, attn_softcap=float(attn_softcap), final_softcap=30.0 if g2 else 0.0,
        n_expert=4 if oss else 0, n_expert_used=2 if oss else 0,
    )


def expected_tensors(cfg: TinyConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> ggml shape (ne0, ne1, ...) that llama.cpp requires for ``cfg``.

    Shapes are in ggml order (fastest dimension first), i.e. the reverse of the
    numpy shape; this is what ``GGUFReader`` reports in ``ReaderTensor.shape``.
    """
    E, V, F = cfg.n_embd, cfg.n_vocab, cfg.n_ff
    Q, KV, D = cfg.n_embd_q, cfg.n_embd_kv, cfg.head_dim
    t: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (E, V),
        "output_norm.weight": (E,),
    }
    if cfg.arch != "gemma2":  # gemma2's output matrix is token_embd
        t["output.weight"] = (E, V)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (E,)
        t[p + "attn_q.weight"] = (E, Q)
        t[p + "attn_k.weight"] = (E, KV)
        t[p + "attn_v.weight"] = (E, KV)
        t[p + "attn_output.weight"] = (Q, E)
        if cfg.arch == "gpt-oss":
            X = cfg.n_expert
            for name, shape in (("attn_q.bias", (Q,)), ("attn_k.bias", (KV,)), ("attn_v.bias", (KV,)),
                                ("attn_output.bias", (E,)), ("attn_sinks.weight", (cfg.n_head,)),
                                ("post_attention_norm.weight", (E,)),
                                ("ffn_gate_inp.weight", (E, X)), ("ffn_gate_inp.bias", (X,)),
                                ("ffn_gate_exps.weight", (E, F, X)), ("ffn_gate_exps.bias", (F, X)),
                                ("ffn_up_exps.weight", (E, F, X)), ("ffn_up_exps.bias", (F, X)),
                                ("ffn_down_exps.weight", (F, E, X)), ("ffn_down_exps.bias", (E, X))):
                t[p + name] = shape
            continue
        if cfg.arch == "qwen2":
            t[p + "attn_q.bias"] = (Q,)
            t[p + "attn_k.bias"] = (KV,)
            t[p + "attn_v.bias"] = (KV,)
        if cfg.arch in GEMMA:
            t[p + "post_attention_norm.weight"] = (E,)
        if cfg.arch == "gemma3":
            t[p + "attn_k_norm.weight"] = (D,)
            t[p + "attn_q_norm.weight"] = (D,)
        t[p + "ffn_norm.weight"] = (E,)
        t[p + "ffn_gate.weight"] = (E, F)
        t[p + "ffn_up.weight"] = (E, F)
        t[p + "ffn_down.weight"] = (F, E)
        if cfg.arch in GEMMA:
            t[p + "post_ffw_norm.weight"] = (E,)
    return t


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

# Gains (multiples of 1/sqrt(fan_in)).  Tuned with reference_logits so that the
# next-token entropy is ~3-4.5 nats over a 512-token vocabulary, attention is
# neither uniform nor one-hot, and the context visibly changes the logits.
_OUT_GAIN = 2.5        # logit std ~ _OUT_GAIN (the final RMS norm makes |h|_rms ~ 1)
_QK_GAIN_LLAMA = 1.5   # llama: attention scores std ~ gain^2
_O_GAIN_LLAMA = 2.0    # llama: attention output scale relative to the embeddings
_BIAS_CHANNEL = 3.0    # value of the constant residual channel 0 (after gemma's sqrt(n_embd) scaling)
_SUPPRESS = -10.0      # output weight on the bias channel for suppressed tokens
_Q_BIAS = 0.5          # qwen2: std of the query bias per channel
_K_BIAS = 3.0          # qwen2: std of the key bias per channel (a large per-head mean)
_V_BIAS = 1.0          # qwen2: std of the value bias per channel
_POST_GAIN_TIED = 16.0 # gemma2: post-norm gains, so that the layers' outputs outweigh the embedding
                       # in the residual (with the output tied to it, the input token's own logit
                       # would otherwise take all the probability)


def _make_weights(cfg: TinyConfig) -> dict[str, np.ndarray]:
    """Return tensor name -> float32 numpy array (numpy shape = reversed ggml shape)."""
    rng = np.random.default_rng(cfg.seed)
    E, V, F = cfg.n_embd, cfg.n_vocab, cfg.n_ff
    Q, KV, D = cfg.n_embd_q, cfg.n_embd_kv, cfg.head_dim
    gemma = cfg.arch in GEMMA
    tied = cfg.arch == "gemma2"  # the output matrix is token_embd

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def ones(n):
        return np.ones((n,), dtype=np.float32)

    w: dict[str, np.ndarray] = {}
    # Gemma multiplies the embeddings by sqrt(n_embd) in the graph; tied to the output, they
    # have the output's scale.
    emb_std = (_OUT_GAIN if tied else 1.0) / math.sqrt(E) if gemma else 1.0
    tok = normal((V, E), emb_std)
    out = None if tied else normal((V, E), _OUT_GAIN / math.sqrt(E))
    if cfg.suppress_special:
        # channel 0 is a constant "bias" unit: same value for every token and
        # no layer writes to it (rows of attn_output/ffn_down, or the post-norm
        # weights, are zero there), so after the final RMS norm h[0] > 0 always.
        tok[:, 0] = _BIAS_CHANNEL / math.sqrt(E) if gemma else _BIAS_CHANNEL
        if tied:
            # a suppressed token's channel 0 is its output weight too, and only its own
            # input position loses the constant; BOS keeps it, as it starts every input. The
            # channel is as large as the residual (_POST_GAIN_TIED) to reach the logits.
            tok[:, 0] = _POST_GAIN_TIED * _BIAS_CHANNEL / math.sqrt(E)
            tok[[i for i in _suppressed_ids(V) if i != BOS_ID], 0] = 2 * _SUPPRESS
        else:
            out[:, 0] = 0.0
            out[_suppressed_ids(V), 0] = _SUPPRESS
    w["token_embd.weight"] = tok
    w["output_norm.weight"] = ones(E)
    if out is not None:
        w["output.weight"] = out

    qk_gain = 1.0 if cfg.arch == "gemma3" else _QK_GAIN_LLAMA  # gemma3 normalizes q and k itself
    o_gain = 1.0 if gemma else _O_GAIN_LLAMA    # gemma post-norms the attention output
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        if cfg.arch == "gpt-oss":
            w.update(_gpt_oss_layer(cfg, p, normal, ones))
            continue
        w[p + "attn_norm.weight"] = ones(E)
        w[p + "attn_q.weight"] = normal((Q, E), qk_gain / math.sqrt(E))
        w[p + "attn_k.weight"] = normal((KV, E), qk_gain / math.sqrt(E))
        w[p + "attn_v.weight"] = normal((KV, E), 1.0 / math.sqrt(E))
        if cfg.arch == "qwen2":
            w[p + "attn_q.bias"] = normal((Q,), _Q_BIAS)
            w[p + "attn_k.bias"] = normal((KV,), _K_BIAS)
            w[p + "attn_v.bias"] = normal((KV,), _V_BIAS)
        wo = normal((E, Q), o_gain / math.sqrt(Q))
        if gemma:
            post_attn = ones(E) * np.float32(_POST_GAIN_TIED if tied else 1.0)
            if cfg.suppress_special:
                post_attn[0] = 0.0
            w[p + "post_attention_norm.weight"] = post_attn
            if cfg.arch == "gemma3":
                w[p + "attn_k_norm.weight"] = ones(D)
                w[p + "attn_q_norm.weight"] = ones(D)
        elif cfg.suppress_special:
            wo[0, :] = 0.0
        w[p + "attn_output.weight"] = wo
        w[p + "ffn_norm.weight"] = ones(E)
        w[p + "ffn_gate.weight"] = normal((F, E), 1.0 / math.sqrt(E))
        w[p + "ffn_up.weight"] = normal((F, E), 1.0 / math.sqrt(E))
        down = normal((E, F), 1.0 / math.sqrt(F))
        if gemma:
            post_ffw = ones(E) * np.float32(_POST_GAIN_TIED if tied else 1.0)
            if cfg.suppress_special:
                post_ffw[0] = 0.0
            w[p + "post_ffw_norm.weight"] = post_ffw
        elif cfg.suppress_special:
            down[0, :] = 0.0
        w[p + "ffn_down.weight"] = down
    return w


_SINK_STD = 1.5        # gpt-oss: std of the sink logits (the scores' std is ~_QK_GAIN_LLAMA^2)
_EXPERT_BIAS = 0.1     # gpt-oss: std of the experts' and the attention output's biases


def _gpt_oss_layer(cfg: TinyConfig, p: str, normal, ones) -> dict[str, np.ndarray]:
    """One gpt-oss layer's tensors (numpy shapes). Channel 0 of the residual stays constant as
    in the other archs: the attention output's and the experts' rows 0, and their biases' entry
    0, are zero when suppress_special."""
    E, F, X = cfg.n_embd, cfg.n_ff, cfg.n_expert
    Q, KV = cfg.n_embd_q, cfg.n_embd_kv
    w = {
        p + "attn_norm.weight": ones(E),
        p + "attn_q.weight": normal((Q, E), _QK_GAIN_LLAMA / math.sqrt(E)),
        p + "attn_k.weight": normal((KV, E), _QK_GAIN_LLAMA / math.sqrt(E)),
        p + "attn_v.weight": normal((KV, E), 1.0 / math.sqrt(E)),
        p + "attn_q.bias": normal((Q,), _Q_BIAS),
        p + "attn_k.bias": normal((KV,), _K_BIAS),
        p + "attn_v.bias": normal((KV,), _V_BIAS),
        p + "attn_output.weight": normal((E, Q), _O_GAIN_LLAMA / math.sqrt(Q)),
        p + "attn_output.bias": normal((E,), _EXPERT_BIAS),
        p + "attn_sinks.weight": normal((cfg.n_head,), _SINK_STD),
        p + "post_attention_norm.weight": ones(E),
        p + "ffn_gate_inp.weight": normal((X, E), 1.0 / math.sqrt(E)),
        p + "ffn_gate_inp.bias": normal((X,), 0.5),
        p + "ffn_gate_exps.weight": normal((X, F, E), 1.0 / math.sqrt(E)),
        p + "ffn_gate_exps.bias": normal((X, F), _EXPERT_BIAS),
        p + "ffn_up_exps.weight": normal((X, F, E), 1.0 / math.sqrt(E)),
        p + "ffn_up_exps.bias": normal((X, F), _EXPERT_BIAS),
        p + "ffn_down_exps.weight": normal((X, E, F), 1.0 / math.sqrt(F)),
        p + "ffn_down_exps.bias": normal((X, E), _EXPERT_BIAS),
    }
    if cfg.suppress_special:
        w[p + "attn_output.weight"][0, :] = 0.0
        w[p + "attn_output.bias"][0] = 0.0
        w[p + "ffn_down_exps.weight"][:, 0, :] = 0.0
        w[p + "ffn_down_exps.bias"][:, 0] = 0.0
    return w


def _write_gguf(path: pathlib.Path, cfg: TinyConfig, weights: dict[str, np.ndarray]) -> None:
    import gguf

    a = cfg.arch
    writer = gguf.GGUFWriter(str(path), a)  # also writes general.architecture
    writer.add_string("general.name", f"tiny-{a}-hd{cfg.head_dim}-seed{cfg.seed}")
    writer.add_uint32("general.file_type", _FTYPE[cfg.dtype])
    writer.add_uint32(f"{a}.vocab_size", cfg.n_vocab)
    writer.add_uint32(f"{a}.context_length", cfg.n_ctx_train)
    writer.add_uint32(f"{a}.embedding_length", cfg.n_embd)
    writer.add_uint32(f"{a}.block_count", cfg.n_layer)
    writer.add_uint32(f"{a}.feed_forward_length", cfg.n_ff)
    writer.add_uint32(f"{a}.attention.head_count", cfg.n_head)
    writer.add_uint32(f"{a}.attention.head_count_kv", cfg.n_head_kv)
    writer.add_uint32(f"{a}.attention.key_length", cfg.head_dim)
    writer.add_uint32(f"{a}.attention.value_length", cfg.head_dim)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    writer.add_uint32(f"{a}.rope.dimension_count", cfg.head_dim)
    writer.add_float32(f"{a}.rope.freq_base", cfg.rope_freq_base)
    if cfg.n_expert:
        writer.add_uint32(f"{a}.expert_count", cfg.n_expert)
        writer.add_uint32(f"{a}.expert_used_count", cfg.n_expert_used)
        writer.add_uint32(f"{a}.expert_feed_forward_length", cfg.n_ff)
    if a in SWA_ARCHS and cfg.sliding_window > 0:
        writer.add_uint32(f"{a}.attention.sliding_window", cfg.sliding_window)
        writer.add_uint32(f"{a}.attention.sliding_window_pattern", cfg.swa_pattern)
    if cfg.rope_freq_base_swa is not None and cfg.sliding_window > 0:
        writer.add_float32(f"{a}.rope.freq_base_swa", float(cfg.rope_freq_base_swa))
    if cfg.attn_softcap:
        writer.add_float32(f"{a}.attn_logit_softcapping", cfg.attn_softcap)
    if cfg.final_softcap:
        writer.add_float32(f"{a}.final_logit_softcapping", cfg.final_softcap)

    tokens, scores, types = build_vocab(cfg.n_vocab)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", [float(s) for s in scores])
    writer.add_array("tokenizer.ggml.token_type", [int(t) for t in types])
    writer.add_uint32("tokenizer.ggml.unknown_token_id", UNK_ID)
    writer.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    writer.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    writer.add_bool("tokenizer.ggml.add_space_prefix", True)

    qtype = {"f32": gguf.GGMLQuantizationType.F32,
             "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[cfg.dtype]
    for name, arr in weights.items():
        if arr.ndim == 1 or cfg.dtype == "f32" or name.endswith(".bias"):  # biases f32, as converters write them
            writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif cfg.dtype == "f16":
            writer.add_tensor(name, np.ascontiguousarray(arr.astype(np.float16)))
        else:
            q = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
            writer.add_tensor(name, q, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_tiny_model(
    path,
    *,
    arch: str = "llama",
    head_dim: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_layer: int = 2,
    n_embd: int | None = None,
    n_ff: int | None = None,
    n_vocab: int = 512,
    n_ctx_train: int = 4096,
    sliding_window: int | None = None,
    seed: int = 0,
    dtype: str = "f16",
    swa_pattern: int | None = None,
    suppress_special: bool = True,
    attn_softcap: float | None = None,
) -> pathlib.Path:
    """Write a tiny random-weight GGUF model to ``path`` and return it as a Path.

    ``n_embd`` defaults to ``n_head * head_dim`` and ``n_ff`` to ``2 * n_embd``.
    ``head_dim`` may differ from ``n_embd / n_head``: ``attention.key_length``,
    ``attention.value_length`` and ``rope.dimension_count`` are always written
    as ``head_dim``.

    ``sliding_window`` / ``swa_pattern`` are for the gemma archs only (ValueError
    for llama and qwen2).  ``sliding_window`` defaults to 64; for gemma3 0
    disables SWA, giving a plain KV cache.  ``swa_pattern`` defaults to
    ``min(6, n_layer)`` for gemma3 and 2 for gemma2, so the default 2-layer
    model has layer 0 = sliding window, layer 1 = full attention.
    ``attn_softcap`` (gemma2 only, default 5) caps the attention logits.

    ``dtype`` is the storage type of the 2-D weights: "f16" (default), "f32" or
    "bf16"; 1-D norm weights are always f32.  The output is a deterministic
    function of the arguments (same arguments -> byte-identical file).
    """
    cfg = build_config(
        arch=arch, head_dim=head_dim, n_head=n_head, n_head_kv=n_head_kv, n_layer=n_layer,
        n_embd=n_embd, n_ff=n_ff, n_vocab=n_vocab, n_ctx_train=n_ctx_train,
        sliding_window=sliding_window, seed=seed, dtype=dtype, swa_pattern=swa_pattern,
        suppress_special=suppress_special, attn_softcap=attn_softcap,
    )
    path = pathlib.Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    weights = _make_weights(cfg)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        _write_gguf(tmp, cfg, weights)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ---------------------------------------------------------------------------
# Reading back + numpy reference forward pass
# ---------------------------------------------------------------------------


def _field_value(field):
    """Scalar / string / list value of a GGUFReader field (gguf >= 0.17)."""
    if hasattr(field, "contents"):
        return field.contents()
    import gguf  # pragma: no cover - very old gguf

    t = field.types[0]
    if t == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if t == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    return field.parts[field.data[0]].tolist()[0]


def read_metadata(path) -> dict[str, object]:
    """All key/value pairs of a GGUF file as python values."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return {name: _field_value(f) for name, f in r.fields.items()}


def read_config(path) -> TinyConfig:
    """Reconstruct the ``TinyConfig`` of a file written by ``make_tiny_model``."""
    md = read_metadata(path)
    a = md["general.architecture"]
    if a not in ARCHS:
        raise ValueError(f"not a tiny model architecture: {a!r}")
    n_layer = int(md[f"{a}.block_count"])
    sw = int(md.get(f"{a}.attention.sliding_window", 0) or 0)
    pat = int(md.get(f"{a}.attention.sliding_window_pattern", 0) or 0)
    if a in SWA_ARCHS and sw > 0:
        pat_eff = pat if pat else (6 if a == "gemma3" else 2)
        swa_layers = tuple(il % pat_eff < pat_eff - 1 for il in range(n_layer))
    else:
        swa_layers = tuple([False] * n_layer)
    inv_ftype = {v: k for k, v in _FTYPE.items()}
    name = str(md.get("general.name", ""))
    seed = int(name.rsplit("seed", 1)[1]) if "seed" in name else -1
    return TinyConfig(
        arch=a,
        n_vocab=len(md["tokenizer.ggml.tokens"]),
        n_embd=int(md[f"{a}.embedding_length"]),
        n_ff=int(md[f"{a}.feed_forward_length"]),
        n_layer=n_layer,
        n_head=int(md[f"{a}.attention.head_count"]),
        n_head_kv=int(md[f"{a}.attention.head_count_kv"]),
        head_dim=int(md[f"{a}.attention.key_length"]),
        n_ctx_train=int(md[f"{a}.context_length"]),
        rms_eps=float(f"{float(md[f'{a}.attention.layer_norm_rms_epsilon']):.7g}"),
        rope_freq_base=float(md.get(f"{a}.rope.freq_base", 10000.0)),
        rope_freq_base_swa=(float(md.get(f"{a}.rope.freq_base_swa", 10000.0)) if a == "gemma3" else None),
        # llama.cpp's defaults where gemma2's keys are missing (it always caps)
        attn_softcap=float(md.get(f"{a}.attn_logit_softcapping", 50.0 if a == "gemma2" else 0.0)),
        final_softcap=float(md.get(f"{a}.final_logit_softcapping", 30.0 if a == "gemma2" else 0.0)),
        n_expert=int(md.get(f"{a}.expert_count", 0) or 0),
        n_expert_used=int(md.get(f"{a}.expert_used_count", 0) or 0),
        sliding_window=sw,
        swa_pattern=pat,
        dtype=inv_ftype.get(int(md.get("general.file_type", 1)), "f16"),
        seed=seed,
        swa_layers=swa_layers,
    )


def _read_tensors(path) -> dict[str, np.ndarray]:
    """Tensor name -> float64 array with numpy shape (reversed ggml shape)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out: dict[str, np.ndarray] = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            a = np.asarray(t.data)
        else:
            a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = np.asarray(a, dtype=np.float64).reshape(shape)
    return out


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, base, mode):
    """x: (T, H, D).  mode 'norm' rotates adjacent pairs, 'neox' the two halves."""
    _T, _H, D = x.shape
    half = D // 2
    inv = base ** (-2.0 * np.arange(half) / D)
    ang = pos[:, None].astype(np.float64) * inv[None, :]  # (T, half)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if mode == "norm":
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out
    x0, x1 = x[..., :half], x[..., half:]
    return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(path, tokens: Sequence[int], *, n_swa: int | None = None,
                     attn_softcap: float | None = None) -> np.ndarray:
    """Float64 numpy forward pass of a tiny model over ``tokens`` (one sequence,
    positions 0..T-1, causal; sliding window on the SWA layers of gemma2/3 and gpt-oss).

    Returns float32 logits of shape (T, n_vocab); row t predicts token t+1.
    This mirrors llama.cpp's graphs for these archs (models/llama.cpp,
    models/gemma2.cpp, models/gemma3.cpp, models/qwen2.cpp, models/openai-moe.cpp) and so can be
    compared with ``llama_get_logits_ith``.
    ``n_swa`` overrides the sliding window (e.g. 0 to disable it), ``attn_softcap`` the
    cap of the attention logits (0: none).
    """
    cfg = read_config(path)
    W = _read_tensors(path)
    toks = np.asarray(list(tokens), dtype=np.int64)
    if toks.ndim != 1 or len(toks) == 0:
        raise ValueError("tokens must be a non-empty 1-D sequence")
    if toks.min() < 0 or toks.max() >= cfg.n_vocab:
        raise ValueError("token id out of range")
    T, E, D = len(toks), cfg.n_embd, cfg.head_dim
    H, HKV = cfg.n_head, cfg.n_head_kv
    gemma = cfg.arch in GEMMA
    eps = cfg.rms_eps
    sw = cfg.sliding_window if n_swa is None else n_swa
    cap = cfg.attn_softcap if attn_softcap is None else attn_softcap
    pos = np.arange(T)

    x = W["token_embd.weight"][toks]
    if gemma:
        x = x * math.sqrt(E)
    causal = pos[None, :] <= pos[:, None]  # [q, k]
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        h = _rms_norm(x, W[p + "attn_norm.weight"], eps)
        q = (h @ W[p + "attn_q.weight"].T).reshape(T, H, D)
        k = (h @ W[p + "attn_k.weight"].T).reshape(T, HKV, D)
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, HKV, D)
        if p + "attn_q.bias" in W:  # qwen2, gpt-oss
            q = q + W[p + "attn_q.bias"].reshape(H, D)
            k = k + W[p + "attn_k.bias"].reshape(HKV, D)
            v = v + W[p + "attn_v.bias"].reshape(HKV, D)
        is_swa = sw > 0 and cfg.swa_layers[il]
        if gemma:
            if cfg.arch == "gemma3":
                q = _rms_norm(q, W[p + "attn_q_norm.weight"], eps)
                k = _rms_norm(k, W[p + "attn_k_norm.weight"], eps)
            base = cfg.rope_freq_base_swa if is_swa and cfg.rope_freq_base_swa else cfg.rope_freq_base
            q = _rope(q, pos, base, "neox")
            k = _rope(k, pos, base, "neox")
            q = q / math.sqrt(D)  # f_attention_scale (model type is never 27B here)
            scale = 1.0
        else:
            mode = "norm" if cfg.arch == "llama" else "neox"
            q = _rope(q, pos, cfg.rope_freq_base, mode)
            k = _rope(k, pos, cfg.rope_freq_base, mode)
            scale = 1.0 / math.sqrt(D)
        mask = causal.copy()
        if is_swa:
            mask &= (pos[:, None] - pos[None, :]) < sw
        g = H // HKV
        heads = []
        for hh in range(H):
            kh, vh = k[:, hh // g, :], v[:, hh // g, :]
            s = (q[:, hh, :] @ kh.T) * scale
            if cap:
                s = cap * np.tanh(s / cap)
            s = np.where(mask, s, -np.inf)
            # a sink: one more logit in the softmax, whose weight goes to no value
            sink = W[p + "attn_sinks.weight"][hh] if p + "attn_sinks.weight" in W else -np.inf
            top = np.maximum(s.max(axis=1, keepdims=True), sink)
            pr = np.exp(s - top)
            pr /= pr.sum(axis=1, keepdims=True) + np.exp(sink - top)
            heads.append(pr @ vh)
        o = np.concatenate(heads, axis=1) @ W[p + "attn_output.weight"].T
        if p + "attn_output.bias" in W:
            o = o + W[p + "attn_output.bias"]
        if gemma:
            o = _rms_norm(o, W[p + "post_attention_norm.weight"], eps)
        x = x + o
        if cfg.arch == "gpt-oss":
            x = x + _experts(cfg, W, p, _rms_norm(x, W[p + "post_attention_norm.weight"], eps))
            continue
        h = _rms_norm(x, W[p + "ffn_norm.weight"], eps)
        gate = h @ W[p + "ffn_gate.weight"].T
        up = h @ W[p + "ffn_up.weight"].T
        act = _gelu_tanh(gate) if gemma else gate / (1.0 + np.exp(-gate))
        f = (act * up) @ W[p + "ffn_down.weight"].T
        if gemma:
            f = _rms_norm(f, W[p + "post_ffw_norm.weight"], eps)
        x = x + f
    h = _rms_norm(x, W["output_norm.weight"], eps)
    logits = h @ W.get("output.weight", W["token_embd.weight"]).T
    if cfg.final_softcap:
        logits = cfg.final_softcap * np.tanh(logits / cfg.final_softcap)
    return logits.astype(np.float32)


def _experts(cfg: TinyConfig, W, p: str, h) -> np.ndarray:
    """gpt-oss's mixture of experts on h (T, E): each token runs the n_expert_used experts whose
    router logits are largest, weighted by the softmax of those logits; an expert is a SwiGLU
    whose gate is capped at 7 and whose linear part is clamped to [-7, 7] and shifted by one
    (llama.cpp's swiglu_oai, alpha 1.702)."""
    logits = h @ W[p + "ffn_gate_inp.weight"].T + W[p + "ffn_gate_inp.bias"]  # (T, X)
    chosen = np.argsort(-logits, axis=1)[:, :cfg.n_expert_used]
    sel = np.take_along_axis(logits, chosen, axis=1)
    wsel = np.exp(sel - sel.max(axis=1, keepdims=True))
    wsel /= wsel.sum(axis=1, keepdims=True)
    weight = np.zeros_like(logits)
    np.put_along_axis(weight, chosen, wsel, axis=1)
    out = np.zeros_like(h)
    for e in range(cfg.n_expert):
        gate = h @ W[p + "ffn_gate_exps.weight"][e].T + W[p + "ffn_gate_exps.bias"][e]
        up = h @ W[p + "ffn_up_exps.weight"][e].T + W[p + "ffn_up_exps.bias"][e]
        g = np.minimum(gate, 7.0)
        act = g / (1.0 + np.exp(-1.702 * g)) * (np.clip(up, -7.0, 7.0) + 1.0)
        out += weight[:, e:e + 1] * (act @ W[p + "ffn_down_exps.weight"][e].T + W[p + "ffn_down_exps.bias"][e])
    return out


def simple_tokenize(text: str, n_vocab: int = 512, *, add_bos: bool = True) -> list[int]:
    """Pure-python approximation of llama.cpp's SPM tokenizer for these vocabs
    (prefix space, '▁' for spaces, score-ordered merges, byte fallback)."""
    tokens, scores, _ = build_vocab(n_vocab)
    tid = {t: i for i, t in enumerate(tokens)}
    sym = list(SPACE + text.replace(" ", SPACE))
    while True:
        best = None
        for i in range(len(sym) - 1):
            j = tid.get(sym[i] + sym[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        sym[i:i + 2] = [sym[i] + sym[i + 1]]
    out = [BOS_ID] if add_bos else []
    for s in sym:
        if s in tid:
            out.append(tid[s])
        else:
            out.extend(BYTE0_ID + b for b in s.encode("utf-8"))
    return out


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


def corrupt_copies(path, outdir) -> dict[str, pathlib.Path]:
    """Write broken variants of the GGUF file ``path`` into ``outdir``.

    Keys of the returned dict:
      ``truncated``        the file cut to half its size (header and metadata
                           intact, tensor data missing)
      ``truncated_header`` only the first 64 bytes (cut inside the metadata)
      ``bad_magic``        the whole file with the 'GGUF' magic overwritten
      ``random_bytes``     4096 deterministic random bytes (not GGUF)
      ``text``             a small text file (not GGUF)
      ``empty``            a zero-byte file
    """
    src = pathlib.Path(path)
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    stem = src.stem
    res: dict[str, pathlib.Path] = {}

    def put(key: str, name: str, payload: bytes) -> None:
        p = out / name
        p.write_bytes(payload)
        res[key] = p

    put("truncated", f"{stem}.truncated.gguf", data[: len(data) // 2])
    put("truncated_header", f"{stem}.truncated_header.gguf", data[:64])
    put("bad_magic", f"{stem}.bad_magic.gguf", b"XXXX" + data[4:])
    rnd = np.random.default_rng(12345).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    if rnd[:4] == b"GGUF":  # pragma: no cover - astronomically unlikely
        rnd = b"\x00" + rnd[1:]
    put("random_bytes", f"{stem}.random.gguf", rnd)
    put("text", f"{stem}.text.gguf", b"This is not a GGUF model file.\nJust some text.\n")
    put("empty", f"{stem}.empty.gguf", b"")
    return res


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.tiny",
                                 description="Write a tiny random-weight GGUF model.")
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=None)
    ap.add_argument("--n-ff", type=int, default=None)
    ap.add_argument("--n-vocab", type=int, default=512)
    ap.add_argument("--n-ctx-train", type=int, default=4096)
    ap.add_argument("--sliding-window", type=int, default=None,
                    help="gemma archs only (default 64; for gemma3 0 disables SWA)")
    ap.add_argument("--swa-pattern", type=int, default=None,
                    help="gemma archs only (default: gemma3 min(6, n_layer), gemma2 2)")
    ap.add_argument("--attn-softcap", type=float, default=None, help="gemma2 only (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=tuple(_FTYPE), default="f16")
    ap.add_argument("--no-suppress-special", action="store_true",
                    help="do not push down the logits of special/non-printable byte tokens")
    ap.add_argument("--corrupt-dir", default=None, help="also write corrupt copies into this folder")
    args = ap.parse_args(argv)
    try:
        p = make_tiny_model(
            args.out, arch=args.arch, head_dim=args.head_dim, n_head=args.n_head,
            n_head_kv=args.n_head_kv, n_layer=args.n_layer, n_embd=args.n_embd, n_ff=args.n_ff,
            n_vocab=args.n_vocab, n_ctx_train=args.n_ctx_train, sliding_window=args.sliding_window,
            seed=args.seed, dtype=args.dtype, swa_pattern=args.swa_pattern,
            suppress_special=not args.no_suppress_special, attn_softcap=args.attn_softcap,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = read_config(p)
    print(f"wrote {p} ({p.stat().st_size} bytes)")
    for k, v in cfg.as_dict().items():
        print(f"  {k} = {v}")
    if args.corrupt_dir:
        for k, v in corrupt_copies(p, args.corrupt_dir).items():
            print(f"  corrupt[{k}] = {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
