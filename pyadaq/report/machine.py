"""What machine a run ran on, for the settings every result records."""

from __future__ import annotations

import platform
from pathlib import Path

from pyadaq._native import native

__all__ = ["gpu_names", "machine"]


def machine() -> str:
    """The CPU model, its thread count and the OS, and the GPUs where pyadaq runs on them."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    gpu = gpu_names()
    return f"{cpu}, {os.cpu_count()} threads, {platform.system()}" + (f"; GPU: {', '.join(gpu)}" if gpu else "")


def gpu_names() -> list:
    """The NVIDIA GPUs nvidia-smi lists (name, memory), when pyadaq's library has a GPU backend
    and nvidia-smi is there; [] otherwise."""
    import shutil
    import subprocess

    if not native().gpu_devices() or shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]
