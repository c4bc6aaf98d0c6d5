"""Texts the evaluations read when the user names none."""

from __future__ import annotations


def default_text() -> str:
    """English prose every Python install carries: the topics of the standard library's pydoc."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_text() -> str:
    """What `pyadaq calibrate` reads when the user names no text: the second half of
    :func:`default_text`. Evaluations read from the start of that text (20 chunks of 512 tokens
    are about a tenth of it), so figures measured with a default calibration are on text it
    did not see."""
    text = default_text()
    return text[len(text) // 2:]
