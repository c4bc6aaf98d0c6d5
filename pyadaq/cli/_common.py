"""What several commands share: where generated files go, and the notice printed before a long
measurement starts (what it computes, about how long it takes, what of it is cached, and the
faster alternative)."""

from __future__ import annotations

import hashlib
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_OUT = "pyadaq-results"  # `results` and `formats` write here unless --out says otherwise


def out_dir(path: str) -> Path:
    """The output directory of `results` / `formats`, created before anything is measured."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def counted(n: int, word: str, plural: str | None = None) -> str:
    """'1 chunk', '20 chunks' (plural: the plural when it is not word + 's')."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def about(seconds: float) -> str:
    """'under a second', 'about 40 seconds', 'about 25 minutes', 'about 2.5 hours'."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {counted(round(seconds), 'second')}"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} minutes"
    return f"about {seconds / 3600:.1f} hours"


def seconds_per_pass(model_path: str, n_ctx: int, n_threads: int | None = None) -> float:
    """Wall time of one scored chunk of n_ctx tokens, timed now: a forward pass with an f16
    cache, then KL and top-1 over its second half (the unit the estimates count in)."""
    import numpy as np

    from pyadaq.eval.metrics import Accumulator, log_softmax
    from pyadaq.eval.texts import default_text
    from pyadaq.runtime.context import Context, Model, quiet_native_logs

    quiet_native_logs()
    model = Model(model_path)
    try:
        tokens = np.resize(model.tokenize(default_text()[:16 * n_ctx]), n_ctx)
        ctx = Context(model, "f16", "f16", n_ctx, n_threads)
        try:
            ctx.logits(tokens[:8], 7)  # pages the weights in: the timed pass then costs what later ones do
            first = n_ctx // 2
            t0 = time.perf_counter()
            logits = ctx.logits(tokens, first)[:-1]
            lp = log_softmax(logits)
            Accumulator().add_logprobs(lp, lp.argmax(-1), logits, tokens[first + 1:])
            return time.perf_counter() - t0
        finally:
            ctx.close()
    finally:
        model.close()


def missing_reference(info, n_ctx: int, n_chunks: int, text: str | None = None) -> int:
    """How many of the first n_chunks f16 reference chunks (model of `info`, a ModelInfo; the
    default text unless given) the reference store in the cache directory lacks."""
    from pyadaq.eval.kl import ReferenceStore, cache_root
    from pyadaq.eval.texts import default_text

    text = text if text is not None else default_text()
    store = ReferenceStore(cache_root(), model_sha256=info.sha256,
                           text_sha256=hashlib.sha256(text.encode()).hexdigest(), n_ctx=n_ctx)
    return sum(not store.contains(i) for i in range(n_chunks))


def calibration_work(info, types: Sequence[str], n_ctx: int, n_chunks: int) -> tuple:
    """(runs, forward passes) a calibration (pyadaq.plan.calibrate.calibrate, default text) still needs:
    (0, 0) when its result is cached."""
    from pyadaq.plan.calibrate import calibration_items, calibration_path
    from pyadaq.types import cache_type

    types = [cache_type(t).name for t in types]
    if calibration_path(info, types, None, n_ctx, n_chunks).exists():
        return 0, 0
    _, jobs, _ = calibration_items(info, types)
    return len(jobs), len(jobs) * n_chunks + missing_reference(info, n_ctx, n_chunks)


def announce(command: str, work: str, passes: int, model_path: str, n_ctx: int,
             n_threads: int | None = None, *, kept: str, faster: str | None = None,
             faster_passes: int | None = None) -> None:
    """One paragraph on standard error before a long measurement: `work` (what is computed),
    `passes` scored chunks of n_ctx tokens at the cost of one timed now, `kept` (what is cached
    or written), and `faster`, an alternative (`faster_passes` of the same chunks, if known)."""
    per = seconds_per_pass(model_path, n_ctx, n_threads)
    text = (f"pyadaq {command}: {work}: {counted(passes, 'forward pass', 'forward passes')} of {n_ctx} "
            f"tokens, {about(passes * per)} on this machine ({per:.2f} s a pass, timed just now). {kept}")
    if faster:
        text += f" Faster: {faster}" + (f", {about(faster_passes * per)}." if faster_passes else ".")
    print(textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False), file=sys.stderr,
          flush=True)


def announce_calibration(command: str, model_path: str, types: Sequence[str], n_ctx: int, n_chunks: int,
                         n_threads: int | None = None, *, faster: str, faster_passes: int) -> None:
    """The notice before pyadaq.plan.calibrate.calibrate runs, unless its result is cached."""
    from pyadaq.model.header import read_model_info
    from pyadaq.plan.calibrate import cache_dir
    from pyadaq.types import cache_type

    runs, passes = calibration_work(read_model_info(model_path), types, n_ctx, n_chunks)
    if not passes:
        return
    lossy = [cache_type(t).name for t in types if cache_type(t).name != "f16"]
    work = (f"calibrating the sensitivities of {Path(model_path).name} (one layer's K or V at a time in "
            f"{', '.join(lossy)}, all else f16: {counted(runs, 'run')} on {counted(n_chunks, 'chunk')})")
    announce(command, work, passes, model_path, n_ctx, n_threads,
             kept=f"The result is cached in {cache_dir()}: later runs with this model and these settings "
                  "start at once.", faster=faster, faster_passes=faster_passes)
