"""pyadaq's cache directory, the one definition (native/cmake/cache_dir.cmake applies the same
rule for the build's download cache): ``$PYADAQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyadaq``,
else ``~/.cache/pyadaq``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_base", "cache_dir"]


def cache_base() -> Path:
    """pyadaq's cache directory: $PYADAQ_CACHE_DIR, else $XDG_CACHE_HOME/pyadaq or ~/.cache/pyadaq."""
    base = os.environ.get("PYADAQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pyadaq")
    return Path(base)


def cache_dir(*parts: str) -> Path:
    """A subdirectory of :func:`cache_base` (not created)."""
    return cache_base().joinpath(*parts)
