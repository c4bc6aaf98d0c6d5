"""Print native/src/pyadaq-kvt-levels.h: the Lloyd-Max levels of a unit Gaussian for 1..7 bits
(the levels of the transform-coded KV-cache types, used by the CPU reference and the CUDA kernels),
computed by pyadaq.quants_ref.kvt_levels. Run: python scripts/kvt_levels.py > native/src/pyadaq-kvt-levels.h
"""

from __future__ import annotations

from pyadaq.quants_ref import KVT_MAX_BITS, kvt_levels


def main() -> None:
    print("// Lloyd-Max levels of a unit Gaussian for 1..7 bits (ascending): the levels of pyadaq's")
    print("// transform-coded KV-cache types, one home for the CPU reference (native/src/pyadaq-kvt.c) and")
    print("// the CUDA kernels (native/cuda/pyadaq-kvt-block.h). Written by scripts/kvt_levels.py")
    print("// (pyadaq.quants_ref.kvt_levels); tests/test_kvt.py checks them against the numpy twin.")
    print()
    print("#pragma once")
    print()
    for b in range(1, KVT_MAX_BITS + 1):
        vals = ", ".join(f"{float(v):.9g}f" for v in kvt_levels(b))
        print(f"#define PYADAQ_KVT_LEVELS_{b} {{ {vals} }}")


if __name__ == "__main__":
    main()
