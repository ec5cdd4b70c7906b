"""
The old import path of L{sentinel_twisted.proxy.pending} (the table of
requests waiting for an answer), kept so that existing imports keep
working: every name here is the same object as the one in the new
module.
"""

from __future__ import annotations

from .proxy.pending import PendingTable, Waiter

__all__ = ["PendingTable", "Waiter"]
