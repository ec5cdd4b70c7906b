# -*- test-case-name: tests.gateway.test_gateway -*-
"""
RequestHeaders metadata and header maps taken from a real
L{twisted.web.server.Request}: client address, server name (SNI, else the
C{Host} header), protocol, TLS version and cipher, an RFC 3339 timestamp and
the client's C{traceparent}.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from msgspec import UNSET
from twisted.internet.address import IPv4Address, IPv6Address

from .. import messages as m
from .._peertext import peer_text
from .target import BadTarget

__all__ = ["TLSInfo", "header_map", "request_header_map", "request_metadata", "rfc3339_now", "tls_info"]

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


# Header names repeat from request to request: remember their agent form.
# Clients choose them: the table is bounded in entries and in their length.
_names: dict[bytes, str] = {}
_MAX_NAMES = 4096
_MAX_NAME_LENGTH = 128


def _remember(table: dict[Any, str], key: bytes | str, value: str) -> None:
    """Keep C{value} for C{key} in one of the name caches, within their bounds."""
    if len(table) < _MAX_NAMES and len(key) <= _MAX_NAME_LENGTH:
        table[key] = value


def _name(name: bytes) -> str:
    text = _names.get(name)
    if text is None:
        text = name.decode("latin-1").lower()
        _remember(_names, name, text)
    return text


def header_map(
    pairs: Iterable[tuple[bytes, Sequence[bytes]]], errors: str = "replace"
) -> dict[str, list[str]]:
    """
    Headers as the agents see them: lower-case name -> list of values.
    Bytes that are not UTF-8 become U+FFFD (C{errors="replace"}), or raise
    C{UnicodeDecodeError} (C{errors="strict"}).
    """
    names = _names
    result = {}
    for name, values in pairs:
        text = names.get(name) or _name(name)
        if len(values) == 1:
            # Most headers have one value: no list comprehension to run.
            result[text] = [values[0].decode("utf-8", errors)]
        else:
            result[text] = [v.decode("utf-8", errors) for v in values]
    return result


#: A control character a field value may not hold (RFC 9110 section 5.5:
#: VCHAR, obs-text, and SP or HTAB between them; twisted.web refuses NUL, CR
#: and LF itself).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


def request_header_map(raw: dict[bytes, list[bytes]]) -> dict[str, list[str]]:
    """
    A client request's headers as the agents see them (L{header_map}), each
    value decoding back to exactly the bytes the upstream receives, which
    any HTTP parser reads as the agents do.

    @raise BadTarget: C{400} when a value is not UTF-8: shown as U+FFFD,
        C{caf\xe9} and C{caf\xff} would be one value to the agents and two
        to the upstream; or when it holds a control character other than
        HTAB, which HTTP parsers read differently: one refuses the request,
        another strips a form feed off the end of a value (as Python's
        C{str.strip()} does) and reads a value the agents were not shown.
    """
    try:
        headers = header_map(raw.items(), "strict")
    except UnicodeDecodeError:
        # Rare: find the header to name.
        for name, values in raw.items():
            for value in values:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadTarget(
                        400, f"the {peer_text(name.decode('latin-1'), 64)} header's value is not valid UTF-8"
                    ) from None
        raise
    for shown_name, shown in headers.items():
        for text in shown:
            # Most values are printable (a tab, a NO-BREAK SPACE or a line
            # separator is not): the search is for the rest.
            if not text.isprintable() and _CONTROL.search(text) is not None:
                # Rare: the name as the client spelt it (in its canonical case).
                spelt = next((n.decode("latin-1") for n in raw if _name(n) == shown_name), shown_name)
                raise BadTarget(400, f"the {peer_text(spelt, 64)} header's value has a control character")
    return headers


_protocols: dict[bytes, str] = {b"HTTP/1.1": "HTTP/1.1", b"HTTP/1.0": "HTTP/1.0"}


def _protocol(version: bytes) -> str:
    return _protocols.get(version) or version.decode("ascii", "replace")


class TLSInfo:
    """
    The TLS version, cipher and SNI server name of a client connection.

    @ivar version: the TLS version (C{TLSv1.3}), C{None} if not known.
    @ivar cipher: the cipher suite, C{None} if not known.
    @ivar server_name: the SNI server name the client sent, C{None} if none.
    """

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


# Host headers repeat from request to request too: their server names.
_server_names: dict[str, str] = {}


def _host_name(headers: dict[str, list[str]]) -> str | None:
    host = headers.get("host")
    if not host:
        return None
    raw = host[0]
    name = _server_names.get(raw)
    if name is None:
        name = _server_name(raw)
        _remember(_server_names, raw, name)
    return name


def _server_name(host: str) -> str:
    """The host of a C{Host} value: no port, no IPv6 brackets."""
    value = host.strip()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def request_metadata(
    correlation_id: str,
    client: object,
    headers: dict[str, list[str]],
    protocol: bytes,
    tls: TLSInfo | None,
    now: float | None = None,
) -> m.RequestMetadata:
    """
    The C{metadata} of a RequestHeaders event for one client request;
    C{headers} is its L{header_map}.

    C{request_id} is the client's C{X-Request-Id} when it sent one, else
    the correlation id.
    """
    if isinstance(client, (IPv4Address, IPv6Address)):
        client_ip, client_port = client.host, client.port
    else:
        client_ip, client_port = "", 0
    request_ids = headers.get("x-request-id")
    traceparent = headers.get("traceparent")
    if tls is None:
        return m.RequestMetadata(
            correlation_id=correlation_id,
            request_id=request_ids[0] if request_ids else correlation_id,
            client_ip=client_ip,
            client_port=client_port,
            server_name=_host_name(headers),
            protocol=_protocol(protocol),
            timestamp=rfc3339_now(now),
            traceparent=traceparent[0] if traceparent else UNSET,
        )
    return m.RequestMetadata(
        correlation_id=correlation_id,
        request_id=request_ids[0] if request_ids else correlation_id,
        client_ip=client_ip,
        client_port=client_port,
        server_name=tls.server_name or _host_name(headers),
        protocol=_protocol(protocol),
        tls_version=tls.version,
        tls_cipher=tls.cipher,
        timestamp=rfc3339_now(now),
        traceparent=traceparent[0] if traceparent else UNSET,
    )
