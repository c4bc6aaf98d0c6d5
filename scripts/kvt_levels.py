"""Print native/src/pyadaq-kvt-levels.h: the Lloyd-Max levels of a unit Gaussian for 1..7 bits
and the mantissas of the scale codes (of the transform-coded KV-cache types, used by the CPU
reference and the CUDA kernels), computed by pyadaq.quants_ref.kvt_levels and
kvt_scale_mantissas. Run: python scripts/kvt_levels.py > native/src/pyadaq-kvt-levels.h
"""

from __future__ import annotations

from pyadaq.quants_ref import KVT_MAX_BITS, KVT_SCALE_STEPS, kvt_levels, kvt_scale_mantissas


def _c_float(v) -> str:
    """A C float literal that reads back as the float32 v."""
    s = f"{float(v):.9g}"
    return (s if any(c in s for c in ".en") else s + ".0") + "f"


def main() -> None:
    print("// Lloyd-Max levels of a unit Gaussian for 1..7 bits (ascending), and the mantissas 2^(k/8) of the")
    print("// scale codes: the tables of pyadaq's transform-coded KV-cache types, one home for the CPU")
    print("// reference (native/src/pyadaq-kvt.c) and the CUDA kernels (native/cuda/pyadaq-kvt-block.h).")
    print("// Written by scripts/kvt_levels.py (pyadaq.quants_ref.kvt_levels, kvt_scale_mantissas);")
    print("// tests/test_kvt.py checks them against the numpy twin.")
    print()
    print("#pragma once")
    print()
    for b in range(1, KVT_MAX_BITS + 1):
        vals = ", ".join(_c_float(v) for v in kvt_levels(b))
        print(f"#define PYADAQ_KVT_LEVELS_{b} {{ {vals} }}")
    vals = ", ".join(_c_float(v) for v in kvt_scale_mantissas())
    print(f"#define PYADAQ_KVT_SCALE_MANTISSAS {{ {vals} }}  // {KVT_SCALE_STEPS} per octave")


if __name__ == "__main__":
    main()
