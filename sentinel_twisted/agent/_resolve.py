# -*- test-case-name: tests.agent.test_proxies -*-
"""
Host names that stand for a set of proxies.

A C{tcp:} or C{tls:} endpoint string whose host is a name (not an address)
may resolve to several addresses: a Kubernetes headless Service or DNS round
robin lists every proxy that way.  L{named_proxies} recognises such a
string, L{NamedProxies.address_description} gives the endpoint string of
one of its addresses (a C{tls:} one still checks the certificate against
the name), and L{resolve} asks an L{IHostnameResolver} for the addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from zope.interface import implementer

from ..endpoints import parse_description

__all__ = ["NamedProxies", "named_proxies", "one_family", "resolve"]


@attrs.frozen
class NamedProxies:
    """A C{tcp:} or C{tls:} endpoint string whose host is a name."""

    description: str
    kind: str
    host: str
    port: int
    #: The string's keyword arguments other than host and port.
    options: tuple[tuple[str, str], ...]

    def address_description(self, address: str) -> str:
        """The endpoint string that dials C{address} in place of the name."""
        if self.kind == "tcp":
            arguments = [("host", address), ("port", str(self.port)), *self.options]
            return "tcp:" + ":".join(f"{k}={quoteStringArgument(v)}" for k, v in arguments)
        # tls: the name stays the host (it is what the certificate must
        # name); the connection goes to the address through endpoint=.
        inner = [("host", address), ("port", str(self.port))]
        inner += [(k, v) for k, v in self.options if k in ("timeout", "bindAddress")]
        wrapped = "tcp:" + ":".join(f"{k}={quoteStringArgument(v)}" for k, v in inner)
        arguments = [("host", self.host), ("port", str(self.port)), *self.options]
        arguments.append(("endpoint", wrapped))
        return "tls:" + ":".join(f"{k}={quoteStringArgument(v)}" for k, v in arguments)


def named_proxies(description: str) -> NamedProxies | None:
    """
    C{description} as a L{NamedProxies} if it is a C{tcp:} or C{tls:}
    string with a host name and a port; else C{None} (addresses, C{unix:},
    a C{tls:} string that names its own C{endpoint=}, anything unparsable:
    those are dialled as they are).
    """
    try:
        args, kwargs = parse_description(description)
    except ValueError:
        return None
    kind = args[0].lower() if args else ""
    if kind not in ("tcp", "tls") or "endpoint" in kwargs:
        return None
    positional = args[1:]
    if "host" not in kwargs and positional:
        kwargs["host"] = positional.pop(0)
    if "port" not in kwargs and positional:
        kwargs["port"] = positional.pop(0)
    host = kwargs.pop("host", "")
    port_text = kwargs.pop("port", "")
    if positional or not host or isIPAddress(host) or isIPv6Address(host):
        return None
    try:
        port = int(port_text)
    except ValueError:
        return None
    return NamedProxies(description, kind, host, port, tuple(kwargs.items()))


def one_family(addresses: Iterable[str]) -> list[str]:
    """
    The distinct IPv4 addresses, or the IPv6 ones if there is no IPv4 one,
    sorted.

    In a dual-stack cluster a proxy has one address of each family: dialling
    both would count it twice.  And C{localhost} is commonly both
    C{127.0.0.1} and C{::1} while a proxy listens on one of them.
    """
    v4: set[str] = set()
    v6: set[str] = set()
    for address in addresses:
        (v4 if isIPAddress(address) else v6).add(address)
    if v4:
        return sorted(v4, key=lambda a: ipaddress.ip_address(a))
    return sorted(v6)


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str):
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.addresses)


def resolve(resolver: IHostnameResolver, host: str, port: int) -> Deferred[list[str]]:
    """The addresses C{host} resolves to (stream sockets); empty if none."""
    receiver = _Addresses()
    resolver.resolveHostName(receiver, host, port)
    return receiver.done
