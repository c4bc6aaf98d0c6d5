"""KV calibration files: per layer and KV head, the mean and the principal components of the keys
(as they are cached: after RoPE and any key norm) and of the values that a model computed while
reading a text. `pyadaq calibrate` writes them (pyadaq.eval.calibration); transforms and planners
read them.

The file is a GGUF file (written and read with the ``gguf`` package):

* metadata ``pyadaq.kind = "kv-calibration"`` and ``pyadaq.format = 2``; the model it belongs
  to (``pyadaq.model.sha256``, ``.name``, ``.architecture``, ``.n_layer``); per layer (arrays
  over all layers, 0 where a layer has no cache of its own) ``pyadaq.n_head_kv``,
  ``pyadaq.head_size_k``, ``pyadaq.head_size_v``, ``pyadaq.tokens``; the text
  (``pyadaq.text.sha256``, ``pyadaq.text.tokens``, ``pyadaq.n_ctx``, ``pyadaq.chunks``); and
  ``pyadaq.version``, ``pyadaq.build``, ``pyadaq.created`` (ISO date and time, UTC);
* per layer with a cache, for X in k, v: ``blk.N.X_mean`` [heads, d] (float32),
  ``blk.N.X_basis`` [heads, d, d] (float32; ``basis[h][:, j]`` is head h's j-th principal
  direction, by descending variance) and ``blk.N.X_var`` [heads, d] (float32, the variance
  along each direction, descending);
* when the model's vocabulary adds a BOS token: ``pyadaq.first_token`` (its id) and, per layer
  with a cache, ``blk.N.k_first`` and ``blk.N.v_first`` [heads, d] (float32), the key and value
  that every sequence starting with that token caches at position 0. Attention puts much of its
  weight on that token (up to half in Gemma 3's global layers), so the transforms store the
  other rows relative to it and it exactly (pyadaq.runtime.kv_transform);
* when some layer does not let a transform take its offsets out (libllama's
  ``pyadaq_model_kv_offsets``: soft-capped attention logits keep the keys' offset in, learned
  attention sinks both), ``pyadaq.offsets_kept.k`` and ``pyadaq.offsets_kept.v``: the layers
  whose key or value offset stays in the data (arrays of layer indices; absent: none), and
  ``pyadaq.offsets_kept = true`` saying that they were recorded. Files made before (format 2
  still) lack the record: ``offsets_kept`` is then None, and ``pyadaq calibrate``'s cache
  fills it in from the model when it reads such a file. Those parts are stored about zero, not
  about an offset (pyadaq.runtime.kv_transform.part_offset).

Format 1 files (without the first-token rows) are still read.

``read_calibration`` checks everything it reads (kind, version, shapes against the metadata,
finite values, orthonormal bases, descending variances) and raises ``CalibrationFileError``
with the file and the entry named; ``check_for_model`` says whether a calibration belongs to a
model (sha256, layers, heads, head sizes) and raises ``CalibrationMismatchError`` otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyadaq._atomic import atomic_path
from pyadaq.model.header import ModelInfo

KIND = "kv-calibration"
FORMAT = 2
READS = (1, 2)  # format 1: no first-token rows
ARCH = "pyadaq-kv-calibration"

__all__ = [
    "Calibration",
    "CalibrationFileError",
    "CalibrationMismatchError",
    "Components",
    "calibration_for_model",
    "check_finite",
    "check_for_model",
    "components_from_moments",
    "read_calibration",
    "write_calibration",
]


class CalibrationFileError(ValueError):
    """A calibration file that cannot be used: missing, not GGUF, not a calibration, truncated,
    inconsistent."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


class CalibrationMismatchError(CalibrationFileError):
    """A valid calibration made for another model (or another shape of it)."""


@dataclass(frozen=True)
class Components:
    """One layer's K or V: per KV head the mean [heads, d], the principal directions
    [heads, d, d] (columns, by descending variance) and the variances [heads, d]."""

    mean: np.ndarray
    basis: np.ndarray
    var: np.ndarray

    @property
    def n_head(self) -> int:
        return int(self.mean.shape[0])

    @property
    def head_size(self) -> int:
        return int(self.mean.shape[1])

    def covariance(self) -> np.ndarray:
        """[heads, d, d]: basis . diag(var) . basis^T."""
        return np.einsum("hij,hj,hkj->hik", self.basis, self.var, self.basis)


def components_from_moments(rows: int, gram: np.ndarray, sums: np.ndarray) -> Components:
    """Mean, covariance and its eigenbasis from the Gram matrices [heads, d, d] and the row sums
    [heads, d] of `rows` rows (pyadaq.eval.analyze.Moments)."""
    if rows <= 1:
        raise ValueError(f"a covariance needs at least two rows, got {rows}")
    mean = sums / rows
    cov = gram / rows - mean[:, :, None] * mean[:, None, :]
    cov = 0.5 * (cov + cov.transpose(0, 2, 1))
    var, basis = np.linalg.eigh(cov)  # ascending
    var, basis = var[:, ::-1], basis[:, :, ::-1]
    # a sign convention, so that the same data gives the same file: each direction's largest
    # component is positive
    idx = np.abs(basis).argmax(axis=1)  # [heads, d]
    sign = np.sign(np.take_along_axis(basis, idx[:, None, :], axis=1))[:, 0, :]
    basis = basis * np.where(sign == 0, 1.0, sign)[:, None, :]
    return Components(mean.astype(np.float32), np.ascontiguousarray(basis, dtype=np.float32),
                      np.clip(var, 0.0, None).astype(np.float32))


@dataclass(frozen=True)
class Calibration:
    model_sha256: str
    model_name: str
    architecture: str
    n_layer: int
    n_head_kv: tuple[int, ...]  # per layer; 0: no cache of its own
    head_size_k: tuple[int, ...]
    head_size_v: tuple[int, ...]
    tokens: tuple[int, ...]  # rows captured per layer
    text_sha256: str
    text_tokens: int
    n_ctx: int
    chunks: int
    pyadaq_version: str
    build: str
    created: str
    k: dict[int, Components]
    v: dict[int, Components]
    path: Path | None = None
    first_token: int | None = None  # the BOS token whose rows k_first / v_first are; None: not recorded
    k_first: dict[int, np.ndarray] | None = None  # per layer [heads, d]
    v_first: dict[int, np.ndarray] | None = None
    # (layer, is_v) whose offset the model keeps in the data (soft-capped logits, attention
    # sinks); None: not recorded (a file made before the record existed)
    offsets_kept: frozenset[tuple[int, bool]] | None = frozenset()

    def __post_init__(self) -> None:
        if self.offsets_kept is not None:  # one form, whatever ints or bools it was given
            object.__setattr__(self, "offsets_kept",
                               frozenset((int(il), bool(is_v)) for il, is_v in self.offsets_kept))

    def layers(self) -> list[int]:
        return sorted(self.k)

    @property
    def fingerprint(self) -> str:
        """Hex sha256 of the transforms (every layer's K and V means, bases and first-token rows):
        two calibrations with the same fingerprint store a cache in the same coordinates."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            import hashlib

            h = hashlib.sha256()
            for il in self.layers():
                for comps in (self.k[il], self.v[il]):
                    h.update(np.ascontiguousarray(comps.mean, dtype=np.float32).tobytes())
                    h.update(np.ascontiguousarray(comps.basis, dtype=np.float32).tobytes())
                if self.k_first is not None:
                    for rows in (self.k_first[il], self.v_first[il]):
                        h.update(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
            if self.offsets_kept:  # (absent from the hash when empty: earlier fingerprints stand)
                h.update(repr(sorted(self.offsets_kept)).encode())
            fp = h.hexdigest()
            object.__setattr__(self, "_fingerprint", fp)
        return fp


def write_calibration(cal: Calibration, path: str | os.PathLike) -> Path:
    """Writes cal as a GGUF file at path (atomically: a temporary file renamed into place)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            w.add_string("pyadaq.kind", KIND)
            w.add_uint32("pyadaq.format", FORMAT)
            w.add_string("pyadaq.model.sha256", cal.model_sha256)
            w.add_string("pyadaq.model.name", cal.model_name)
            w.add_string("pyadaq.model.architecture", cal.architecture)
            w.add_uint32("pyadaq.model.n_layer", cal.n_layer)
            for key in ("n_head_kv", "head_size_k", "head_size_v", "tokens"):
                w.add_array(f"pyadaq.{key}", [int(x) for x in getattr(cal, key)])
            w.add_string("pyadaq.text.sha256", cal.text_sha256)
            w.add_uint64("pyadaq.text.tokens", cal.text_tokens)
            w.add_uint32("pyadaq.n_ctx", cal.n_ctx)
            w.add_uint32("pyadaq.chunks", cal.chunks)
            w.add_string("pyadaq.version", cal.pyadaq_version)
            w.add_string("pyadaq.build", cal.build)
            w.add_string("pyadaq.created", cal.created)
            if cal.first_token is not None:
                w.add_uint32("pyadaq.first_token", cal.first_token)
            if cal.offsets_kept is not None:
                w.add_bool("pyadaq.offsets_kept", True)
                for kind, is_v in (("k", False), ("v", True)):
                    kept = sorted(il for il, v in cal.offsets_kept if v == is_v)
                    if kept:
                        w.add_array(f"pyadaq.offsets_kept.{kind}", kept)
            for il in cal.layers():
                for kind, comps in (("k", cal.k[il]), ("v", cal.v[il])):
                    w.add_tensor(f"blk.{il}.{kind}_mean", np.ascontiguousarray(comps.mean, dtype=np.float32))
                    w.add_tensor(f"blk.{il}.{kind}_basis", np.ascontiguousarray(comps.basis, dtype=np.float32))
                    w.add_tensor(f"blk.{il}.{kind}_var", np.ascontiguousarray(comps.var, dtype=np.float32))
                    if cal.first_token is not None:
                        rows = (cal.k_first if kind == "k" else cal.v_first)[il]
                        w.add_tensor(f"blk.{il}.{kind}_first", np.ascontiguousarray(rows, dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return path


def _field(reader, key: str, path: str):
    f = reader.fields.get(key)
    if f is None:
        raise CalibrationFileError(f"{path}: not a pyadaq KV calibration file (no '{key}')", path)
    try:
        return f.contents()
    except Exception as e:  # a field whose bytes do not decode
        raise CalibrationFileError(f"{path}: metadata '{key}' is corrupt ({e})", path) from None


def read_calibration(path: str | os.PathLike) -> Calibration:
    """The calibration in path, checked (see the module doc); CalibrationFileError otherwise."""
    spath = os.fspath(path)
    p = Path(spath)
    if not p.is_file():
        raise CalibrationFileError(f"calibration file not found: {spath}", spath)
    import gguf

    try:
        reader = gguf.GGUFReader(spath)
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError, ...
        raise CalibrationFileError(f"{spath} is not a readable GGUF file ({type(e).__name__}: {e})", spath) from None
    if _field(reader, "pyadaq.kind", spath) != KIND:
        raise CalibrationFileError(f"{spath}: not a pyadaq KV calibration file", spath)
    version = _field(reader, "pyadaq.format", spath)
    if version not in READS:
        raise CalibrationFileError(f"{spath}: calibration format {version}, this pyadaq reads "
                                   f"{', '.join(map(str, READS))}", spath)
    first_token = None
    if version >= 2 and "pyadaq.first_token" in reader.fields:
        first_token = int(_field(reader, "pyadaq.first_token", spath))
    meta = {k: _field(reader, f"pyadaq.{k}", spath) for k in (
        "model.sha256", "model.name", "model.architecture", "model.n_layer", "n_head_kv", "head_size_k",
        "head_size_v", "tokens", "text.sha256", "text.tokens", "n_ctx", "chunks", "version", "build", "created")}
    n_layer = int(meta["model.n_layer"])
    kept = set()
    for kind, is_v in (("k", False), ("v", True)):
        key = f"pyadaq.offsets_kept.{kind}"
        if key not in reader.fields:
            continue
        vals = _field(reader, key, spath)
        if not isinstance(vals, list) or any(not isinstance(x, int) or not 0 <= x < n_layer for x in vals):
            raise CalibrationFileError(f"{spath}: '{key}' must list layer indices below {n_layer}", spath)
        kept |= {(x, is_v) for x in vals}
    per_layer = {}
    for key in ("n_head_kv", "head_size_k", "head_size_v", "tokens"):
        vals = meta[key]
        if not isinstance(vals, list) or len(vals) != n_layer or any(int(x) < 0 for x in vals):
            raise CalibrationFileError(f"{spath}: 'pyadaq.{key}' must list {n_layer} non-negative "
                                       "values, one per layer", spath)
        per_layer[key] = tuple(int(x) for x in vals)
    tensors = {t.name: t for t in reader.tensors}

    def tensor(name: str, shape: tuple) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise CalibrationFileError(f"{spath}: tensor '{name}' is missing", spath)
        a = np.asarray(t.data)
        if a.dtype != np.float32 or a.size != int(np.prod(shape)):
            raise CalibrationFileError(f"{spath}: tensor '{name}' should hold {shape} float32 values, "
                                       f"has {a.size} {a.dtype}", spath)
        a = a.reshape(shape)
        if not np.isfinite(a).all():
            raise CalibrationFileError(f"{spath}: tensor '{name}' has non-finite values", spath)
        return np.array(a)

    comps: dict[str, dict[int, Components]] = {"k": {}, "v": {}}
    first: dict[str, dict[int, np.ndarray]] = {"k": {}, "v": {}}
    for il in range(n_layer):
        heads = per_layer["n_head_kv"][il]
        if heads == 0:
            continue
        for kind in ("k", "v"):
            d = per_layer[f"head_size_{kind}"][il]
            arrs = {part: tensor(f"blk.{il}.{kind}_{part}", shape)
                    for part, shape in (("mean", (heads, d)), ("basis", (heads, d, d)), ("var", (heads, d)))}
            if first_token is not None:
                first[kind][il] = tensor(f"blk.{il}.{kind}_first", (heads, d))
            basis, var = arrs["basis"], arrs["var"]
            eye_err = np.abs(np.einsum("hji,hjk->hik", basis.astype(np.float64), basis) - np.eye(d)).max()
            if eye_err > 1e-3:
                raise CalibrationFileError(f"{spath}: layer {il} {kind.upper()} bases are not orthonormal "
                                           f"(off by {eye_err:.2g}): the file is corrupt", spath)
            if (var < 0).any() or (np.diff(var, axis=1) > 1e-6 * np.maximum(var[:, :1], 1e-30)).any():
                raise CalibrationFileError(f"{spath}: layer {il} {kind.upper()} variances must be "
                                           "non-negative and descending", spath)
            comps[kind][il] = Components(arrs["mean"], basis, var)
    return Calibration(
        model_sha256=str(meta["model.sha256"]), model_name=str(meta["model.name"]),
        architecture=str(meta["model.architecture"]), n_layer=n_layer, **per_layer,
        text_sha256=str(meta["text.sha256"]), text_tokens=int(meta["text.tokens"]), n_ctx=int(meta["n_ctx"]),
        chunks=int(meta["chunks"]), pyadaq_version=str(meta["version"]), build=str(meta["build"]),
        created=str(meta["created"]), k=comps["k"], v=comps["v"], path=p, first_token=first_token,
        k_first=first["k"] if first_token is not None else None,
        v_first=first["v"] if first_token is not None else None,
        offsets_kept=frozenset(kept) if "pyadaq.offsets_kept" in reader.fields else None,
    )


def check_finite(cal: Calibration) -> None:
    """CalibrationFileError when a calibration holds a value that is not finite (one made or
    edited in Python: read_calibration checks what it reads)."""
    where = f"{cal.path}" if cal.path else "the calibration"
    for il in cal.layers():
        for kind, comps, first in (("K", cal.k[il], cal.k_first), ("V", cal.v[il], cal.v_first)):
            parts = {"mean": comps.mean, "basis": comps.basis, "variances": comps.var}
            if first is not None:
                parts["first-token row"] = first[il]
            for name, a in parts.items():
                if not np.isfinite(a).all():
                    raise CalibrationFileError(f"{where}: layer {il} {kind} {name} holds values that are not finite",
                                               cal.path)


def check_for_model(cal: Calibration, info: ModelInfo) -> None:
    """CalibrationMismatchError unless cal was made for this model: the same file (sha256), and
    the same layers, KV heads and head sizes."""
    where = f"{cal.path}" if cal.path else "the calibration"
    if cal.model_sha256 != info.sha256:
        raise CalibrationMismatchError(
            f"{where} was made for another model ('{cal.model_name}', sha256 {cal.model_sha256[:16]}…), "
            f"not {info.path.name} (sha256 {info.sha256[:16]}…): run `pyadaq calibrate --model {info.path}`",
            cal.path)
    if cal.n_layer != info.n_layer:
        raise CalibrationMismatchError(f"{where} has {cal.n_layer} layers, {info.path.name} has {info.n_layer}",
                                       cal.path)
    cache = set(info.cache_layers())
    for il in range(info.n_layer):
        want = (info.n_head_kv_layer(il), info.head_size_k_layer(il), info.head_size_v_layer(il)) \
            if il in cache else (0, 0, 0)
        got = (cal.n_head_kv[il], cal.head_size_k[il], cal.head_size_v[il])
        if got != want:
            raise CalibrationMismatchError(
                f"{where}: layer {il} has (KV heads, K head size, V head size) {got}, the model {want}", cal.path)


def calibration_for_model(cal: Calibration | str | os.PathLike, info: ModelInfo) -> Calibration:
    """A calibration (or the file holding one) read, checked, and checked against the model:
    CalibrationFileError / CalibrationMismatchError otherwise."""
    if not isinstance(cal, Calibration):
        cal = read_calibration(cal)
    else:
        check_finite(cal)  # a file's values are checked as it is read
    check_for_model(cal, info)
    return cal
