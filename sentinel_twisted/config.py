"""
The old import path of L{sentinel_twisted.proxy.config} (the listener's
configuration and agent allowlist), kept so that existing imports keep
working: every name here is the same object as the one in the new
module.
"""

from __future__ import annotations

from .proxy.config import MAX_ALLOW_FILE_BYTES as MAX_ALLOW_FILE_BYTES
from .proxy.config import AgentAllowlist, AllowFileError, ReverseConnectionConfig, read_allow_file

__all__ = ["AgentAllowlist", "AllowFileError", "ReverseConnectionConfig", "read_allow_file"]
