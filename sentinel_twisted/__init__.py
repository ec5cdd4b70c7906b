"""
sentinel_twisted: the reverse-connection side of the Sentinel Agent
Protocol v2 on Twisted.

Policy agents dial out to the proxy, register, and then answer the HTTP
inspection events the proxy multiplexes to them.  This package holds the
proxy side (listener, registration, agent pool), the agent side, and the
C{twistd} programs that run them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("sentinel_twisted")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
