"""`pyadaq cache`: what pyadaq keeps in its cache directory, and clearing it.

The cache holds the f16 references of `pyadaq eval` (eval-ref/, bounded: $PYADAQ_REF_CACHE_GB,
default 4 GiB, least recently used evicted first), calibrations and analyses of `pyadaq plan`
(adaptive/), the K/V calibrations of `pyadaq calibrate` (kv-calibrations/), the assembled
embedded model (models/) and the build's pinned llama.cpp source.
"""

from __future__ import annotations

import shutil

from pyadaq._paths import cache_base
from pyadaq.eval.calibration import cache_dir as kv_calibration_dir
from pyadaq.eval.kl import cache_root, dir_bytes, ref_cache_limit
from pyadaq.plan.calibrate import cache_dir as calibration_dir

PARTS = {
    "references": "f16 references of eval (eval-ref/)",
    "calibrations": "calibrations and analyses of plan (adaptive/)",
    "kv-calibrations": "K/V means and bases of calibrate (kv-calibrations/)",
    "models": "the assembled embedded model (models/)",
}


def _dirs() -> dict:
    return {"references": cache_root(), "calibrations": calibration_dir(), "kv-calibrations": kv_calibration_dir(),
            "models": cache_base() / "models"}


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="show or clear pyadaq's cache directory", description=__doc__)
    p.add_argument("--clear", choices=[*PARTS, "all"], help="remove that part of the cache (all: every part)")
    p.set_defaults(func=run)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(args) -> int:
    dirs = _dirs()
    if args.clear:
        for name in (PARTS if args.clear == "all" else [args.clear]):
            d = dirs[name]
            size = dir_bytes(d) if d.is_dir() else 0
            shutil.rmtree(d, ignore_errors=True)
            print(f"cleared {PARTS[name]}: {_mib(size)} in {d}")
        return 0
    print(f"pyadaq's cache: {cache_base()} ($PYADAQ_CACHE_DIR, else $XDG_CACHE_HOME/pyadaq or ~/.cache/pyadaq)")
    for name, d in dirs.items():
        n = sum(1 for x in d.iterdir() if x.is_dir() or x.is_file()) if d.is_dir() else 0
        size = dir_bytes(d) if d.is_dir() else 0
        print(f"  {name:<15} {_mib(size):>14}  {n:>3} entr{'y' if n == 1 else 'ies'}  {PARTS[name]}")
    print(f"The references are kept under {_mib(ref_cache_limit())} ($PYADAQ_REF_CACHE_GB); "
          "`pyadaq cache --clear references|calibrations|kv-calibrations|models|all` removes a part.")
    return 0
