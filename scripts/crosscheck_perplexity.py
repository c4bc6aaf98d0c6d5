#!/usr/bin/env python3
"""Cross-check `pyadaq eval` against llama.cpp's own llama-perplexity on the same text.

Both sides get the same model, text, context size, number of chunks and threads, flash
attention on, and attention rotation as pyadaq's default (on: LLAMA_ATTN_ROT_DISABLE is
removed from llama-perplexity's environment). llama-perplexity is run

  1. once with an f16 cache and --kl-divergence-base FILE (its PPL, and the reference
     log-probabilities written to a temporary directory), then
  2. once per K:V config with -ctk/-ctv and --kl-divergence against that file,

and its PPL and mean KL divergence are compared with pyadaq.eval.kl.compare() (the function
behind `pyadaq eval`) run on the same settings. The script exits with 1 when a perplexity
differs by more than --ppl-tol (relative, default 0.5 %) or a mean KL divergence by more
than --kl-tol (relative, default 5 %; differences below --kl-abs-tol count as equal, since a
KL near zero, as for f16:f16, is only the rounding noise of the stored 16-bit reference).

llama-perplexity is built from the same pinned, patched source as pyadaq's libraries and
installed with the package (pyadaq/bin, `pyadaq tool llama-perplexity`), which is the one used
unless --llama-perplexity names another (for example one in a CMake build tree's bin/):

    python scripts/crosscheck_perplexity.py

Settings that llama-perplexity would otherwise choose differently from pyadaq are passed
explicitly: -b N_CTX -ub min(N_CTX, 512) (one sequence per batch, as pyadaq; the default
-b 2048 would put 4 chunks side by side in one batch), --swa-full (llama_context_default_params
has swa_full = true, common_params has false), -ngl 0 (pyadaq loads models on the CPU), -fa on,
and the same -t/-tb.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIGS = "f16:f16,q8_0:q4_0,q4_0:q4_0"

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_RE_FINAL_PPL = re.compile(r"Final estimate: PPL = " + _NUM)
_RE_PPL_Q = re.compile(r"Mean PPL\(Q\)\s*:\s*" + _NUM)
_RE_PPL_BASE = re.compile(r"Mean PPL\(base\)\s*:\s*" + _NUM)
_RE_KLD = re.compile(r"Mean\s+KLD:\s*" + _NUM)
_RE_TOP = re.compile(r"Same top p:\s*" + _NUM + r"\s*±")
_RE_CHUNKS = re.compile(r"over (\d+) chunks, n_ctx=(\d+)")
_RE_BUILD = re.compile(rb"pyadaq [^;\x00]+; patchset [0-9a-f]+; [^\x00]+")


class CrossCheckError(RuntimeError):
    """llama-perplexity could not be run or its output not parsed."""


def _float(m: re.Match | None, what: str, log: str) -> float:
    if m is None:
        raise CrossCheckError(f"no '{what}' in llama-perplexity's output; its last lines:\n{_tail(log)}")
    return float(m.group(1))


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.splitlines()[-n:])


def tool_env(binary: Path) -> dict:
    """llama-perplexity's environment: the settings pyadaq uses, and its own libraries first."""
    env = dict(os.environ)
    env.pop("LLAMA_ATTN_ROT_DISABLE", None)  # pyadaq's default is attention rotation on
    for k in list(env):
        if k.startswith("LLAMA_ARG_"):  # common's environment overrides of command-line options
            del env[k]
    # the libllama built with the tool first (LD_LIBRARY_PATH would override its RUNPATH)
    from pyadaq.tools import tool_env as libraries_first

    lib = _tool_lib(binary)
    return libraries_first(env, libs=lib.parent if lib else binary.resolve().parent)


def _tool_lib(binary: Path) -> Path | None:
    """The libllama built with the tool: beside it (a build tree's bin/) or in ../lib (pyadaq/bin)."""
    here = binary.resolve().parent
    for d in (here, here.parent / "lib"):
        for name in ("libllama.so", "libllama.dylib", "llama.dll"):
            if (d / name).exists():
                return d / name
    return None


def tool_build_info(binary: Path) -> str | None:
    """The pyadaq build string compiled into the tool's libllama, if it is found."""
    lib = _tool_lib(binary)
    if lib is None:
        return None
    m = _RE_BUILD.search(lib.read_bytes())
    return m.group(0).decode(errors="replace") if m else None


def _patchset(info: str | None) -> str | None:
    m = re.search(r"patchset ([0-9a-f]+)", info or "")
    return m.group(1) if m else None


def run_tool(binary: Path, args: list[str], log_path: Path, env: dict) -> tuple[str, float]:
    cmd = [str(binary), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          text=True, errors="replace")
    secs = time.perf_counter() - t0
    log_path.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout)
    if proc.returncode != 0:
        raise CrossCheckError(f"{' '.join(cmd)} exited with {proc.returncode}; its last lines:\n"
                              f"{_tail(proc.stdout)}")
    return proc.stdout, secs


def common_args(model: str, text_file: Path, n_ctx: int, threads: int) -> list[str]:
    return ["-m", model, "-f", str(text_file), "-c", str(n_ctx),
            "-b", str(n_ctx), "-ub", str(min(n_ctx, 512)),
            "-t", str(threads), "-tb", str(threads), "-fa", "on", "-ngl", "0", "--swa-full", "--no-warmup"]


def _check_chunks(log: str, n_chunks: int, n_ctx: int) -> None:
    m = _RE_CHUNKS.search(log)
    if m is None:
        raise CrossCheckError(f"llama-perplexity did not report its chunks; its last lines:\n{_tail(log)}")
    if (int(m.group(1)), int(m.group(2))) != (n_chunks, n_ctx):
        raise CrossCheckError(f"llama-perplexity scored {m.group(1)} chunks of {m.group(2)} tokens, "
                              f"pyadaq {n_chunks} of {n_ctx}")


def llama_perplexity_results(binary: Path, model: str, text: str, configs: list[tuple[str, str]], n_ctx: int,
                             n_chunks: int, threads: int, work: Path) -> dict:
    """Run llama-perplexity: the f16 base (PPL, reference logits), then each config with --kl-divergence."""
    env = tool_env(binary)
    text_file = work / "text.txt"
    # llama-perplexity's -f drops one trailing newline: add one so that it reads `text` exactly
    text_file.write_text(text + "\n", encoding="utf-8")
    base_file = work / "f16-base.kld"
    base = common_args(model, text_file, n_ctx, threads)
    log, secs = run_tool(binary, [*base, "--chunks", str(n_chunks), "-ctk", "f16", "-ctv", "f16",
                                  "--kl-divergence-base", str(base_file)],
                         work / "llama-perplexity-f16-base.log", env)
    _check_chunks(log, n_chunks, n_ctx)
    out = {"base": {"ppl": _float(_RE_FINAL_PPL.search(log), "Final estimate: PPL", log), "seconds": secs},
           "configs": {}}
    for k, v in configs:
        log, secs = run_tool(binary, [*base, "-ctk", k, "-ctv", v, "--kl-divergence-base", str(base_file),
                                      "--kl-divergence"], work / f"llama-perplexity-{k}-{v}.log", env)
        _check_chunks(log, n_chunks, n_ctx)
        out["configs"][f"{k}:{v}"] = {
            "ppl": _float(_RE_PPL_Q.search(log), "Mean PPL(Q)", log),
            "ppl_base_quantized": _float(_RE_PPL_BASE.search(log), "Mean PPL(base)", log),
            "kl_mean": _float(_RE_KLD.search(log), "Mean KLD", log),
            "top1": _float(_RE_TOP.search(log), "Same top p", log) / 100.0,
            "seconds": secs,
        }
    return out


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else (0.0 if a == b else float("inf"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-perplexity", type=Path,
                    help="the llama-perplexity binary (default: the one installed with pyadaq)")
    ap.add_argument("--model", help="GGUF model (default: pyadaq's embedded Gemma 3 270M)")
    ap.add_argument("--ctx", type=int, default=512, help="context size = chunk length (default 512)")
    ap.add_argument("--chunks", type=int, default=4, help="number of chunks (default 4)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"K:V cache types (default {DEFAULT_CONFIGS})")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both (default: all cores)")
    ap.add_argument("--ppl-tol", type=float, default=0.005,
                    help="largest relative PPL difference (default 0.005)")
    ap.add_argument("--kl-tol", type=float, default=0.05,
                    help="largest relative KL difference (default 0.05)")
    ap.add_argument("--kl-abs-tol", type=float, default=1e-4,
                    help="KL differences below this count as agreement (default 1e-4 nats)")
    ap.add_argument("--allow-build-mismatch", action="store_true",
                    help="go on when the tool's libllama and pyadaq's come from different patch sets")
    ap.add_argument("--keep-dir", type=Path,
                    help="keep the text, reference and logs here (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write all numbers to this file")
    ap.add_argument("--progress", action="store_true", help="show pyadaq's progress bar")
    args = ap.parse_args(argv)

    binary = args.llama_perplexity
    if binary is None:
        from pyadaq.tools import ToolNotBuiltError, tool_path

        try:
            binary = tool_path("llama-perplexity")
        except ToolNotBuiltError as e:
            ap.error(str(e))
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        ap.error(f"{binary} is not an executable file")
    if args.ctx < 4 or args.chunks < 1:
        ap.error("--ctx must be at least 4 and --chunks at least 1")
    scored = args.chunks * (args.ctx - 1 - args.ctx // 2)
    if scored < 100:
        ap.error(f"{scored} scored tokens: llama-perplexity prints its KL statistics only from 100 on")

    import pyadaq
    from pyadaq._native import native
    from pyadaq.eval.kl import compare
    from pyadaq.eval.texts import default_text
    from pyadaq.plan.spec import parse_configs
    from pyadaq.runtime.context import Model, quiet_native_logs

    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        ap.error(str(e))
    model = args.model or str(pyadaq.embedded_model_path())
    text = default_text()

    # the same source and patch set on both sides, or the comparison says little
    py_info = native().build_info["info"]
    tool_info = tool_build_info(binary)
    if tool_info is None:
        print(f"warning: no pyadaq build info found next to {binary}; cannot check that it is the same build",
              file=sys.stderr)
    elif _patchset(tool_info) != _patchset(py_info):
        msg = f"llama-perplexity's libllama is '{tool_info}', pyadaq's is '{py_info}'"
        if not args.allow_build_mismatch:
            print(f"error: {msg}: rebuild it (or pass --allow-build-mismatch)", file=sys.stderr)
            return 2
        print(f"warning: {msg}", file=sys.stderr)

    # the text must hold the chunks asked for (llama-perplexity also wants at least two)
    quiet_native_logs()
    m = Model(model)
    try:
        n_tokens = len(m.tokenize(text, add_bos=True))
    finally:
        m.close()
    if n_tokens < max(2, args.chunks) * args.ctx:
        print(f"error: the text has {n_tokens} tokens, fewer than {max(2, args.chunks)} chunks of {args.ctx}",
              file=sys.stderr)
        return 2

    tmp = None
    if args.keep_dir:
        work = args.keep_dir
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pyadaq-crosscheck-")
        work = Path(tmp.name)
    try:
        print(f"llama-perplexity: {binary} ({tool_info or 'build unknown'})", file=sys.stderr)
        print(f"model {model}, {n_tokens} tokens of text, {args.chunks} chunks x {args.ctx}, "
              f"{args.threads} threads", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            lp = llama_perplexity_results(binary, model, text, configs, args.ctx, args.chunks,
                                          args.threads, work)
        except CrossCheckError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t_tool = time.perf_counter() - t0
        t0 = time.perf_counter()
        py = compare(model, configs, text=text, n_ctx=args.ctx, n_chunks=args.chunks, attn_rot=True,
                     n_threads=args.threads, progress=args.progress)
        t_py = time.perf_counter() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()

    rows = []
    py_by = {f"{r['k']}:{r['v']}": r for r in py["results"]}
    if "f16:f16" in py_by:
        # the base run's PPL (perplexity mode, exact logits) against pyadaq's f16 reference
        a, b = py_by["f16:f16"]["ppl"], lp["base"]["ppl"]
        rows.append({"config": "f16:f16 (base run)", "pyadaq_ppl": a, "llama_ppl": b,
                     "ppl_rel_diff": rel_diff(a, b),
                     "pyadaq_kl": None, "llama_kl": None, "kl_rel_diff": None,
                     "ok": rel_diff(a, b) <= args.ppl_tol})
    for name, t in lp["configs"].items():
        p = py_by[name]
        d_ppl = rel_diff(p["ppl"], t["ppl"])
        d_kl = rel_diff(p["kl_mean"], t["kl_mean"])
        ok_kl = d_kl <= args.kl_tol or abs(p["kl_mean"] - t["kl_mean"]) <= args.kl_abs_tol
        if abs(t["kl_mean"]) <= args.kl_abs_tol:
            d_kl = None  # a KL at the noise floor (f16:f16): only the absolute difference means something
        rows.append({"config": name, "pyadaq_ppl": p["ppl"], "llama_ppl": t["ppl"], "ppl_rel_diff": d_ppl,
                     "pyadaq_kl": p["kl_mean"], "llama_kl": t["kl_mean"], "kl_rel_diff": d_kl,
                     "pyadaq_top1": p["top1"], "llama_top1": t["top1"], "tokens": p["tokens"],
                     "ok": d_ppl <= args.ppl_tol and ok_kl})

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    for r in rows:
        if r["kl_rel_diff"] is None and r["llama_kl"] is not None:
            r["kl_abs_diff"] = abs(r["pyadaq_kl"] - r["llama_kl"])

    print(f"{'config':<20} {'PPL pyadaq':>11} {'PPL llama':>11} {'dPPL':>8}   "
          f"{'KL pyadaq':>10} {'KL llama':>10} "
          f"{'dKL':>8}   {'top1 py':>7} {'top1 ll':>7}  ok")
    for r in rows:
        d_kl = f(r["kl_rel_diff"], ">8.2%") if "kl_abs_diff" not in r else format(r["kl_abs_diff"], ".1e")
        print(f"{r['config']:<20} {r['pyadaq_ppl']:>11.4f} {r['llama_ppl']:>11.4f} "
              f"{r['ppl_rel_diff']:>8.3%}   "
              f"{f(r['pyadaq_kl'], '>10.6f'):>10} {f(r['llama_kl'], '>10.6f'):>10} "
              f"{d_kl:>8}   "
              f"{f(r.get('pyadaq_top1'), '>7.4f'):>7} {f(r.get('llama_top1'), '>7.4f'):>7}  "
              f"{'yes' if r['ok'] else 'NO'}")
    ok = all(r["ok"] for r in rows)
    print(f"tolerances: PPL {args.ppl_tol:.2%}, KL {args.kl_tol:.0%} (or {args.kl_abs_tol:g} nats); "
          f"llama-perplexity {t_tool:.0f} s, pyadaq {t_py:.0f} s: {'AGREE' if ok else 'DISAGREE'}")

    if args.json:
        args.json.write_text(json.dumps({
            "model": model, "n_ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
            "text_tokens": n_tokens, "scored_tokens_per_config": scored,
            "tolerances": {"ppl_rel": args.ppl_tol, "kl_rel": args.kl_tol, "kl_abs": args.kl_abs_tol},
            "pyadaq_build": py_info, "llama_perplexity_build": tool_info,
            "llama_perplexity": lp, "pyadaq": py, "rows": rows, "ok": ok,
            "seconds": {"llama_perplexity": t_tool, "pyadaq": t_py},
        }, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
