"""The patch step of the build: idempotent, and loud when a patch no longer applies."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATCH_SCRIPT = ROOT / "native" / "cmake" / "patch_upstream.cmake"
PATCHES = sorted((ROOT / "native" / "patches").glob("*.patch"))


def _touched_files() -> list[str]:
    files = []
    for p in PATCHES:
        for line in p.read_text().splitlines():
            if line.startswith("+++ b/"):
                files.append(line[len("+++ b/"):])
    return sorted(set(files))


def _pinned_sdist() -> Path:
    text = (ROOT / "native" / "UPSTREAM.cmake").read_text()
    name = text.split('PYADAQ_UPSTREAM_SDIST')[1].split('"')[1]
    from pyadaq._paths import cache_base

    # where native/cmake/fetch_upstream.cmake caches it
    if (cache_base() / name).exists():
        return cache_base() / name
    pytest.fail(f"the pinned sdist {name} is not in {cache_base()}; the build puts it there")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The files the patches touch, straight from the pinned sdist."""
    out = tmp_path_factory.mktemp("pristine")
    with tarfile.open(_pinned_sdist()) as tar:
        top = tar.getnames()[0].split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        for rel in _touched_files():
            member = tar.getmember(prefix + rel)
            data = tar.extractfile(member).read()
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
    return out


def run_patch(src: Path, dst: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(
        ["cmake", f"-DPYADAQ_UPSTREAM_SOURCE_DIR={src}", "-DPYADAQ_UPSTREAM_ID=test",
         f"-DPYADAQ_PATCHED_DIR={dst}", "-P", str(PATCH_SCRIPT)],
        capture_output=True, text=True, timeout=120,
    )
    res.stderr = " ".join(res.stderr.split())  # CMake wraps long messages
    return res


def test_patches_apply_once_then_skip(pristine, tmp_path):
    dst = tmp_path / "llama.cpp"
    first = run_patch(pristine, dst)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("applied ") + first.stderr.count("applied ") == len(PATCHES)
    header = (dst / "ggml" / "include" / "ggml.h").read_text()
    assert "GGML_TYPE_KVQ2      = 100" in header
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    again = run_patch(pristine, dst)
    assert again.returncode == 0, again.stderr
    assert "applied " not in again.stdout + again.stderr
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    # the source tree is never modified
    assert "KVQ2" not in (pristine / "ggml" / "include" / "ggml.h").read_text()


def test_changed_patch_set_rewrites_only_the_files_that_change(pristine, tmp_path):
    """A new patch set (here: the stamp names another one) is applied to pristine copies beside
    the tree; a file whose result is what it already holds keeps its time stamp (so that a build
    does not recompile everything behind a header), one that differs is rewritten and touched."""
    import os

    dst = tmp_path / "llama.cpp"
    assert run_patch(pristine, dst).returncode == 0
    stamp = dst / ".pyadaq-patchset"
    lines = stamp.read_text().splitlines()
    stamp.write_text("\n".join(["0123456789abcdef", *lines[1:]]))
    header = dst / "ggml" / "include" / "ggml.h"
    other = dst / _touched_files()[-1]
    assert other != header
    old = 1_000_000_000
    for p in (header, other):
        os.utime(p, (old, old))
    expected = other.read_bytes()
    other.write_bytes(expected + b"// left by an older patch set\n")
    os.utime(other, (old, old))
    res = run_patch(pristine, dst)
    assert res.returncode == 0, res.stderr
    assert "1 patched file(s) changed" in res.stdout + res.stderr
    assert header.stat().st_mtime == old and "GGML_TYPE_KVQ2      = 100" in header.read_text()
    assert other.read_bytes() == expected and other.stat().st_mtime > old
    assert stamp.read_text().splitlines()[0] == lines[0]
    assert not (tmp_path / "llama.cpp.pyadaq-staging").exists()


def test_patch_that_does_not_apply_stops_the_build(pristine, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    header = src / "ggml" / "include" / "ggml.h"
    header.write_text(header.read_text().replace("GGML_TYPE_Q2_0    = 42,", "GGML_TYPE_Q2_0    = 42, // moved"))
    res = run_patch(src, tmp_path / "llama.cpp")
    assert res.returncode != 0
    assert "does not apply" in res.stderr
    assert "Regenerate the patch against the pinned version" in res.stderr


FETCH_SCRIPT = ROOT / "native" / "cmake" / "fetch_upstream.cmake"


def run_fetch(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    import os
    import sys

    full = {k: v for k, v in os.environ.items() if not k.startswith(("PYADAQ_", "PIP_"))}
    full.update({"PYADAQ_CACHE_DIR": str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull, **env})
    res = subprocess.run(
        ["cmake", f"-DPYADAQ_WORK_DIR={tmp_path / 'work'}", f"-DPython_EXECUTABLE={sys.executable}",
         "-P", str(FETCH_SCRIPT)],
        capture_output=True, text=True, timeout=300, env=full,
    )
    res.stderr = " ".join(res.stderr.split())  # CMake wraps long messages
    return res


def test_offline_without_source_says_what_to_do(tmp_path):
    # no index and nothing cached: pip cannot get the sdist
    res = run_fetch(tmp_path, PIP_NO_INDEX="1")
    assert res.returncode != 0
    for hint in ("PYADAQ_LLAMA_CPP_DIR", "PYADAQ_SDIST", "pip download", "sha256"):
        assert hint in res.stderr, res.stderr


def test_sdist_with_wrong_checksum_is_refused(tmp_path):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the pinned sdist")
    res = run_fetch(tmp_path, PYADAQ_SDIST=str(fake))
    assert res.returncode != 0
    assert "not the pinned one" in res.stderr


def test_source_dir_that_is_not_llama_cpp_is_refused(tmp_path):
    res = run_fetch(tmp_path, PYADAQ_LLAMA_CPP_DIR=str(tmp_path))
    assert res.returncode != 0
    assert "is not a llama.cpp source tree" in res.stderr


@pytest.mark.parametrize("env", [
    {"PYADAQ_CACHE_DIR": "/tmp/pyadaq-c", "XDG_CACHE_HOME": "/tmp/xdg"},
    {"PYADAQ_CACHE_DIR": "", "XDG_CACHE_HOME": "/tmp/xdg"},
    {"XDG_CACHE_HOME": "", "HOME": "/tmp/home"},
    {"HOME": "/tmp/home"},
])
def test_python_and_cmake_agree_on_the_cache_directory(env):
    """One rule for the cache directory (pyadaq/_paths.py and native/cmake/cache_dir.cmake)."""
    import os
    import sys

    full = {k: v for k, v in os.environ.items() if k not in ("PYADAQ_CACHE_DIR", "XDG_CACHE_HOME")}
    full.update(env)
    cm = subprocess.run(["cmake", "-P", str(ROOT / "native" / "cmake" / "cache_dir.cmake")], env=full,
                        capture_output=True, text=True, timeout=60)
    py = subprocess.run([sys.executable, "-c", "from pyadaq._paths import cache_base; print(cache_base())"],
                        env=full, capture_output=True, text=True, timeout=60)
    assert cm.returncode == 0 and py.returncode == 0, cm.stderr + py.stderr
    assert cm.stderr.strip() == py.stdout.strip()
