"""Read what pyadaq needs from a GGUF model file: header and metadata only, no tensor data.

``read_model_info(path)`` parses the GGUF header, the key/value metadata and the tensor
infos (names, shapes, types, offsets) with a small pure-Python parser over a memory map, so
only the first few megabytes of the file are touched however large the model is. It checks
the file the way llama.cpp's loader would before any native code sees it, and raises a
:class:`ModelFileError` subclass naming the path for a missing file, a file that is not GGUF,
an unsupported GGUF version, or a truncated file (metadata cut short, or tensor data that
would extend past the end of the file).

The hyper-parameters follow llama.cpp's ``llama_model::load_hparams`` (the copy vendored in
llama-cpp-python 0.3.36): head sizes default to ``n_embd // n_head``; SWA layers may have
their own head sizes (``attention.key_length_swa`` / ``value_length_swa``); which layers use
the sliding window follows ``attention.sliding_window_pattern`` (a period or a per-layer bool
array) with each architecture's default period.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = [
    "GGUF_MAGIC",
    "SUPPORTED_GGUF_VERSIONS",
    "ModelFileError",
    "ModelNotFoundError",
    "NotGGUFError",
    "TruncatedModelError",
    "UnsupportedGGUFVersionError",
    "ModelInfo",
    "TensorInfo",
    "read_model_info",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)  # llama.cpp rejects v1 and anything newer than 3
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4

# Arrays with more elements than this are skipped, not decoded (tokenizer vocabularies and
# merges); per-layer hyper-parameter arrays are far shorter.
_MAX_DECODED_ARRAY = 4096


class ModelFileError(ValueError):
    """A model file that llama.cpp could not load: missing, not GGUF, truncated, ..."""

    def __init__(self, message: str, path: Union[str, os.PathLike, None] = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


class ModelNotFoundError(ModelFileError, FileNotFoundError):
    """The model path does not exist (or is not a regular file)."""

    def __init__(self, message: str, path: Union[str, os.PathLike, None] = None) -> None:
        # not OSError's (errno, strerror, filename) form: str() stays the message
        ModelFileError.__init__(self, message, path)


class NotGGUFError(ModelFileError):
    """The file does not start with the GGUF magic."""


class TruncatedModelError(ModelFileError):
    """The header/metadata is cut short or the tensor data extends past the end of the file."""


class UnsupportedGGUFVersionError(ModelFileError):
    """A GGUF version llama.cpp does not read (v1, newer than v3, or foreign byte order)."""


# GGUF metadata value types (gguf.h: enum gguf_type)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = (
    range(13)
)
_SCALAR_FMT = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
    _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}
_SCALAR_SIZE = {t: struct.calcsize(f) for t, f in _SCALAR_FMT.items()}
_NP_DTYPE = {
    _UINT8: "<u1", _INT8: "<i1", _UINT16: "<u2", _INT16: "<i2", _UINT32: "<u4", _INT32: "<i4",
    _FLOAT32: "<f4", _BOOL: "<u1", _UINT64: "<u8", _INT64: "<i8", _FLOAT64: "<f8",
}

# Architectures whose sliding-window layers follow a period (llama.cpp's load_swa_pattern
# default for the arch, and whether the dense layer comes first in each period). A
# `sliding_window_pattern` key in the file overrides the period or gives a per-layer array.
_SWA_DEFAULT_PATTERN: Dict[str, Tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "gemma4": (0, False),  # always a per-layer array in the file
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "gpt-oss": (2, False),
    "olmo2": (4, False),
    "afmoe": (4, False),
    "exaone-moe": (4, False),
    "mellum": (4, False),
    "plamo3": (8, False),
    "smallthinker": (4, True),
}
# Architectures whose first N layers alone hold a KV cache (the rest reuse it).
_FIXED_KV_LAYERS = {"gemma3n": 20}


class _Skipped:
    """Placeholder for a large metadata array that was not decoded."""

    __slots__ = ("type", "count")

    def __init__(self, type_: int, count: int) -> None:
        self.type = type_
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"<array of {self.count} x gguf type {self.type}, not decoded>"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: Tuple[int, ...]  # ggml order (ne0 first)
    type_id: int
    offset: int  # relative to the start of the data region
    nbytes: int


@dataclass
class ModelInfo:
    """Header-level facts about a GGUF model (see module doc)."""

    path: Path
    file_size: int
    gguf_version: int
    architecture: str
    name: Optional[str]
    n_layer: int
    n_embd: int
    n_head: Union[int, List[int]]
    n_head_kv: Union[int, List[int]]
    head_size_k: int
    head_size_v: int
    head_size_k_swa: int
    head_size_v_swa: int
    n_ctx_train: int
    sliding_window: int  # 0: no sliding window
    swa_layers: Optional[Tuple[bool, ...]]  # per layer; None when SWA is on but the layout unknown
    n_layer_kv: int  # layers that hold their own KV cache (from the start)
    n_layer_nextn: int  # trailing MTP/NextN layers, not in the main context's cache
    file_type: Optional[int]
    alignment: int
    data_offset: int
    data_end: int  # data_offset + the furthest tensor end
    n_tensors: int
    tensors: List[TensorInfo] = field(repr=False, default_factory=list)
    metadata: Dict[str, Any] = field(repr=False, default_factory=dict)

    # --- per layer --------------------------------------------------------------------
    def _per_layer(self, v: Union[int, List[int]], il: int) -> int:
        if isinstance(v, list):
            return int(v[il])
        return int(v)

    def n_head_layer(self, il: int) -> int:
        return self._per_layer(self.n_head, il)

    def n_head_kv_layer(self, il: int) -> int:
        return self._per_layer(self.n_head_kv, il)

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers[il]) if self.swa_layers else False

    def head_size_k_layer(self, il: int) -> int:
        return self.head_size_k_swa if self.is_swa(il) else self.head_size_k

    def head_size_v_layer(self, il: int) -> int:
        return self.head_size_v_swa if self.is_swa(il) else self.head_size_v

    def cache_layers(self) -> List[int]:
        """Layers of the main context that own K/V cache tensors."""
        n = self.n_layer - self.n_layer_nextn
        return [il for il in range(min(n, self.n_layer_kv)) if self.n_head_kv_layer(il) > 0]

    def head_sizes_k(self) -> List[int]:
        """The distinct K head sizes a cache type must divide (SWA ones included)."""
        return self._head_sizes(self.head_size_k, self.head_size_k_swa)

    def head_sizes_v(self) -> List[int]:
        return self._head_sizes(self.head_size_v, self.head_size_v_swa)

    def _head_sizes(self, full: int, swa: int) -> List[int]:
        if self.sliding_window > 0 and self.swa_layers is None:
            # SWA layout unknown for this arch: check both sizes
            return sorted({full, swa})
        return sorted({swa if self.is_swa(il) else full for il in self.cache_layers()} or {full})

    @property
    def has_swa(self) -> bool:
        return self.sliding_window > 0 and any(self.swa_layers or ())

    # --- lazy -------------------------------------------------------------------------
    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of the whole file (computed on first access, then cached)."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


class _Reader:
    def __init__(self, buf, path: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path
        self.what = "the GGUF header"

    def need(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self.size:
            raise TruncatedModelError(
                f"{self.path} is truncated (or its metadata is corrupt): {self.what} needs bytes up "
                f"to offset {p + n} but the file has only {self.size} bytes", self.path)
        self.pos = p + n
        return p

    def scalar(self, t: int):
        p = self.need(_SCALAR_SIZE[t])
        return struct.unpack_from(_SCALAR_FMT[t], self.buf, p)[0]

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.need(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.need(8))[0]

    def string(self) -> str:
        n = self.u64()
        p = self.need(n)
        return bytes(self.buf[p:p + n]).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.need(self.u64())

    def value(self, t: int):
        if t in _SCALAR_FMT:
            return self.scalar(t)
        if t == _STRING:
            return self.string()
        if t == _ARRAY:
            at = self.u32()
            n = self.u64()
            return self.array(at, n)
        raise ModelFileError(f"{self.path}: invalid GGUF value type {t} in {self.what}", self.path)

    def array(self, at: int, n: int):
        if at in _SCALAR_FMT:
            size = _SCALAR_SIZE[at]
            p = self.need(n * size)
            if n > _MAX_DECODED_ARRAY:
                return _Skipped(at, n)
            vals = list(struct.unpack_from(f"<{n}{_SCALAR_FMT[at][1]}", self.buf, p)) if n else []
            return [bool(v) for v in vals] if at == _BOOL else vals
        if at == _STRING:
            if n > _MAX_DECODED_ARRAY:
                for _ in range(n):
                    self.skip_string()
                return _Skipped(at, n)
            return [self.string() for _ in range(n)]
        if at == _ARRAY:
            return [self.value(_ARRAY) for _ in range(n)] if n <= _MAX_DECODED_ARRAY else self._skip_arrays(n)
        raise ModelFileError(f"{self.path}: invalid GGUF array element type {at} in {self.what}", self.path)

    def _skip_arrays(self, n: int) -> _Skipped:
        for _ in range(n):
            self.value(_ARRAY)
        return _Skipped(_ARRAY, n)


# ggml type ids below this are upstream's (GGML_TYPE_COUNT of the pinned llama.cpp); some are
# retired (type size 0 in ggml's table), which llama.cpp's loader rejects.
_UPSTREAM_TYPE_COUNT = 43


def _type_size(type_id: int) -> Optional[Tuple[int, int]]:
    """(block size, bytes per block) of a valid ggml tensor type, or None if invalid."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        return tuple(GGML_QUANT_SIZES[GGMLQuantizationType(type_id)])  # type: ignore[return-value]
    except (ImportError, ValueError, KeyError):
        pass
    # Ask the native library, but only for ids it has table entries for: ggml indexes its type
    # table with the id unchecked.
    from .types import PYADAQ_CACHE_TYPES, PYADAQ_RESEARCH_TYPES

    pyadaq_ids = set(PYADAQ_CACHE_TYPES.values()) | set(PYADAQ_RESEARCH_TYPES.values())
    if 0 <= type_id < _UPSTREAM_TYPE_COUNT or type_id in pyadaq_ids:
        from ._native import native

        n = native()
        bs, ts = int(n.base.ggml_blck_size(type_id)), int(n.base.ggml_type_size(type_id))
        if bs > 0 and ts > 0:
            return bs, ts
    return None


def _as_int(v, key: str, path: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ModelFileError(f"{path}: metadata key '{key}' is {v!r}, expected an integer", path)
    return v


def read_model_info(path: Union[str, os.PathLike]) -> ModelInfo:
    """Parse the GGUF header, metadata and tensor infos of ``path`` (never the tensor data)."""
    p = Path(os.fspath(path))
    spath = str(p)
    if not p.exists():
        raise ModelNotFoundError(f"model file not found: {spath}", spath)
    if not p.is_file():
        raise ModelNotFoundError(f"model path is not a regular file: {spath}", spath)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise ModelFileError(f"cannot open model file {spath}: {e.strerror or e}", spath) from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 4:
            raise NotGGUFError(
                f"{spath} is not a GGUF model file ({size} bytes; expected the magic 'GGUF')", spath)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _parse(mm, size, p)
        finally:
            mm.close()


def _parse(buf, size: int, p: Path) -> ModelInfo:
    spath = str(p)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        shown = "".join(chr(c) if 32 <= c < 127 else "?" for c in magic)
        raise NotGGUFError(
            f"{spath} is not a GGUF model file: it starts with {magic!r} ('{shown}'), not 'GGUF'", spath)
    r = _Reader(buf, spath)
    r.pos = 4
    version = r.u32()
    if version & 0xFFFF == 0 and version != 0:
        raise UnsupportedGGUFVersionError(
            f"{spath}: GGUF version field is {version:#x}; the file is probably big-endian, which "
            "this build does not read", spath)
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise UnsupportedGGUFVersionError(
            f"{spath}: GGUF version {version} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_GGUF_VERSIONS))})", spath)
    n_tensors = r.u64()
    n_kv = r.u64()
    # each KV needs >= 8+1+4 bytes, each tensor info >= 8+4+8+4+8: reject absurd counts early
    if n_kv * 13 > size or n_tensors * 32 > size:
        raise TruncatedModelError(
            f"{spath} is truncated or corrupt: header claims {n_kv} metadata keys and {n_tensors} "
            f"tensors but the file has only {size} bytes", spath)

    md: Dict[str, Any] = {}
    for i in range(n_kv):
        r.what = f"metadata entry {i}"
        key = r.string()
        r.what = f"metadata key '{key}'"
        t = r.u32()
        md[key] = r.value(t)

    alignment = md.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{spath}: invalid general.alignment {alignment!r}", spath)

    tensors: List[TensorInfo] = []
    expected_offset = 0
    for i in range(n_tensors):
        r.what = f"tensor info {i}"
        name = r.string()
        r.what = f"tensor info '{name}'"
        n_dims = r.u32()
        if n_dims > GGML_MAX_DIMS:
            raise ModelFileError(f"{spath}: tensor '{name}' has {n_dims} dimensions (max {GGML_MAX_DIMS})", spath)
        shape = tuple(r.u64() for _ in range(n_dims))
        type_id = r.u32()
        offset = r.u64()
        ts = _type_size(type_id)
        if ts is None:
            raise ModelFileError(f"{spath}: tensor '{name}' has an invalid ggml type id {type_id}", spath)
        bs, tsz = ts
        ne = 1
        for d in shape:
            ne *= d
        if shape and shape[0] % bs:
            raise ModelFileError(
                f"{spath}: tensor '{name}' row length {shape[0]} is not a multiple of its type's "
                f"block size {bs}", spath)
        nbytes = ne // bs * tsz
        if offset != expected_offset:  # llama.cpp wants the tensors packed in table order
            raise ModelFileError(
                f"{spath}: tensor '{name}' has data offset {offset}, expected {expected_offset}: the "
                "tensor table is corrupt", spath)
        expected_offset += (nbytes + alignment - 1) // alignment * alignment
        tensors.append(TensorInfo(name, shape, type_id, offset, nbytes))

    data_offset = (r.pos + alignment - 1) // alignment * alignment if tensors else r.pos
    data_end = data_offset + max((t.offset + t.nbytes for t in tensors), default=0)
    if data_end > size:
        worst = max(tensors, key=lambda t: t.offset + t.nbytes)
        raise TruncatedModelError(
            f"{spath} is truncated: tensor data ends at byte {data_end} (tensor '{worst.name}') but "
            f"the file has only {size} bytes", spath)

    return _model_info(p, size, version, md, tensors, alignment, data_offset, data_end)


def _model_info(p: Path, size: int, version: int, md: Dict[str, Any], tensors: List[TensorInfo],
                alignment: int, data_offset: int, data_end: int) -> ModelInfo:
    spath = str(p)
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(f"{spath}: GGUF metadata has no general.architecture", spath)

    def get(key: str, default=None, required: bool = False):
        k = f"{arch}.{key}"
        if k in md:
            return md[k]
        if required:
            raise ModelFileError(f"{spath}: GGUF metadata lacks required key '{k}'", spath)
        return default

    n_layer = _as_int(get("block_count", required=True), f"{arch}.block_count", spath)
    n_embd = _as_int(get("embedding_length", 0), f"{arch}.embedding_length", spath)

    def per_layer(key: str, default):
        v = get(key, default)
        if isinstance(v, list):
            if len(v) != n_layer:
                raise ModelFileError(
                    f"{spath}: '{arch}.{key}' has {len(v)} entries for {n_layer} layers", spath)
            vals = [int(x) for x in v]
            return vals[0] if len(set(vals)) == 1 else vals
        if isinstance(v, _Skipped):
            raise ModelFileError(f"{spath}: '{arch}.{key}' is an array of {v.count} entries", spath)
        return _as_int(v, f"{arch}.{key}", spath)

    n_head = per_layer("attention.head_count", 0)
    n_head_kv = per_layer("attention.head_count_kv", n_head)
    n_head0 = n_head[0] if isinstance(n_head, list) else n_head
    default_head = n_embd // n_head0 if n_head0 > 0 else 0
    head_k = _as_int(get("attention.key_length", default_head), f"{arch}.attention.key_length", spath)
    head_v = _as_int(get("attention.value_length", default_head), f"{arch}.attention.value_length", spath)
    head_k_swa = _as_int(get("attention.key_length_swa", head_k), f"{arch}.attention.key_length_swa", spath)
    head_v_swa = _as_int(get("attention.value_length_swa", head_v), f"{arch}.attention.value_length_swa", spath)
    n_ctx_train = _as_int(get("context_length", 0), f"{arch}.context_length", spath)

    sw = get("attention.sliding_window", 0)
    sliding_window = int(sw) if isinstance(sw, int) and not isinstance(sw, bool) and sw > 0 else 0
    n_nextn = get("nextn_predict_layers", 0)
    n_nextn = int(n_nextn) if isinstance(n_nextn, int) and 0 <= n_nextn <= n_layer else 0
    swa_layers = _swa_layers(arch, n_layer - n_nextn, n_layer, sliding_window, get("attention.sliding_window_pattern"))

    n_layer_kv = n_layer
    if arch in _FIXED_KV_LAYERS:
        n_layer_kv = min(n_layer, _FIXED_KV_LAYERS[arch])
    shared = get("attention.shared_kv_layers")
    if isinstance(shared, int) and not isinstance(shared, bool) and 0 < shared < n_layer:
        n_layer_kv = n_layer - shared

    name = md.get("general.name")
    ftype = md.get("general.file_type")
    return ModelInfo(
        path=p, file_size=size, gguf_version=version, architecture=arch,
        name=name if isinstance(name, str) else None,
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_size_k=head_k, head_size_v=head_v, head_size_k_swa=head_k_swa, head_size_v_swa=head_v_swa,
        n_ctx_train=n_ctx_train, sliding_window=sliding_window, swa_layers=swa_layers,
        n_layer_kv=n_layer_kv, n_layer_nextn=n_nextn,
        file_type=ftype if isinstance(ftype, int) else None, alignment=alignment,
        data_offset=data_offset, data_end=data_end, n_tensors=len(tensors), tensors=tensors,
        metadata=md,
    )


def _swa_layers(arch: str, n_main: int, n_layer: int, sliding_window: int, pattern) -> Optional[Tuple[bool, ...]]:
    """Which layers use the sliding window (llama_hparams::set_swa_pattern), or None if unknown."""
    if sliding_window <= 0:
        return tuple([False] * n_layer)
    if isinstance(pattern, list):
        vals = [bool(v) for v in pattern[:n_layer]]
        return tuple(vals + [False] * (n_layer - len(vals)))
    if arch not in _SWA_DEFAULT_PATTERN:
        return None
    period, dense_first = _SWA_DEFAULT_PATTERN[arch]
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        period = pattern
    out = []
    for il in range(n_layer):
        if il >= n_main:
            out.append(False)
        elif dense_first:
            out.append(period == 0 or il % period != 0)
        else:
            out.append(period == 0 or il % period < period - 1)
    return tuple(out)
