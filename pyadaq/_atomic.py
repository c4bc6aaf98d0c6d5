"""Files written whole or not at all: the data goes to a temporary file next to the target,
which then replaces it (os.replace), so an interrupted run (Ctrl-C, a crash) leaves either the
old file or the new one, never a half-written cache entry."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path in path's directory for the block to write (for writers that open files
    themselves, like gguf.GGUFWriter), moved to path when the block ends; on any failure
    (KeyboardInterrupt included) the temporary file is removed and path is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file in path's directory, then move it to path (see
    atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "xb") as fh:
        write(fh)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace path's contents with data, atomically."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace path's contents with text, atomically."""
    atomic_write_bytes(path, text.encode(encoding))
