"""
The old import path of L{sentinel_twisted.proxy.factory} (the reverse
listener's factory and registration policy), kept so that existing
imports keep working: every name here is the same object as the one in
the new module.
"""

from __future__ import annotations

from .proxy.factory import Rejection, ReverseConnectionFactory, rejection_reason

__all__ = ["Rejection", "ReverseConnectionFactory", "rejection_reason"]
