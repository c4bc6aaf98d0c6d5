"""`pyadaq types`: the KV-cache types this build offers."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("types", help="list the supported KV-cache types")
    p.add_argument("--research", action="store_true", help="include the format candidates")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..types import cache_types

    print(f"{'name':<11} {'id':>4} {'block':>5} {'bytes':>5} {'bits/value':>10}  origin")
    for t in cache_types(research=args.research):
        print(f"{t.name:<11} {t.id:>4} {t.block_size:>5} {t.type_size:>5} {t.bits_per_value:>10.3f}  "
              f"{t.origin}{' (research)' if t.research else ''}")
    return 0
