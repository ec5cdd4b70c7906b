# -*- test-case-name: tests.agent.test_rule_limits -*-
"""
How much of a request the header rules inspect: the rules file's
C{[request]} table.  A proxy's RequestHeaders event may be up to 16 MiB,
and every view of the request the rules look at (the method, upper-cased;
the target as sent, percent-decoded and normalised; each header value as
sent and decoded; the client address, parsed) costs time in proportion to
it, on the agent's reactor.  A request over the bounds is L{Uninspectable}:
refused (C{501}, C{414}, C{431}, C{400}) or let through unmatched, as the
policy says, and told in time bounded by the limits, not by the event.
"""

from __future__ import annotations

import re
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

#: The default bound on a request method's characters: the longest method
#: registered with IANA (C{UPDATEREDIRECTREF}) is 17.
MAX_METHOD_LENGTH = 64

#: The most characters of a client address: the longest text of an IPv6
#: address (45, C{INET6_ADDRSTRLEN} less its NUL), a C{%}, and the longest
#: zone an interface name makes (15, C{IFNAMSIZ} less its NUL; a zone
#: index is at most 10 digits).  Every address a socket gives is shorter.
MAX_CLIENT_ADDRESS_LENGTH = 45 + 1 + 15

#: The tag an answer for a request over the bounds carries.
TAG = "request-uninspectable"

#: A token as RFC 9110 (section 5.6.2) writes it, ASCII only: a method
#: (section 9.1), a header name (section 5.1).
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


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
    @ivar max_method_length: the most characters of the request method
        (a method is an ASCII token: characters are bytes); past it the
        answer is C{501}, and a method that is no token is refused with
        C{400} whatever its length.  The client address has a bound of
        its own, not configurable: L{MAX_CLIENT_ADDRESS_LENGTH}
        characters, or C{400}.
    """

    uninspectable: str = "block"
    max_uri_length: int = MAX_URI_LENGTH
    max_header_bytes: int = MAX_HEADER_BYTES
    max_headers: int = MAX_HEADERS
    max_method_length: int = MAX_METHOD_LENGTH

    @property
    def blocks(self) -> bool:
        """Whether a request past the bounds is refused."""
        return self.uninspectable == "block"

    def check(
        self,
        uri: str,
        headers: Mapping[str, list[str]],
        *,
        method: str | None = None,
        client_ip: str | None = None,
    ) -> Uninspectable | None:
        """
        Why a request with this target and these headers (and this method
        and client address, when given) is past the bounds, C{None}: it is
        not.  Nothing is decoded or copied: lengths are read, a method is
        looked at for its form only once its length is within the bound,
        header fields are counted until a bound is passed, and a text is
        encoded to count its bytes only when it is not ASCII and fits in
        what is left, so the time taken is bounded by the limits however
        large the event.
        """
        if method is not None:
            failure = self._check_method(method)
            if failure is not None:
                return failure
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
        if client_ip is not None and len(client_ip) > MAX_CLIENT_ADDRESS_LENGTH:
            return Uninspectable(
                f"the client address is {len(client_ip):,} characters long, longer than the longest "
                f"IP address ({MAX_CLIENT_ADDRESS_LENGTH} characters)",
                400,
                "client_address_too_long",
            )
        return None

    def _check_method(self, method: str) -> Uninspectable | None:
        """Why C{method} is past the bounds or is no method, C{None}: it is one."""
        limit = self.max_method_length
        if len(method) > limit:
            # No server implements a method it does not know (RFC 9110 section 15.6.2).
            return Uninspectable(
                f"the request method is {len(method):,} characters long, over max_method_length ({limit:,})",
                501,
                "method_too_long",
            )
        if TOKEN.fullmatch(method) is None:
            # Nor is it shown: the answer may go back to the client.
            return Uninspectable("the request method is not an HTTP token (RFC 9110 section 9.1)", 400, "method_invalid")
        return None
