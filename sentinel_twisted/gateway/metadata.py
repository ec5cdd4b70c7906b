# -*- test-case-name: tests.gateway.test_gateway -*-
"""
RequestHeaders metadata and header maps taken from a real
L{twisted.web.server.Request}: client address, server name (SNI, else the
C{Host} header), protocol, TLS version and cipher, an RFC 3339 timestamp and
the client's C{traceparent}.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from msgspec import UNSET
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.http_headers import Headers

from .. import messages as m

__all__ = ["TLSInfo", "header_map", "request_metadata", "rfc3339_now", "tls_info"]

_last_second = -1
_last_stamp = ""


def rfc3339_now(now: float | None = None) -> str:
    """The current UTC time as RFC 3339 (C{2026-01-01T00:00:00Z}), cached per second."""
    global _last_second, _last_stamp
    second = int(time.time() if now is None else now)
    if second != _last_second:
        _last_stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        _last_second = second
    return _last_stamp


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def header_map(pairs: Iterable[tuple[bytes, Iterable[bytes]]]) -> dict[str, list[str]]:
    """Headers as the agents see them: lower-case name -> list of values."""
    return {
        name.decode("latin-1").lower(): [_text(v) for v in values] for name, values in pairs
    }


class TLSInfo:
    __slots__ = ("cipher", "server_name", "version")

    def __init__(self, version: str | None, cipher: str | None, server_name: str | None) -> None:
        self.version = version
        self.cipher = cipher
        self.server_name = server_name


def tls_info(transport: Any) -> TLSInfo | None:
    """TLS version, cipher and SNI name of a TLS transport; C{None} for plain TCP."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        connection = get_handle()
        version = connection.get_protocol_version_name()
    except Exception:
        return None
    cipher = connection.get_cipher_name()
    sni = connection.get_servername()
    return TLSInfo(
        version,
        cipher,
        sni.decode("ascii", "replace") if isinstance(sni, bytes) else sni,
    )


def _host_name(headers: Headers) -> str | None:
    host = headers.getRawHeaders(b"host")
    if not host:
        return None
    value = host[0].decode("latin-1").strip()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def request_metadata(
    correlation_id: str,
    client: object,
    headers: Headers,
    protocol: bytes,
    tls: TLSInfo | None,
    now: float | None = None,
) -> m.RequestMetadata:
    """
    The C{metadata} of a RequestHeaders event for one client request.

    C{request_id} is the client's C{X-Request-Id} when it sent one, else
    the correlation id.
    """
    if isinstance(client, (IPv4Address, IPv6Address)):
        client_ip, client_port = client.host, client.port
    else:
        client_ip, client_port = "", 0
    request_ids = headers.getRawHeaders(b"x-request-id")
    traceparent = headers.getRawHeaders(b"traceparent")
    server_name = tls.server_name if tls is not None else None
    return m.RequestMetadata(
        correlation_id=correlation_id,
        request_id=_text(request_ids[0]) if request_ids else correlation_id,
        client_ip=client_ip,
        client_port=client_port,
        server_name=server_name or _host_name(headers),
        protocol=protocol.decode("ascii", "replace"),
        tls_version=tls.version if tls is not None else None,
        tls_cipher=tls.cipher if tls is not None else None,
        timestamp=rfc3339_now(now),
        traceparent=_text(traceparent[0]) if traceparent else UNSET,
    )
