"""
The old import path of L{sentinel_twisted.proxy.connection} (one agent
connection), kept so that existing imports keep working: every name here
is the same object as the one in the new module.
"""

from __future__ import annotations

from .proxy.connection import AgentConnection, ConnectionInfo
from .proxy.connection import FrameSink as FrameSink
from .proxy.connection import new_correlation_id as new_correlation_id

__all__ = ["AgentConnection", "ConnectionInfo"]
