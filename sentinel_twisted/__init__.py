"""
sentinel_twisted: the reverse-connection side of the Sentinel Agent
Protocol v2 on Twisted.

Policy agents dial out to the proxy, register, and then answer the HTTP
inspection events the proxy multiplexes to them (or listen, and the proxy
dials them).  The package's folders follow its architecture:

  - the floor both sides share, importing nothing above it:
    L{sentinel_twisted.wire} (frames), L{sentinel_twisted.messages} and
    L{sentinel_twisted.forward} (typed messages and their codecs),
    L{sentinel_twisted.errors}, L{sentinel_twisted.endpoints};
  - L{sentinel_twisted.proxy}: the proxy side (listener policy and
    registration, the pool, reverse and dialled connections, the pending
    table, token checking, client identity);
  - L{sentinel_twisted.agent}: the agent side;
  - L{sentinel_twisted.gateway} and L{sentinel_twisted.status} on top;
  - the C{twistd} programs at the edge: L{sentinel_twisted.tap} and
    L{sentinel_twisted.agent.tap}.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("sentinel_twisted")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
