"""
The old import path of L{sentinel_twisted.proxy.auth} (token checking
for registrations), kept so that existing imports keep working: every
name here is the same object as the one in the new module.
"""

from __future__ import annotations

from .proxy.auth import (
    ITokenChecker,
    StaticTokenChecker,
    TokenFileChecker,
    TokenFileError,
    parse_token_file,
)

__all__ = [
    "ITokenChecker",
    "StaticTokenChecker",
    "TokenFileChecker",
    "TokenFileError",
    "parse_token_file",
]
