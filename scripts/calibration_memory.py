"""Memory of a calibrated context on the embedded model: the KV cache llama.cpp allocated and the
buffers of the calibration's K/V transforms, at n_ctx 4096 (swa_full=False).
Run: python scripts/calibration_memory.py
"""

from __future__ import annotations

import pyadaq
from pyadaq.eval.calibration import calibrate


def main() -> None:
    path = pyadaq.embedded_model_path()
    cal = calibrate(path, progress=False)
    for k, v in (("f16", "f16"), ("q4_0", "kvq2"), ("kvt4s", "q4_0"), ("kvt4s", "kvq2"), ("q8_0", "kvt2"),
                 ("kvt4s", "kvt2")):
        llm = pyadaq.Llama(path, kv_calibration=cal, cache_type_k=k, cache_type_v=v, n_ctx=4096, swa_full=False)
        try:
            print(f"{k}:{v}  KV cache {llm.kv_cache_bytes / 2**20:6.2f} MiB  transforms "
                  f"{llm.kv_transform_bytes / 2**20:5.2f} MiB")
        finally:
            llm.close()


if __name__ == "__main__":
    main()
