# -*- test-case-name: tests.gateway.test_options -*-
"""
L{GatewayConfig}: how the HTTP gateway consults agents and where it sends
allowed requests.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from hyperlink import URL, DecodedURL

from .known import MAX_KNOWN_AGENTS

__all__ = ["CHALLENGE_HEADER", "GatewayConfig", "parse_upstream"]

#: Response header naming the challenge type of a challenge decision.
CHALLENGE_HEADER = "X-Sentinel-Challenge"


def parse_upstream(url: str) -> URL:
    """
    Check an C{--upstream} URL: C{http} or C{https}, a host, no query or
    fragment (the client's path and query are appended to its path).  It
    is returned as a URI: the scheme in lower case, an international host name in IDNA
    (C{xn--bcher-kva.de}), the path percent-encoded, as they go on the wire.

    @raise ValueError: with a clear text when the URL is not usable.
    """
    try:
        parsed = DecodedURL.from_text(url).encoded_url.to_uri()
    except Exception as e:
        raise ValueError(f"--upstream {url!r} is not a URL: {e}") from None
    scheme = parsed.scheme.lower()
    if scheme != parsed.scheme:
        # A scheme is case-insensitive (RFC 3986): HTTPS:// is https://.
        parsed = parsed.replace(scheme=scheme)
    if scheme not in ("http", "https"):
        raise ValueError(f"--upstream {url!r} must be an http:// or https:// URL")
    if not parsed.host:
        raise ValueError(f"--upstream {url!r} has no host")
    if parsed.query or parsed.fragment:
        raise ValueError(f"--upstream {url!r} must not have a query or fragment")
    return parsed


def _agents(value: Iterable[str]) -> tuple[str, ...]:
    # Consult each agent once, in the order first given.
    return tuple(dict.fromkeys(value))


def _status(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 100 <= value <= 599:
        raise ValueError(f"{attribute.name} must be an HTTP status (100-599), got {value!r}")


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _positive_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.strip().lower() for name in value if name.strip()))


@attrs.frozen(kw_only=True)
class GatewayConfig:
    """
    @ivar agents: agent ids consulted for each request, in order; empty
        means every agent seen, in order of first registration, whether it
        is registered at the time or not (see
        L{sentinel_twisted.gateway.known}).
    @ivar fail_open: let a request go on as allowed when an agent cannot
        answer (not connected, paused, timed out, disconnected) instead of
        answering C{503}.
    @ivar upstream: where allowed requests go (C{http(s)://host[:port][/prefix]});
        C{None} answers them with the built-in echo.
    @ivar upstream_timeout: seconds to wait for the upstream's response
        headers before answering C{504}, and the longest the upstream may
        then go quiet while its response body is read (time the gateway
        does not read it does not count); past it the body is cut short.
    @ivar upstream_ca: a PEM file of the CA certificates an C{https}
        upstream's certificate must chain to, instead of the system's
        trusted CAs (read when the gateway is built); only with an
        C{https} upstream.
    @ivar challenge_status: the status of a challenge decision's response.
    @ivar max_upstream_connections: idle persistent upstream connections
        kept per upstream host.
    @ivar header_timeout: seconds a client has to send a whole request head
        (from its connection, or the end of its previous response).
    @ivar min_body_rate: the least average rate (bytes a second) at which a
        request body must arrive, counted from C{header_timeout} seconds
        after its head; a slower client gets C{408}.
    @ivar send_timeout: seconds a client has to take the response bytes the
        gateway buffers for it (and a closing connection its last bytes)
        before its connection is aborted.
    @ivar max_client_connections: client connections the gateway holds at
        once; more are closed as they arrive.
    @ivar status_hosts: host names the status site answers to besides its
        own address (C{Host} checked against DNS rebinding).
    @ivar max_replaced_body_size: the largest body (bytes) that agents'
        body replacements may make of a body smaller than that; past it the
        answer is an agent error (C{503}, or the agent is left out failing
        open).
    @ivar allow_underscore_headers: keep request headers whose names have
        an C{_} (dropped by default, as nginx does: a WSGI upstream reads
        C{X_User} as C{X-User}, which agents' rules on C{x-user} miss).
    @ivar max_known_agents: without C{agents}, the most agent ids the
        gateway remembers (agent ids come from peers).
    """

    agents: tuple[str, ...] = attrs.field(default=(), converter=_agents)
    fail_open: bool = False
    upstream: str | None = attrs.field(default=None)
    upstream_timeout: float = attrs.field(default=30.0, validator=_positive)
    upstream_ca: str | None = None
    challenge_status: int = attrs.field(default=403, validator=_status)
    max_upstream_connections: int = 64
    header_timeout: float = attrs.field(default=30.0, validator=_positive)
    max_client_connections: int = attrs.field(default=1024, validator=_positive_int)
    min_body_rate: int = attrs.field(default=1024, validator=_positive_int)
    send_timeout: float = attrs.field(default=30.0, validator=_positive)
    status_hosts: tuple[str, ...] = attrs.field(default=(), converter=_names)
    max_replaced_body_size: int = attrs.field(default=10 * 1024 * 1024, validator=_positive_int)
    allow_underscore_headers: bool = False
    max_known_agents: int = attrs.field(default=MAX_KNOWN_AGENTS, validator=_positive_int)

    @upstream.validator
    def _check_upstream(self, attribute: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None:
            parse_upstream(value)

    def __attrs_post_init__(self) -> None:
        if self.upstream_ca is not None and (
            self.upstream is None or parse_upstream(self.upstream).scheme != "https"
        ):
            raise ValueError("--upstream-ca is for an https:// --upstream: its CAs check the upstream's certificate")
