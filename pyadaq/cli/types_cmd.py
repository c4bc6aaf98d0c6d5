"""`pyadaq types`: the KV-cache types this build offers."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("types", help="list the supported KV-cache types")
    p.add_argument("--research", action="store_true", help="include the format candidates")
    p.set_defaults(func=run)


def run(args) -> int:
    from pyadaq._native import native
    from pyadaq.types import CUDA_FA_PAIR_TYPES, CUDA_KVT_FA_PAIRS, cache_types

    print(f"{'name':<11} {'id':>4} {'block':>5} {'bytes':>5} {'bits/value':>10}  {'CUDA':<4}  origin")
    for t in cache_types(research=args.research):
        print(f"{t.name:<11} {t.id:>4} {t.block_size:>5} {t.type_size:>5} {t.bits_per_value:>10.3f}  "
              f"{'yes' if t.cuda else '-':<4}  {t.origin}{' (research)' if t.research else ''}")
    gpu = "This build has a GPU backend" if native().gpu_devices() else \
        "This build is CPU-only (CUDA: `make install CMAKE_ARGS=-DGGML_CUDA=ON`)"
    print(f"\nCUDA: the cache's writes and flash attention run on an NVIDIA GPU; every K/V pair among "
          f"{', '.join(CUDA_FA_PAIR_TYPES)} has a compiled generation kernel, and so have "
          f"{len(CUDA_KVT_FA_PAIRS)} pairs with a kvt type (keys kvt2s/kvt3s/kvt4s with values f16, q8_0, q4_0, "
          f"kvq2, kvq3, kvt1-4; keys f16, q8_0, q4_0 with values kvt1-4; keys f16, q8_0, q4_0, kvt2s-4s with "
          f"values kvt2r, kvt3r, heads of 256). Other types keep a GPU "
          f"model's cache in CPU memory (offload_kqv=False). {gpu}.")
    return 0
