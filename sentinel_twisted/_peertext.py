# -*- test-case-name: tests.test_peertext -*-
"""
Text a peer chose (agent ids, error texts that quote a payload, addresses)
made fit for a log line: bounded in length, and with no character that
could end the line, forge another or hide text (Unicode categories Cc, Cf,
Zl and Zp are shown escaped).
"""

from __future__ import annotations

import unicodedata

__all__ = ["PEER_TEXT_LIMIT", "escape_char", "first_hidden", "is_clean", "peer_text"]

#: Characters of one peer-supplied field a log line carries by default.
PEER_TEXT_LIMIT = 200

_HIDDEN_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp"))


def is_clean(text: str) -> bool:
    """Whether C{text} has no control, format or separator character."""
    if text.isprintable():
        # isprintable() is False for every Cc, Cf, Zl and Zp character.
        return True
    return not any(unicodedata.category(c) in _HIDDEN_CATEGORIES for c in text)


def first_hidden(text: str) -> tuple[int, str] | None:
    """The position and character of the first control, format or separator
    character in C{text}, if any."""
    if text.isprintable():
        return None
    for i, c in enumerate(text):
        if unicodedata.category(c) in _HIDDEN_CATEGORIES:
            return i, c
    return None


def escape_char(c: str) -> str:
    """C{\\x1b}, C{\\u2028}: a character's escape as Python writes it."""
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _escaped(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(
        escape_char(c) if unicodedata.category(c) in _HIDDEN_CATEGORIES else c for c in text
    )


def peer_text(value: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """
    C{str(value)} for a log line: about C{limit} characters at most (the
    middle of a longer text is cut, with a marker, so that both ends stay
    readable: a connection id's serial is at its end), and control, format
    and separator characters escaped (C{\\x1b}, C{\\u2028}).
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        if text.isprintable():
            return text
        escaped = _escaped(text)
        if len(escaped) <= limit:
            return escaped
    head = max(1, limit * 2 // 3)
    tail = max(1, limit - head)
    return (
        f"{_escaped(text[:head])[:head]}[...{len(text)} characters, cut...]"
        f"{_escaped(text[-tail:])[-tail:]}"
    )
