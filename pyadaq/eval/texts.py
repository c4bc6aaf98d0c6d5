"""Texts the evaluations read when the user names none."""

from __future__ import annotations


def default_text() -> str:
    """English prose every Python install carries: the topics of the standard library's pydoc."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
