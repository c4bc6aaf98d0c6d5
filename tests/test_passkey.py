"""Passkey retrieval: prompt construction, answer matching, and retrieval on the embedded model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pyadaq.eval.passkey import (
    NEEDLE,
    answer_matches,
    context_size,
    detokenize,
    generate,
    leading_number,
    make_key,
    make_prompt,
    prompt_text,
    run_passkey,
    score,
)
from pyadaq.runtime.context import Context, Model, quiet_native_logs


@pytest.fixture(scope="module")
def model(embedded_model):
    # The tokenizer of the embedded model (loading it is cheap; only tokenization is used).
    quiet_native_logs()
    m = Model(str(embedded_model))
    yield m
    m.close()


def _needle_pos(model, tokens, key) -> int:
    """Token index where the needle starts: the first occurrence of the key's tokens."""
    key_toks = model.tokenize(key, add_bos=False)  # Gemma: one token per digit
    n = len(key_toks)
    for i in range(len(tokens) - n + 1):
        if np.array_equal(tokens[i:i + n], key_toks):
            return i
    raise AssertionError("pass key not found in the prompt tokens")


def test_key_is_five_digits_and_reproducible():
    keys = [make_key(s) for s in range(20)]
    assert all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys)
    assert keys == [make_key(s) for s in range(20)]
    assert len(set(keys)) > 15


def test_prompt_text_layout():
    text = prompt_text(10, 0.5, "12345")
    assert text.startswith("There is a pass key hidden in the text below.")
    assert text.endswith("What is the pass key? The pass key is")
    assert text.count("12345") == 2
    assert NEEDLE.format(key="12345") in text
    with pytest.raises(ValueError):
        prompt_text(10, 1.5, "12345")


@pytest.mark.embedded
def test_make_prompt_reproducible(model):
    t1, a1 = make_prompt(model, 512, 0.5, seed=0)
    t2, a2 = make_prompt(model, 512, 0.5, seed=0)
    _t3, a3 = make_prompt(model, 512, 0.5, seed=1)
    assert a1 == a2 and np.array_equal(t1, t2)
    assert a1 != a3
    assert re.fullmatch(r"\d{5}", a1) and re.fullmatch(r"\d{5}", a3)
    assert t1.dtype == np.int32
    assert int(t1[0]) == int(model.tokenize("x", add_bos=True)[0])  # starts with BOS


@pytest.mark.embedded
@pytest.mark.parametrize("n_tokens", [128, 300, 1024, 2048, 4096])
def test_make_prompt_length(model, n_tokens):
    toks, _ = make_prompt(model, n_tokens, 0.3, seed=0)
    assert len(toks) <= n_tokens
    assert len(toks) >= n_tokens * 0.97 - 8


@pytest.mark.embedded
def test_make_prompt_too_short(model):
    with pytest.raises(ValueError):
        make_prompt(model, 10, 0.5, seed=0)


@pytest.mark.embedded
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_depth(model, depth):
    toks, key = make_prompt(model, 2048, depth, seed=3)
    head = len(model.tokenize(prompt_text(0, 0.0, key).split(NEEDLE.format(key=key))[0], add_bos=True))
    tail = len(model.tokenize(prompt_text(0, 0.0, key).split(NEEDLE.format(key=key))[1], add_bos=False))
    filler = len(toks) - head - tail  # filler tokens, needle included
    pos = _needle_pos(model, toks, key) - head
    assert abs(pos / filler - depth) < 0.02


def test_answer_matching():
    assert answer_matches(" 12345.", "12345")
    assert answer_matches("12345", "12345")
    assert answer_matches(" 1 2 3 4 5\n", "12345")
    assert answer_matches(" **12345**.", "12345")
    assert answer_matches(': "12345"', "12345")
    assert not answer_matches(" 123456", "12345")  # a digit too many
    assert not answer_matches(" 1234.", "12345")
    assert not answer_matches(" 54321", "12345")
    assert not answer_matches(" the number 12345", "12345")  # not at the start
    assert not answer_matches("", "12345")
    assert leading_number(" 42 is it") == "42"
    assert leading_number("none") == ""


def test_context_size():
    assert context_size(1024) == 1280
    assert context_size(1000, n_gen=8) == 1024
    assert context_size(4096, n_gen=0) == 4096


@pytest.mark.embedded
def test_score_and_generate_on_short_prompt(model):
    toks, key = make_prompt(model, 400, 0.5, seed=5)
    ctx = Context(model, "f16", "f16", context_size(400), n_threads=2)
    try:
        assert score(ctx, toks, key)
        assert not score(ctx, toks, "00000")  # a wrong answer never matches
        # every call starts from an empty cache: the same prompt gives the same continuation
        full = generate(ctx, toks, n_gen=6, stop_when_settled=False)
        assert generate(ctx, toks, n_gen=6, stop_when_settled=False) == full
        assert len(full) == 6
        assert detokenize(model.vocab, full).strip().startswith(key)
        short = generate(ctx, toks, n_gen=6)  # stops once the number is complete
        assert short == full[:len(short)] and len(short) <= 6
        with pytest.raises(ValueError):
            generate(ctx, np.concatenate([toks, toks]), n_gen=8)  # does not fit n_ctx
    finally:
        ctx.close()


@pytest.mark.embedded
def test_embedded_f16_retrieves_key_at_1k(embedded_model):
    res = run_passkey(str(embedded_model), [("f16", "f16")], lengths=(1024,), depths=(0.2, 0.8), seeds=1,
                      n_threads=2, progress=False)
    assert res["lengths"] == [1024] and res["depths"] == [0.2, 0.8]
    (r,) = res["results"]
    assert (r["k"], r["v"], r["length"], r["n"]) == ("f16", "f16", 1024, 2)
    assert r["n_ctx"] >= 1024 + 8
    assert r["accuracy"] == 1.0, r["hits"]
    assert all(h["generated"].strip().startswith(h["answer"]) for h in r["hits"])
