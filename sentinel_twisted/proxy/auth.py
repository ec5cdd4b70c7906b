# -*- test-case-name: tests.test_auth -*-
"""
Token authentication of registering agents.

L{TokenFileChecker} reads a file of C{AGENT_ID TOKEN} lines.  Tokens are
compared with L{hmac.compare_digest} and never appear in logs, reprs or
error texts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

from zope.interface import implementer

from .._operator_files import OperatorFileError, operator_lines, read_operator_file
from ._interfaces import ITokenChecker

__all__ = ["ITokenChecker", "StaticTokenChecker", "TokenFileChecker", "TokenFileError", "parse_token_file"]


#: The largest token file read: some ten thousand agents' lines.
MAX_TOKEN_FILE_BYTES = 4 * 1024 * 1024


class TokenFileError(ValueError):
    """The token file cannot be used; the text names the file and line."""


def parse_token_file(path: str) -> dict[str, bytes]:
    """
    Read C{AGENT_ID TOKEN} lines; blank lines and C{#} comments are
    skipped.  Every malformed line is an error naming the file and line
    (never echoing the token).
    """
    try:
        text = read_operator_file(path, MAX_TOKEN_FILE_BYTES, "token file")
    except OperatorFileError as e:
        raise TokenFileError(str(e)) from None
    tokens: dict[str, bytes] = {}
    for number, line in operator_lines(text):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) != 2:
            raise TokenFileError(
                f"{path}:{number}: expected 'AGENT_ID TOKEN', found "
                f"{len(fields)} field{'s' if len(fields) != 1 else ''}"
            )
        agent_id, token = fields
        if agent_id in tokens:
            raise TokenFileError(f"{path}:{number}: agent '{agent_id}' is listed twice")
        tokens[agent_id] = token.encode("utf-8")
    if not tokens:
        raise TokenFileError(f"token file {path} lists no agent")
    return tokens


def _mode_warning(path: str) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o077:
        return f"token file {path} is readable by group or others (mode {mode & 0o777:o})"
    return None


def _token_digest(token: str) -> bytes:
    """
    The SHA-256 of a registration token, which a connection keeps instead
    of the token itself (L{StaticTokenChecker.holds_token}).
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@implementer(ITokenChecker)
class StaticTokenChecker:
    """Tokens from a mapping of agent id to token."""

    def __init__(self, tokens: Mapping[str, str | bytes]) -> None:
        self._tokens = {
            k: v.encode("utf-8") if isinstance(v, str) else bytes(v) for k, v in tokens.items()
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} agents={sorted(self._tokens)}>"

    def has_agent(self, agent_id: str) -> bool:
        """Whether there is a token for C{agent_id}."""
        return agent_id in self._tokens

    def holds_token(self, agent_id: str, digest: bytes) -> bool:
        """
        Whether C{agent_id}'s token is still the one whose SHA-256 is
        C{digest} (L{_token_digest}): a reload that changed it (a token
        rotated after a leak) no longer admits the connections that
        registered with the old one.
        """
        expected = self._tokens.get(agent_id)
        if expected is None:
            return False
        return hmac.compare_digest(hashlib.sha256(expected).digest(), digest)

    def check_token(self, agent_id: str, token: str) -> bool:
        expected = self._tokens.get(agent_id)
        given = token.encode("utf-8", "surrogatepass")
        if expected is None:
            # Compare anyway, so an unknown id costs the same time as a wrong token.
            hmac.compare_digest(given, given)
            return False
        return hmac.compare_digest(expected, given)


@implementer(ITokenChecker)
class TokenFileChecker(StaticTokenChecker):
    """
    Tokens from a file of C{AGENT_ID TOKEN} lines (see L{parse_token_file}).
    L{reload} rereads it; a bad file leaves the previous tokens in force.

    @ivar path: the token file's path.
    @ivar permission_warning: what is wrong with the file's permissions
        (readable by others), C{None} if nothing is; refreshed by L{reload}.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(parse_token_file(path))
        self.permission_warning = _mode_warning(path)

    def reload(self) -> None:
        """
        Read the token file again.

        @raise TokenFileError: the file is missing or malformed; the tokens
            already loaded stay in force.
        """
        self._tokens = parse_token_file(self.path)
        self.permission_warning = _mode_warning(self.path)
