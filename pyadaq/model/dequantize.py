"""A copy of a GGUF model with its weights in float32 (the token embedding in float16), for
measuring what a KV cache type costs without the model's own rounding noise.

Why: llama.cpp multiplies a quantized weight (Q4_K, Q8_0, ...) with activations that it first
rounds to 8 bits (the weight type's vec_dot_type, q8_K or q8_0), and that rounding is not a
smooth function of the activations. Any change to an attention output, however small, flips some
of those roundings in the next layer and decorrelates the two runs by what 8-bit activations
cost: on the embedded Gemma 3 270M (Q4_K_M), switching flash attention off with an f16 cache,
which changes nothing but the order of float operations, costs a KL of about 0.006 against the
same cache with it on, and every cache type pays that floor on top of its own error. With
float32 weights the activations are never rounded, and the same switch costs nothing
(docs/KL_FLOOR.md, `scripts/kl_floor.py`).

The copy keeps every metadata entry (``general.file_type`` becomes 0, all float32) and every
tensor's name and shape; tensors are dequantized with the ``gguf`` package one at a time and
streamed to the file. Copies are cached under ``$PYADAQ_CACHE_DIR/models/dequantized`` by the
source's sha256. A float32 copy is about four bytes per weight (743 MB for the embedded model).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pyadaq import _paths
from pyadaq._atomic import atomic_path
from pyadaq.model.header import ModelFileError, read_model_info

__all__ = ["dequantized_copy", "write_dequantized"]

FORMAT = 1
_HALF = {"token_embd.weight"}  # looked up by row (and the tied output): f16 rounds it finely enough


def write_dequantized(src: str | os.PathLike, dst: str | os.PathLike, progress: bool = True) -> Path:
    """Writes the float32 copy of the GGUF model src to dst (atomically)."""
    import gguf
    from gguf.quants import dequantize
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    read_model_info(src)  # a clear ModelFileError for a missing or broken file before the gguf package reads it
    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as e:
        raise ModelFileError(f"{src}: the gguf package cannot read it ({type(e).__name__}: {e})", str(src)) from None
    arch = reader.fields["general.architecture"].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            for name, f in reader.fields.items():
                if name.startswith("GGUF.") or name == "general.architecture":
                    continue
                if name == "general.file_type":
                    w.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
                    continue
                vtype = f.types[0]
                sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
                w.add_key_value(name, f.contents(), vtype, sub_type=sub)
            w.add_uint32("pyadaq.dequantized.format", FORMAT)
            shapes = []
            for t in reader.tensors:
                shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # numpy order
                dtype = np.float16 if t.name in _HALF else np.float32
                shapes.append((shape, dtype))
                w.add_tensor_info(t.name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t, (shape, dtype) in tqdm(list(zip(reader.tensors, shapes)), desc=f"dequantizing {src.name}",
                                          disable=not progress):
                a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
                w.write_tensor_data(a.astype(dtype))
        finally:
            w.close()
    return dst


def dequantized_copy(src: str | os.PathLike, progress: bool = True) -> Path:
    """The float32 copy of src from the cache, written there first if it is not."""
    info = read_model_info(src)
    out = _paths.cache_dir("models", "dequantized") / f"{info.path.stem}-f32-{info.sha256[:16]}-v{FORMAT}.gguf"
    if not out.exists():
        write_dequantized(info.path, out, progress)
    return out
