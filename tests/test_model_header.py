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


def test_metadata_that_is_not_utf8_is_refused(tiny_model, tmp_path):
    """llama_cpp decodes metadata keys and string values strictly (a UnicodeDecodeError from
    inside pyadaq.Llama otherwise): the header check says which entry is not UTF-8."""
    import pytest

    data = bytearray(tiny_model().read_bytes())
    name = b"general.architecture"
    at = data.index(name)
    data[at + 2] = 0xFF  # "ge\\xffneral.architecture"
    bad = tmp_path / "bad-key.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(pyadaq.ModelFileError, match=r"the name of metadata entry .* is not UTF-8"):
        pyadaq.Llama(str(bad), n_ctx=64)
    data = bytearray(tiny_model().read_bytes())
    value = data.index(b"llama", data.index(name) + len(name))  # the architecture's value
    data[value] = 0xC3  # a lead byte without its continuation
    bad.write_bytes(bytes(data))
    with pytest.raises(pyadaq.ModelFileError, match=r"general\.architecture' is not UTF-8"):
        pyadaq.read_model_info(bad)
