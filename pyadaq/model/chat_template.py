"""The chat template for models that carry none (``tokenizer.chat_template`` absent, as in the
embedded Gemma 3 270M base model): a plain "User: / Assistant:" transcript with a short system
line, which base models continue, and generation stopped at the next ``"\\nUser:"``. Both
engines of ``pyadaq serve``, ``pyadaq chat`` and ``pyadaq.Llama.create_chat_completion`` use it,
so a model answers the same way everywhere. Overridable: ``chat_format=`` / ``chat_handler=``
in Python, ``--chat-template-file`` in ``pyadaq serve``. A system message replaces the default
system line; an empty one drops it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["DEFAULT_SYSTEM", "STOP", "has_chat_template", "template_path", "template_text"]

DEFAULT_SYSTEM = "The assistant answers questions correctly and briefly."  # also in transcript.jinja
STOP = "\nUser:"  # where the model's turn ends


def has_chat_template(metadata) -> bool:
    """Whether a GGUF's metadata (a dict) carries a chat template of its own."""
    return bool((metadata or {}).get("tokenizer.chat_template"))


def template_path() -> Path:
    """The fallback template's file (Jinja, as llama.cpp and llama-cpp-python read it)."""
    return Path(str(files("pyadaq.model").joinpath("transcript.jinja")))


def template_text() -> str:
    return template_path().read_text(encoding="utf-8")
