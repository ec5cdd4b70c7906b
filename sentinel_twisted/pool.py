"""
The old import path of L{sentinel_twisted.proxy.pool} (the agent pool),
kept so that existing imports keep working: every name here is the same
object as the one in the new module.
"""

from __future__ import annotations

from .proxy.pool import AgentInfo, AgentPool, IAgentPoolObserver, PoolObserver

__all__ = ["AgentInfo", "AgentPool", "IAgentPoolObserver", "PoolObserver"]
