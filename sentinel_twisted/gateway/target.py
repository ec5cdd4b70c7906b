# -*- test-case-name: tests.gateway.test_target -*-
"""
The request target, parsed once (RFC 9112 section 3.2) into the one form
everybody downstream uses: the agents judge it and the upstream receives
it, byte for byte.

  - origin-form (C{/path?query}) is kept as it is;
  - absolute-form (C{http://host[:port]/path?query}) becomes its path and
    query (C{/} when it has none, but C{*} for an C{OPTIONS} with neither
    path nor query: RFC 9112 section 3.2.4 has the last proxy send the
    asterisk-form for it); its authority is the request's host and must
    agree with the C{Host} header;
  - asterisk-form (C{*}) only with C{OPTIONS};
  - authority-form (C{host:port}) belongs to C{CONNECT}, which a gateway
    is not: C{CONNECT} is refused with C{501} whatever its target.

Anything else is C{400}: a target that is none of these forms, a fragment
(C{#}), a path character outside RFC 3986's (a space, a backslash, a
control or non-ASCII byte), a query byte that is not visible ASCII, a
C{%} not followed by two hex digits, a dot segment in the path (see
below), a path that starts with C{//}.

A path with a dot segment (C{.} or C{..}, its dots literal or C{%2e}) is
refused: an upstream resolves it, behind the C{--upstream} URL's own path
(C{/public} + C{/../private}) and around the agents' rules on a prefix
(C{/x/../admin}), so what the agents judged would not be what is served.
Browsers never send one.  A segment counts as one too when a C{;}
(parameters: C{..;}) or an encoded slash or backslash (C{%2F}, C{%5C})
ends it instead of a C{/}, for the upstreams that read them so.

A path that starts with C{//} is refused for the same reason: an upstream
that resolves it as a URL reference (against its own base URL) reads
C{//x/admin} as host C{x} and path C{/admin}, around the agents' rules on
C{/admin}.  Empty segments further on (C{/a//b}) pass as they are.

Nothing else is normalised: percent-encodings (C{%61}, C{%2F}) reach the
agents and the upstream exactly as the client sent them, so what the
upstream receives is what the agents judged.  An agent whose rules are
about paths normalises for itself (the rule agent matches the raw, the
decoded and the dot-segment-free path).
"""

from __future__ import annotations

import re

from .._hostname import HOST, PCT, valid_host

__all__ = ["BadTarget", "RequestTarget", "parse_target", "valid_host"]


class BadTarget(ValueError):
    """
    The request cannot be taken; C{code} is the status to answer with.

    @ivar code: the status to answer with.
    @ivar reason: what is wrong with the target.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RequestTarget:
    """
    @ivar target: what the agents are shown and the upstream receives
        (origin-form, or C{*}).
    @ivar authority: the host of an absolute-form target (lower-case, its
        scheme's default port left out), else C{None}.
    """

    __slots__ = ("_default_port", "authority", "target")

    def __init__(self, target: bytes, authority: bytes | None = None, default_port: bytes = b"") -> None:
        self.target = target
        self.authority = authority
        self._default_port = default_port

    def names_host(self, host: bytes) -> bool:
        """
        Whether a C{Host} header value names the authority of this
        absolute-form target (case aside; the scheme's default port may be
        left out on either side).
        """
        return _without_port(host.strip().lower(), self._default_port) == self.authority

    def __repr__(self) -> str:
        return f"RequestTarget({self.target!r}, authority={self.authority!r})"


# RFC 3986: pchar = unreserved / pct-encoded / sub-delims / ":" / "@".
_PCHAR = rb"A-Za-z0-9\-._~!$&'()*+,;=:@"
#: absolute-path [ "?" query ]; the query may hold any visible ASCII byte
#: (clients send [ ] { } | unescaped) but "#", and only well-formed "%".
_ORIGIN = re.compile(
    rb"\A(?:/(?:[" + _PCHAR + rb"]|" + PCT + rb")*)+"
    rb"(?:\?(?:[\x21-\x22\x24\x26-\x7e]|" + PCT + rb")*)?\Z"
)
_SCHEME = re.compile(rb"\A(?i:https?)://")
_DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}
#: A dot segment in the path (before any "?"): "." or ".." (each dot
#: literal or %2e) between separators; "/" starts it, or an encoded slash
#: or backslash; one of those, ";", "?" or the end ends it.
_DOT_SEGMENT = re.compile(
    rb"\A[^?]*?(?:/|%2[fF]|%5[cC])(?:\.|%2[eE]){1,2}(?:[/;?]|%2[fF]|%5[cC]|\Z)"
)


# A byte looked for as its value: "b'#' in raw" first tries the operand as an
# integer in CPython, raising and clearing a TypeError, several times dearer.
_HASH = ord("#")
_PERCENT = ord("%")


def _origin(path_and_query: bytes) -> bytes:
    if not _ORIGIN.match(path_and_query):
        raise BadTarget(400, "the request target is not a valid path and query")
    if path_and_query.startswith(b"//"):
        raise BadTarget(400, "the request target's path starts with // (read as a host by some upstreams)")
    # Most paths have neither "/." nor a "%": one scan each, no regex.
    if (path_and_query.find(b"/.") >= 0 or _PERCENT in path_and_query) and _DOT_SEGMENT.match(path_and_query):
        raise BadTarget(400, "the request target's path has a dot segment (. or ..)")
    return path_and_query


def parse_target(method: bytes, raw: bytes) -> RequestTarget:
    """
    Parse the target of a request line.

    @raise BadTarget: with the status (C{400}, or C{501} for C{CONNECT}).
    """
    if method == b"CONNECT":
        raise BadTarget(501, "CONNECT is not supported: this gateway is no tunnel")
    if _HASH in raw:
        raise BadTarget(400, "a request target has no fragment (#)")
    if raw.startswith(b"/"):
        return RequestTarget(_origin(raw))
    if raw == b"*":
        if method != b"OPTIONS":
            raise BadTarget(400, "the asterisk target (*) is only for OPTIONS")
        return RequestTarget(raw)
    scheme = _SCHEME.match(raw)
    if scheme is None:
        raise BadTarget(400, "the request target is neither a path nor an http(s) URL")
    rest = raw[scheme.end() :]
    end = len(rest)
    for separator in (b"/", b"?"):
        index = rest.find(separator)
        if 0 <= index < end:
            end = index
    authority = rest[:end].lower()
    if not authority or not HOST.match(authority) or authority.startswith(b":"):
        raise BadTarget(400, "the request target's authority is not a valid host[:port]")
    path_and_query = rest[end:]
    default = _DEFAULT_PORTS[raw[: scheme.end() - 3].lower()]
    if not path_and_query and method == b"OPTIONS":
        # The server as a whole (RFC 9112 section 3.2.4), not its "/".
        return RequestTarget(b"*", _without_port(authority, default), default)
    if not path_and_query.startswith(b"/"):
        path_and_query = b"/" + path_and_query
    return RequestTarget(_origin(path_and_query), _without_port(authority, default), default)


def _without_port(authority: bytes, default: bytes) -> bytes:
    """C{host:PORT} with the scheme's default port, or an empty one, left out."""
    if authority.endswith(b":" + default):
        return authority[: -len(default) - 1]
    if authority.endswith(b":"):
        return authority[:-1]
    return authority
