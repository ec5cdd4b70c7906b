# -*- test-case-name: tests.agent.test_proxies -*-
"""
Host names that stand for a set of proxies.

A C{tcp:} or C{tls:} endpoint string whose host is a name (not an address)
may resolve to several addresses: a Kubernetes headless Service or DNS round
robin lists every proxy that way.  L{named_proxies} recognises such a
string, L{NamedProxies.address_description} gives the endpoint string of
one of its addresses (a C{tls:} one still checks the certificate against
the name), and L{resolve} asks an L{IHostnameResolver} for the addresses.
L{ResolvedProxies} keeps the agent connected to every address a name
resolves to, re-resolving it periodically.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..endpoints import parse_description
from ._proxy_connections import ProxyConnections

if TYPE_CHECKING:
    from .connector import AgentConnector

__all__ = ["NamedProxies", "named_proxies", "one_family", "resolve"]

#: The module's logger (the connector's namespace).
log = Logger(namespace="sentinel_twisted.agent.connector")


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


class ResolvedProxies:
    """
    The proxies a host name stands for: one L{ProxyConnections} per address
    it resolves to, re-resolved every C{resolve_interval} seconds.  New
    addresses are dialled; the connections to addresses that left are
    drained.  A resolution that finds nothing keeps the proxies there are
    (a failing name server does not take the agent off working proxies) and
    is tried again sooner, with the connector's backoff.

    @ivar connector: the connector it belongs to.
    @ivar named: the host name and the endpoint string it is in.
    @ivar resolver: the resolver of the name.
    @ivar resolved_at: when the name last resolved (seconds on the connector's
        clock), C{None} before that.
    """

    def __init__(self, connector: AgentConnector, named: NamedProxies, resolver: IHostnameResolver) -> None:
        self.connector = connector
        self.named = named
        self.resolver = resolver
        #: address -> its proxy, for the addresses of the last resolution.
        self.proxies: dict[str, ProxyConnections] = {}
        #: Proxies whose address left, while they drain.
        self.leaving: list[ProxyConnections] = []
        #: Resolutions in a row that found no address.
        self.misses = 0
        self.resolved_at: float | None = None
        self._next: IDelayedCall | None = None
        self._resolving = False
        self._active = False

    @property
    def name(self) -> str:
        """The endpoint string as given."""
        return self.named.description

    def start(self) -> None:
        """Resolve the name now, and every C{resolve_interval} seconds."""
        self._active = True
        self.misses = 0
        for proxy in self.proxies.values():
            proxy.start()
        self.resolve_now()

    def stop(self) -> Deferred[None]:
        """Stop re-resolving; drain every proxy of the name."""
        self._active = False
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        stops = [p.stop() for p in [*self.proxies.values(), *self.leaving]]
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def resolve_now(self) -> None:
        """Resolve the name and follow its addresses (once at a time)."""
        self._next = None
        if self._resolving or not self._active:
            return
        self._resolving = True
        try:
            resolving = resolve(self.resolver, self.named.host, self.named.port)
        except Exception as e:
            self._resolving = False
            self._found([], str(e) or type(e).__name__)
            return

        def done(addresses: list[str]) -> None:
            self._resolving = False
            self._found(addresses, "no address")

        def failed(reason: Failure) -> None:
            self._resolving = False
            self._found([], reason.getErrorMessage())

        resolving.addCallbacks(done, failed)

    def _found(self, found: list[str], problem: str) -> None:
        if not self._active:
            return
        addresses = one_family(found)
        agent_id = self.connector.settings.agent_id
        if not addresses:
            self.misses += 1
            delay = min(self.connector.resolve_interval, self.connector.retry_delay(self.misses))
            if self.misses == 1:
                log.warn(
                    "Agent {agent_id}: {host} resolves to nothing ({problem}); keeping its "
                    "{count} proxy(ies), resolving again in {delay:.2f}s",
                    agent_id=agent_id,
                    host=self.named.host,
                    problem=problem,
                    count=len(self.proxies),
                    delay=delay,
                )
            self._schedule(delay)
            return
        self.misses = 0
        self.resolved_at = self.connector.clock.seconds()
        for address in addresses:
            if address in self.proxies:
                continue
            proxy = ProxyConnections(
                self.connector,
                f"{self.name} ({address})",
                self.connector.endpoint_for(self.named.address_description(address)),
                address,
            )
            self.proxies[address] = proxy
            log.info(
                "Agent {agent_id}: {host} has a new proxy at {address}; connecting "
                "({count} proxy(ies) now)",
                agent_id=agent_id,
                host=self.named.host,
                address=address,
                count=len(self.proxies),
            )
            proxy.start()
        for address in [a for a in self.proxies if a not in addresses]:
            gone = self.proxies.pop(address)
            log.info(
                "Agent {agent_id}: {host} no longer resolves to {address}; draining its "
                "{registered} connection(s) ({count} proxy(ies) now)",
                agent_id=agent_id,
                host=self.named.host,
                address=address,
                registered=gone.registered_count,
                count=len(self.proxies),
            )
            self.leaving.append(gone)
            gone.stop().addCallback(self._drained, gone)
            self.connector.proxy_left(gone)
        self._schedule(self.connector.resolve_interval)

    def _drained(self, _: object, proxy: ProxyConnections) -> None:
        self.leaving.remove(proxy)

    def _schedule(self, delay: float) -> None:
        if self._active:
            self._next = self.connector.clock.callLater(delay, self.resolve_now)

    def health(self) -> dict[str, Any]:
        """The name's addresses now, those still draining, and when it was last resolved."""
        return {
            "name": self.name,
            "addresses": list(self.proxies),
            "leaving": [p.address for p in self.leaving],
            "resolved_at": self.resolved_at,
            "misses": self.misses,
        }
