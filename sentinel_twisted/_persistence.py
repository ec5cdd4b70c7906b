# -*- test-case-name: tests.gateway.test_hardening -*-
"""
Whether a connection of C{twisted.web} stays open after a request's
response: L{check_persistence}, the C{checkPersistence} of the gateway's
client connections and of the status site's.

twisted.web looks for C{close} among the space-separated words of the first
C{Connection} field only, so C{Connection: close, TE}, C{keep-alive,close}
or a second C{Connection: close} field kept the connection open, and the
request pipelined behind it was read and answered as if the client had not
asked to close.  A refused C{CONNECT} ends the connection too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["check_persistence", "connection_options"]


def connection_options(fields: Iterable[bytes]) -> Iterator[bytes]:
    """
    The options of C{Connection} fields, lower-case: each field a
    comma-separated list, spaces and tabs around each option (RFC 9110
    section 7.6.1).
    """
    return (option.strip(b" \t").lower() for field in fields for option in field.split(b","))


def check_persistence(request: Any, version: bytes, method: bytes) -> bool:
    """
    Whether the connection stays open after C{request}'s response: an
    HTTP/1.1 request's unless it has the C{close} option, among the
    comma-separated options of any of its C{Connection} fields (RFC 9112
    section 9.6), when its response says C{Connection: close} too; never an
    HTTP/1.0 request's (as twisted.web).  Nor a C{CONNECT}'s, which neither
    site serves: its client sends a tunnel's bytes after it, not requests,
    and they are not read as requests.  C{method} is the request line's
    (the channel's C{_command}: the request's own is set only once its body
    is in).
    """
    if version != b"HTTP/1.1":
        return False
    fields = request.requestHeaders._rawHeaders.get(b"Connection")
    if (fields and b"close" in connection_options(fields)) or method == b"CONNECT":
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        return False
    return True
