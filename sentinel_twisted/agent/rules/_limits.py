# -*- test-case-name: tests.agent.test_rule_limits -*-
"""
How much of a request the header rules inspect: the rules file's
C{[request]} table.  A proxy's RequestHeaders event may be up to 16 MiB,
and every view of the request the rules look at (the target as sent,
percent-decoded and normalised; each header value as sent and decoded)
costs time in proportion to it, on the agent's reactor.  A request over
the bounds is L{Uninspectable}: refused (C{414}, C{431}) or let through
unmatched, as the policy says, and told in time bounded by the limits,
not by the event.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ._decode import Uninspectable

#: The default bound on a request target's bytes: well above the 8 KiB
#: request lines common servers take, so that no ordinary request meets it.
MAX_URI_LENGTH = 64 * 1024

#: The default bound on the bytes of a request's header names and values
#: together.
MAX_HEADER_BYTES = 256 * 1024

#: The default bound on a request's header fields (each value of a header
#: is one, as each is a line of an HTTP/1.1 head).
MAX_HEADERS = 1000

#: The tag an answer for a request over the bounds carries.
TAG = "request-uninspectable"


def _utf8_length(text: str, room: int) -> int:
    """
    The bytes of C{text} in UTF-8, as the proxy received them: exact when
    C{text} is ASCII (read, not counted) or at most C{room} characters
    long; otherwise its length in characters, already more than C{room}
    (so that nothing longer than C{room} is ever encoded).
    """
    length = len(text)
    if length > room or text.isascii():
        return length
    return len(text.encode("utf-8", "surrogatepass"))


@attrs.frozen
class RequestPolicy:
    """
    The bounds on the request the header rules inspect, and what happens
    to a request past them (the rules file's C{[request]} table).

    @ivar uninspectable: C{"block"} (the default): a request past a bound
        is refused, C{414} for its target, C{431} for its headers;
        C{"allow"}: it goes on unmatched (no rule sees it).
    @ivar max_uri_length: the most bytes (UTF-8) of the request target as
        the proxy sent it.
    @ivar max_header_bytes: the most bytes (UTF-8) of header names and
        values together, a name counted with each of its values (as it is
        on each line of an HTTP/1.1 head).
    @ivar max_headers: the most header fields (each value of a header is
        one; a name with none counts once).
    """

    uninspectable: str = "block"
    max_uri_length: int = MAX_URI_LENGTH
    max_header_bytes: int = MAX_HEADER_BYTES
    max_headers: int = MAX_HEADERS

    @property
    def blocks(self) -> bool:
        """Whether a request past the bounds is refused."""
        return self.uninspectable == "block"

    def check(self, uri: str, headers: Mapping[str, list[str]]) -> Uninspectable | None:
        """
        Why a request with this target and these headers is past the
        bounds, C{None}: it is not.  Nothing is decoded or copied: lengths
        are read, header fields are counted until a bound is passed, and a
        text is encoded to count its bytes only when it is not ASCII and
        fits in what is left, so the time taken is bounded by the limits
        however large the event.
        """
        limit = self.max_uri_length
        length = _utf8_length(uri, limit)
        if length > limit:
            shown = f"{length:,} bytes" if uri.isascii() else f"more than {limit:,} bytes"
            return Uninspectable(
                f"the request target is {shown} long, over max_uri_length ({limit:,})",
                414,
                "uri_too_long",
            )
        fields = 0
        room = self.max_header_bytes
        for name, values in headers.items():
            count = len(values) or 1
            fields += count
            if fields > self.max_headers:
                return Uninspectable(
                    f"the request has more than {self.max_headers:,} header fields (max_headers)",
                    431,
                    "too_many_headers",
                )
            room -= _utf8_length(name, room) * count
            if room >= 0:
                for value in values:
                    room -= _utf8_length(value, room)
                    if room < 0:
                        break
            if room < 0:
                return Uninspectable(
                    f"the request's header names and values are over max_header_bytes "
                    f"({self.max_header_bytes:,} bytes)",
                    431,
                    "headers_too_large",
                )
        return None
