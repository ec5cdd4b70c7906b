#!/usr/bin/env python3
"""
A token checker that keeps only SHA-256 digests of the agents' tokens.

Plug it into the listener with
C{ReverseConnectionFactory(config, pool, token_checker=HashedTokenChecker(...))}.

Run as a script, it prints the digest line for one agent, reading the
token from standard input (so it stays out of the shell history):

    python examples/token_checker.py waf-1 < waf-1.token >> agent-digests
"""

from __future__ import annotations

import hashlib
import hmac
import sys

from zope.interface import implementer

from sentinel_twisted.proxy.auth import ITokenChecker


@implementer(ITokenChecker)
class HashedTokenChecker:
    """Knows each agent's token only by its SHA-256 digest."""

    def __init__(self, digests: dict[str, str]) -> None:
        self._digests = {agent: bytes.fromhex(digest) for agent, digest in digests.items()}

    def check_token(self, agent_id: str, token: str) -> bool:
        given = hashlib.sha256(token.encode("utf-8")).digest()
        expected = self._digests.get(agent_id, bytes(len(given)))
        # compare_digest takes the same time wherever the first difference is.
        return hmac.compare_digest(given, expected) and agent_id in self._digests


def load_digests(path: str) -> dict[str, str]:
    """Read C{AGENT_ID SHA256_HEX} lines; blank lines and C{#} comments are skipped."""
    digests = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2 or len(fields[1]) != 64:
                raise ValueError(f"{path}:{number}: expected 'AGENT_ID SHA256_HEX'")
            digests[fields[0]] = fields[1]
    return digests


def digest_line(agent_id: str, token: str) -> str:
    return f"{agent_id} {hashlib.sha256(token.encode('utf-8')).hexdigest()}"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: token_checker.py AGENT_ID < TOKEN_FILE")
    print(digest_line(sys.argv[1], sys.stdin.read().strip()))
