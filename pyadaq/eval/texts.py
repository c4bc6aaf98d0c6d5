"""Texts the evaluations read when the user names none."""

from __future__ import annotations

_SEP = "\n\n"


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def default_text() -> str:
    """English prose every Python install carries: the topics of the standard library's pydoc."""
    return _SEP.join(_topics())


def _transcript(topic: str) -> str:
    """One short exchange about a topic: its title asked about, its first sentences as the
    answer, in the plain transcript `pyadaq chat` gives a model without a chat template."""
    lines = [line.strip() for line in topic.strip().splitlines()]
    title = lines[0]
    body, para = [], []
    for line in lines[1:]:
        if set(line) <= set("*=-"):  # the title's underline, a blank line
            if para:
                body.append(" ".join(para))
                para = []
            continue
        para.append(line)
    if para:
        body.append(" ".join(para))
    first = body[0] if body else title
    answer = ". ".join(first.split(". ")[:2]).rstrip(".") + "."
    return f"User: What is {title[0].lower() + title[1:]}?\nAssistant: {answer}\n"


def calibration_text() -> str:
    """What `pyadaq calibrate` reads when the user names no text: the topics in the second half of
    :func:`default_text`, first as short chat exchanges (each topic's title asked about, its
    first sentences as the answer, in `pyadaq chat`'s plain transcript), then as the prose of
    that half. Evaluations read from the start of :func:`default_text` (20 chunks of 512 tokens
    are about a tenth of it), so figures measured with a default calibration are on text it did
    not see. The exchanges are there because a value calibration fits the kind of text it reads:
    made on prose alone, it stored chat prompts' values no better than the flat types
    (docs/CALIBRATION.md)."""
    text = default_text()
    half = len(text) // 2
    chats, start = [], 0
    for topic in _topics():
        if start >= half:
            chats.append(_transcript(topic))
        start += len(topic) + len(_SEP)
    return "\n".join(chats) + _SEP + text[half:]
