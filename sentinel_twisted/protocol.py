"""
The old import path of L{sentinel_twisted.proxy.protocol} (the reverse
listener's protocol), kept so that existing imports keep working: every
name here is the same object as the one in the new module.
"""

from __future__ import annotations

from .proxy.protocol import (
    HOLD_FRAMES_FOR_TURN,
    HoldFramesForTurn,
    ReverseConnectionProtocol,
    send_after_read,
)
from .proxy.protocol import describe_peer as describe_peer
from .proxy.protocol import peer_credentials as peer_credentials

__all__ = ["HOLD_FRAMES_FOR_TURN", "HoldFramesForTurn", "ReverseConnectionProtocol", "send_after_read"]
