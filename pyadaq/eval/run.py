"""One evaluation run: KL against f16 (and pass-key accuracy) for resolved configs, with the
settings that identify the run, as `pyadaq eval --json` and `pyadaq results` record it."""

from __future__ import annotations

import datetime
import hashlib
import time

from pyadaq._native import native
from pyadaq._version import __version__
from pyadaq.eval.kl import compare
from pyadaq.eval.passkey import run_passkey
from pyadaq.report.machine import machine

__all__ = ["evaluate"]


def evaluate(model: str, info, configs: list, *, text: str, text_name: str, ctx: int, chunks: int,
             attn_rot: bool = True, threads: int | None = None, store: bool = True,
             passkey_lengths: list | None = None, passkey_depths: list | None = None,
             passkey_seeds: int = 1) -> dict:
    """The figures of `pyadaq eval` for resolved configs, with the run's settings (what `eval
    --json` writes). Pass-key accuracy is measured when passkey_lengths is given."""
    t0 = time.time()
    res = compare(model, configs, text=text, n_ctx=ctx, n_chunks=chunks, attn_rot=attn_rot,
                  n_threads=threads, store=store)
    quality_s = time.time() - t0
    passkey = None
    if passkey_lengths:
        t1 = time.time()
        passkey = run_passkey(model, configs, lengths=passkey_lengths, depths=passkey_depths,
                              seeds=passkey_seeds, n_threads=threads, attn_rot=attn_rot)
        passkey["seconds"] = time.time() - t1
        for r in res["results"]:
            rows = [p for p in passkey["results"] if p["config"] == r["config"]]
            r["passkey"] = {str(p["length"]): p["accuracy"] for p in rows}
            r["passkey_mean"] = sum(p["accuracy"] for p in rows) / len(rows)
    return {
        "settings": {
            "model": model, "model_sha256": info.sha256, "text": text_name,
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "ctx": ctx, "chunks": res["chunks"],
            "attn_rot": attn_rot, "pyadaq": __version__, "native": native().build_info["info"],
            "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "seconds_quality": quality_s,
        },
        **res,
        "passkey": passkey,
    }
