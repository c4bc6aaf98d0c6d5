"""The GGUF header reader's bookkeeping: a model file is hashed once per version of it."""

from __future__ import annotations

import os

import pyadaq
from pyadaq.model import header


def test_sha256_once_per_file_version(tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_model().read_bytes())
    calls = []
    real = header.hashlib.sha256

    def counting(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(header.hashlib, "sha256", counting)
    first = pyadaq.read_model_info(path).sha256
    assert pyadaq.read_model_info(path).sha256 == first and header.file_sha256(path) == first
    assert len(calls) == 1  # three readers, one hash
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed (as far as we can know)
    assert pyadaq.read_model_info(path).sha256 == first
    assert len(calls) == 2
