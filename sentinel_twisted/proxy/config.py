# -*- test-case-name: tests.test_config -*-
"""
L{ReverseConnectionConfig}: the settings of the reverse-connection listener,
with the reference implementation's defaults.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

import attrs

from .._operator_files import OperatorFileError, operator_lines, read_operator_file
from ..endpoints import system_max_backlog

__all__ = ["AgentAllowlist", "AllowFileError", "ReverseConnectionConfig", "read_allow_file"]

_GLOB_CHARS = frozenset("*?[")


@attrs.frozen
class AgentAllowlist:
    """
    Which agent ids may register: exact ids and glob patterns (C{waf-*}).
    An empty allowlist admits every agent, as the reference does.

    @ivar patterns: the exact ids and glob patterns as given; empty admits
        every agent.
    """

    patterns: tuple[str, ...] = ()
    _exact: frozenset[str] = attrs.field(init=False)
    _regex: re.Pattern[str] | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # Every pattern admits the id it spells, globs included: an agent
        # called "waf[1]" on the list is admitted.
        exact = frozenset(self.patterns)
        globs = [p for p in self.patterns if _GLOB_CHARS & set(p)]
        regex = (
            re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
            if globs
            else None
        )
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_regex", regex)

    @classmethod
    def of(cls, patterns: Iterable[str]) -> AgentAllowlist:
        """An allowlist of these patterns: C{AgentAllowlist.of(["waf-1", "bot-*"])}."""
        return cls(tuple(patterns))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def allows(self, agent_id: str) -> bool:
        """Whether C{agent_id} may register (always, when the list is empty)."""
        if not self.patterns or agent_id in self._exact:
            return True
        return self._regex is not None and self._regex.fullmatch(agent_id) is not None


class AllowFileError(ValueError):
    """An allowlist file that cannot be read or holds a bad line; the text says which."""


#: The largest allowlist file read: it is an operator's list, not a database.
MAX_ALLOW_FILE_BYTES = 1024 * 1024


def read_allow_file(path: str) -> tuple[str, ...]:
    """
    The agent ids and glob patterns of an allowlist file: one a line,
    blank lines and C{#} comments ignored.

    @raise AllowFileError: the file cannot be read, a line holds more than
        one word, or there is no pattern at all (an empty allowlist would
        admit every agent: a file emptied by mistake must not do that).
    """
    try:
        text = read_operator_file(path, MAX_ALLOW_FILE_BYTES, "allowlist")
    except OperatorFileError as e:
        raise AllowFileError(str(e)) from None
    patterns = []
    for number, line in operator_lines(text):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 1:
            raise AllowFileError(f"{path}:{number}: expected one agent id or pattern, got {len(words)} words")
        patterns.append(words[0])
    if not patterns:
        raise AllowFileError(f"{path}: no agent id or pattern (an empty allowlist would admit every agent)")
    return tuple(patterns)


def _allowlist(value: AgentAllowlist | Iterable[str]) -> AgentAllowlist:
    if isinstance(value, AgentAllowlist):
        return value
    if isinstance(value, str):
        return AgentAllowlist((value,))
    return AgentAllowlist(tuple(value))


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value!r}")


@attrs.frozen(kw_only=True)
class ReverseConnectionConfig:
    """
    Settings of the listener; defaults are the reference's.

    @ivar backlog: listen backlog handed to the endpoints this library
        builds from strings without an explicit C{backlog=}; by default the
        system's maximum (L{system_max_backlog}).
    @ivar handshake_timeout: seconds from connection to a complete
        RegistrationRequest; trickling bytes does not extend it.
    @ivar max_connections_per_agent: registered connections one agent id
        may hold at once.
    @ivar allowed_agents: ids or glob patterns; empty admits everybody.
    @ivar require_auth: refuse registrations without a token.
    @ivar request_timeout: default seconds a request waits for its answer.
    @ivar proxy_id: sent in every RegistrationResponse.
    @ivar max_pending_registrations: connections that may wait for their
        registration at once; beyond it a new connection takes the place of
        one from the address holding the most (its oldest that has sent
        nothing yet, else its oldest), if that address holds more than the
        newcomer's, else it is closed at once.
    @ivar max_pending_registrations_per_peer: connections from one TCP or
        TLS peer address (an IPv6 peer's /64 prefix; an IPv4-mapped or
        NAT64 one's IPv4 address) that may wait for their registration at once; beyond
        it a new connection from that address takes the place of the
        address's oldest one that has sent nothing for
        C{pending_eviction_age} seconds, and is closed at once if there is
        none (UNIX sockets have no peer address and are not counted).
    @ivar pending_eviction_age: seconds a connection awaiting registration
        must have sent nothing for before a newcomer from its address may
        take its place: an agent sends its registration at once, while the
        connections of a burst of agents from one host are all young and
        may simply not have been read yet (then newcomers are refused, and
        the agents retry).
    @ivar require_client_cert: a registering agent must hold a verified TLS
        client certificate issued for its agent id (see
        L{sentinel_twisted.proxy._identity}); the listener's TLS endpoints must
        demand and verify client certificates for this to mean anything.
    @ivar max_registration_frame_size: largest frame (length prefix) before
        registration; a RegistrationRequest never needs more.
    @ivar max_control_frame_size: largest Ping, Pong, HealthStatus or
        FlowControl frame read; a longer one from a registered agent is
        skipped (its bytes discarded as they arrive, a warning logged) and
        the connection carries on.  MetricsReport and ConfigUpdateRequest
        are limited like answers (16 MiB).
    @ivar max_incomplete_frame_bytes: bytes all connections together may
        hold in incomplete frames; over it the connection holding the most
        is closed.
    @ivar frame_timeout: seconds within which a started frame must be
        complete once registered; C{None}: the request timeout.
    @ivar max_agent_id_length: longest agent id, in UTF-8 bytes.
    @ivar max_metadata_size: largest registration metadata, in bytes of JSON.
    @ivar close_grace: seconds a connection the proxy closes has to be gone
        (its last frames sent, its TLS session shut down) before it is
        aborted: a peer that reads nothing, or never completes its TLS
        handshake, cannot keep a closed connection open.
    """

    backlog: int = attrs.field(factory=system_max_backlog)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    max_connections_per_agent: int = attrs.field(default=4, validator=_positive)
    allowed_agents: AgentAllowlist = attrs.field(
        factory=AgentAllowlist, converter=_allowlist
    )
    require_auth: bool = False
    request_timeout: float = attrs.field(default=30.0, validator=_positive)
    proxy_id: str = "sentinel-proxy"
    max_pending_registrations: int = attrs.field(default=1024, validator=_positive)
    max_pending_registrations_per_peer: int = attrs.field(default=64, validator=_positive)
    pending_eviction_age: float = attrs.field(default=1.0, validator=_not_negative)
    require_client_cert: bool = False
    max_registration_frame_size: int = attrs.field(default=1024 * 1024, validator=_positive)
    max_control_frame_size: int = attrs.field(default=64 * 1024, validator=_positive)
    max_incomplete_frame_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    frame_timeout: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    max_agent_id_length: int = attrs.field(default=256, validator=_positive)
    max_metadata_size: int = attrs.field(default=64 * 1024, validator=_positive)
    close_grace: float = attrs.field(default=5.0, validator=_positive)

    @property
    def frame_deadline(self) -> float:
        """Seconds a started frame has to complete (L{frame_timeout})."""
        return self.request_timeout if self.frame_timeout is None else self.frame_timeout
