"""llama.cpp's own tools, built from the same patched tree as pyadaq's libraries and installed
with the package (``pyadaq/bin``, RPATH ``$ORIGIN/../lib``): llama-server, llama-cli,
llama-bench, llama-perplexity and rpc-server. They accept pyadaq's cache types (``-ctk kvq2``,
``-ctv kvq3``; native/patches/0011) and use the very libllama/libggml that ``pyadaq.Llama`` uses.

``pyadaq tool NAME [ARGS...]`` runs one (:func:`exec_tool`); :func:`tool_command` gives the argv
and environment for running one as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from pyadaq._native import lib_dir

__all__ = ["TOOLS", "ToolNotBuiltError", "bin_dir", "exec_tool", "tool_command", "tool_env", "tool_path"]

# the name people use -> the executable's file name and what it is for
TOOLS: dict[str, tuple[str, str]] = {
    "llama-server": ("llama-server", "OpenAI-compatible HTTP server: parallel slots, continuous batching"),
    "llama-cli": ("llama-cli", "interactive chat and completion in the terminal"),
    "llama-bench": ("llama-bench", "prompt-processing and generation speed"),
    "llama-perplexity": ("llama-perplexity", "perplexity and KL divergence over a text file"),
    "rpc-server": ("ggml-rpc-server", "serve this machine's memory and compute to other hosts (ggml RPC)"),
}

# tools that load a model; without one of these options they get the embedded model
_MODEL_TOOLS = frozenset({"llama-server", "llama-cli", "llama-bench", "llama-perplexity"})
_MODEL_OPTIONS = ("-m", "--model", "-hf", "-hfr", "--hf-repo", "-mu", "--model-url", "-dr", "--docker-repo")
_NO_MODEL_OPTIONS = frozenset({"-h", "--help", "--usage", "--version", "--list-devices", "--completion-bash",
                               "--license", "--cache-list"})


class ToolNotBuiltError(FileNotFoundError):
    """The package was built without llama.cpp's tools (-DPYADAQ_TOOLS=OFF), or one is missing."""


def bin_dir() -> Path:
    """The directory of the installed tools."""
    return Path(str(files("pyadaq").joinpath("bin")))


def tool_path(name: str) -> Path:
    """The executable of tool ``name`` (one of :data:`TOOLS`)."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; the tools are: {', '.join(TOOLS)}")
    path = bin_dir() / TOOLS[name][0]
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ToolNotBuiltError(
            f"{name} is not installed in {path.parent}: this pyadaq was built without llama.cpp's tools "
            "(CMAKE_ARGS=-DPYADAQ_TOOLS=OFF); reinstall it with the default build (`pip install .`)")
    return path


def tool_env(env: dict[str, str] | None = None, libs: str | os.PathLike | None = None) -> dict[str, str]:
    """An environment in which a tool loads pyadaq's libraries: ``libs`` (default
    ``pyadaq/lib``) first on LD_LIBRARY_PATH (which would otherwise override the tools' RUNPATH)."""
    env = dict(os.environ if env is None else env)
    libs = str(lib_dir() if libs is None else libs)
    rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libs]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libs, *rest])
    return env


def _needs_model(name: str, args: Sequence[str]) -> bool:
    if name not in _MODEL_TOOLS:
        return False
    for a in args:
        if a in _NO_MODEL_OPTIONS:
            return False
        if a in _MODEL_OPTIONS or any(a.startswith(o + "=") for o in _MODEL_OPTIONS if o.startswith("--")):
            return False
    return True


def tool_command(name: str, args: Sequence[str] = (), *, default_model: bool = True) -> list[str]:
    """The argv that runs tool ``name`` with ``args``. With ``default_model`` a tool that loads a
    model and is given none gets the embedded model (``-m PATH``)."""
    argv = [str(tool_path(name)), *args]
    if default_model and _needs_model(name, args):
        from pyadaq.model.embedded import embedded_model_path

        argv[1:1] = ["-m", str(embedded_model_path())]
    return argv


def exec_tool(name: str, args: Sequence[str] = ()) -> int:
    """Run tool ``name``: on POSIX the process becomes the tool (its signals and exit status are
    the tool's); elsewhere it runs as a child and its exit status is returned."""
    argv = tool_command(name, args)
    if _needs_model(name, args):
        print(f"pyadaq tool {name}: no model given, using the embedded one: {argv[2]}", file=sys.stderr)
    env = tool_env()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(argv[0], argv, env)
    return subprocess.call(argv, env=env)
