"""Print the Lloyd-Max levels of a unit Gaussian for 1..7 bits as the C tables of
native/src/pyadaq-kvt.c (the levels of the transform-coded KV-cache types), computed by
pyadaq.quants_ref.kvt_levels. Run: python scripts/kvt_levels.py
"""

from __future__ import annotations

from pyadaq.quants_ref import KVT_MAX_BITS, kvt_levels


def main() -> None:
    print("// Lloyd-Max levels of a unit Gaussian for 1..7 bits (ascending), from")
    print("// scripts/kvt_levels.py (pyadaq.quants_ref.kvt_levels).")
    for b in range(1, KVT_MAX_BITS + 1):
        vals = ", ".join(f"{float(v):.9g}f" for v in kvt_levels(b))
        print(f"static const float kvt_levels_{b}[{2 ** b}] = {{ {vals} }};")


if __name__ == "__main__":
    main()
