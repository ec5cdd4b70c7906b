# -*- test-case-name: tests.agent.test_rules -*-
"""
A rule engine, and L{RulesAgent}: the agent C{twistd sentinel-agent} runs.

Rules live in a TOML (or JSON) file and are checked in file order against
each request's headers (and, for C{body} and C{body_contains}, its body).  A rule
matches when every condition in its C{match} table holds.  Header
operations and tags of every matching rule accumulate; the first matching
rule with a decision (C{block}, C{redirect}, C{require_header}) decides and
ends the evaluation.  No decision means allow.  A decision taken on the
body carries what the header phase gathered (its response header
operations, rule ids and tags), just as one taken on the headers does.
A rule looks like this::

    [[rules]]
    id = "no-admin"
    match = { path = "^/admin(/|$)" }
    block = { status = 403, body = "Forbidden" }

A request whose method, target, headers or client address are past the
bounds of the file's C{[request]} table (L{RequestPolicy}), or whose
method is no HTTP token, is not looked at by any rule: it is refused
(C{501}, C{414}, C{431}, C{400}) or, with C{uninspectable = "allow"}, let
through.

Errors are reported with the file, the rule and the reason, all of them at
once; a reload (SIGHUP) that finds a bad file keeps the rules it had.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ... import messages as m
from ..._peertext import peer_text
from ..._ratelimit import LogRateLimiter
from .._interfaces import HandlerResult
from ..base import Agent
from ..responses import allow
from ._compile import compile_pattern, load_rules, parse_rules
from ._decode import BodyPolicy, Uninspectable
from ._evaluate import BODY_WINDOW, SHORT_TEXT_IN_LOG, RuleSet, Verdict, _BodyScan, request_in_log
from ._limits import RequestPolicy
from ._model import Pattern, Rule, RulesError

__all__ = [
    "BODY_WINDOW",
    "BodyPolicy",
    "Pattern",
    "RequestPolicy",
    "Rule",
    "RuleSet",
    "RulesAgent",
    "RulesError",
    "Verdict",
    "compile_pattern",
    "load_rules",
    "parse_rules",
]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.agent.rules")


class RulesAgent(Agent):
    """
    An agent that applies a L{RuleSet} from a file, reloadable at run time.

    Requests whose headers match a body rule are answered with
    C{needs_more} and their body chunks are scanned (across chunk
    boundaries); the first chunk in which a body rule matches decides.

    A request past the bounds of the rules' C{[request]} table is answered
    by its policy, and a warning says so (rate limited by L{log_limiter}).

    @param max_concurrency: events served at once per connection
        (announced in the capabilities); at least 1.
    @param clock: the time the warnings are rate limited by (the global
        reactor when not given).
    @cvar name: the agent's name in its capabilities.
    @ivar path: the rules file.
    @ivar ruleset: the rules in force.
    @ivar max_concurrency: events served at once per connection (announced in
        the capabilities).
    """

    name = "sentinel-rules"
    #: Requests awaiting a body scan that are remembered at most (oldest go first).
    max_tracked_bodies = 10_000
    #: Compressed bodies inflated at once (each holds zlib's state, about
    #: 40 KiB); past it a compressed body is uninspectable (C{503}), and the
    #: rules' C{[body]} policy decides.
    max_inflating_bodies = 1_000

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_concurrency: int | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
        ):
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        self.path = os.fspath(path)
        self.ruleset = load_rules(self.path)
        if max_concurrency is not None:
            self.max_concurrency = max_concurrency
        # Keyed by _tracking_key(correlation id).
        self._bodies: OrderedDict[str | bytes, _BodyScan] = OrderedDict()
        # Requests pushed out of _bodies by newer ones: their later chunks
        # get the [body] policy's answer, never an unchecked allow.
        self._evicted: OrderedDict[str | bytes, _BodyScan] = OrderedDict()
        self._inflating: set[str | bytes] = set()
        self._clock = clock
        self._log_limiter: LogRateLimiter | None = None

    @property
    def log_limiter(self) -> LogRateLimiter:
        """
        Rate limits the warnings for requests past the C{[request]} bounds
        (one line per kind per ten seconds, and then how many more there
        were): a client that sends them by the thousand makes a line, not
        a thousand.
        """
        limiter = self._log_limiter
        if limiter is None:
            clock: Any = self._clock
            if clock is None:
                from twisted.internet import reactor as clock
            limiter = self._log_limiter = LogRateLimiter(clock, period=10.0, burst=1)
        return limiter

    def reload(self) -> bool:
        """
        Re-read the rules file.  On any error the current rules stay in
        force and the error is logged; returns whether the new rules took.
        """
        try:
            ruleset = load_rules(self.path)
        except RulesError as e:
            log.error(
                "Rules reload failed; keeping the {count} rule(s) in force:\n{error}",
                count=len(self.ruleset),
                error=str(e),
            )
            return False
        if ruleset.needs_body != self.ruleset.needs_body:
            log.warn(
                "The reloaded rules {change} request bodies; connections announce this when "
                "they register, so it takes effect as they reconnect",
                change="inspect" if ruleset.needs_body else "no longer inspect",
            )
        self.ruleset = ruleset
        log.info("Reloaded {count} rule(s) from {path}", count=len(ruleset), path=self.path)
        return True

    def supported_events(self) -> list[int]:
        events = [int(m.EventType.REQUEST_HEADERS)]
        if self.ruleset.needs_body:
            events += [int(m.EventType.REQUEST_BODY_CHUNK), int(m.EventType.REQUEST_COMPLETE)]
        return events

    def on_request_headers(self, event: m.RequestHeadersEvent) -> HandlerResult:
        verdict = self.ruleset.evaluate(event)
        cid = m.event_correlation_id(event)
        if verdict.uninspectable is not None:
            self._log_uninspectable_request(verdict.uninspectable, event, cid)
        elif verdict.decided_by is not None:
            self._log_decision(verdict.decided_by, _request_fields(event, cid))
        elif verdict.body_rules:
            inflate = len(self._inflating) < self.max_inflating_bodies
            self._track(_tracking_key(cid), _BodyScan(verdict, event, self.ruleset.body, inflate))
        return verdict.response

    def on_request_body_chunk(self, event: m.RequestBodyChunkEvent) -> HandlerResult:
        cid = event.correlation_id
        key = _tracking_key(cid)
        scan = self._bodies.get(key)
        if scan is None:
            evicted = self._evicted.pop(key, None)
            return allow() if evicted is None else self._evicted_chunk(cid, evicted, event)
        rule = scan.feed(event.body, event.is_last)
        if rule is not None or event.is_last:
            self._forget(key)
        fields = _chunk_fields(scan, event, cid)
        for failure in scan.failures:
            _log_uninspected(failure, False, fields)
        scan.failures.clear()
        if rule is None:
            return allow().needs_more(not event.is_last)
        if isinstance(rule, Uninspectable):
            _log_uninspected(rule, True, fields)
            return scan.refused(rule)
        self._log_decision(rule, fields)
        return scan.decided(rule)

    def on_request_complete(self, event: m.RequestCompleteEvent) -> HandlerResult:
        key = _tracking_key(event.correlation_id)
        self._forget(key)
        self._evicted.pop(key, None)
        return allow()

    def _track(self, key: str | bytes, scan: _BodyScan) -> None:
        self._forget(key)
        self._evicted.pop(key, None)
        self._bodies[key] = scan
        if scan.inflater is not None:
            self._inflating.add(key)
        while len(self._bodies) > self.max_tracked_bodies:
            oldest = next(iter(self._bodies))
            pushed_out = self._bodies[oldest]
            self._forget(oldest)
            # Only what the answer needs is kept (no readers, no inflater).
            self._evicted[oldest] = pushed_out.evicted()
            if len(self._evicted) > self.max_tracked_bodies:
                self._evicted.popitem(last=False)

    def _forget(self, key: str | bytes) -> None:
        self._bodies.pop(key, None)
        self._inflating.discard(key)

    def _evicted_chunk(self, cid: str, scan: _BodyScan, event: m.RequestBodyChunkEvent) -> HandlerResult:
        """A chunk of a request whose scan newer requests pushed out: the policy decides."""
        failure = Uninspectable(
            "too many request bodies were being inspected at once", 503, "body_scan_evicted"
        )
        blocks = scan.policy.blocks
        _log_uninspected(failure, blocks, _chunk_fields(scan, event, cid))
        return scan.refused(failure) if blocks else allow()

    def _log_uninspectable_request(
        self, failure: Uninspectable, event: m.RequestHeadersEvent, cid: str
    ) -> None:
        """Warn of a request past the [request] bounds: refused, or let through unmatched."""
        # A method that is no token is not too large: it cannot be inspected all the same.
        what = "cannot be inspected" if failure.code == "method_invalid" else "too large to inspect"
        if self.ruleset.request.blocks:
            action = "blocked ({status})"
        else:
            action = "allowed unmatched by the [request] policy"
        self.log_limiter.warn(
            log,
            f"request-uninspectable:{failure.code}",
            f"Request {what}, {action}: {{reason}}: {{method}} {{uri}}{{client}} [{{cid}}]",
            status=failure.status,
            reason=failure.reason,
            **_request_fields(event, cid),
        )

    def _log_decision(self, rule: Rule, fields: dict[str, str]) -> None:
        decision = rule.decision
        if isinstance(decision, m.Block):
            action = f"blocked ({decision.status})"
        elif isinstance(decision, m.Redirect):
            action = f"redirected ({decision.status} {decision.url})"
        else:
            action = "decided"
        log.info(
            "Rule {rule} {action}: {method} {uri}{client} [{cid}]",
            rule=rule.id,
            action=action,
            **fields,
        )


#: The longest correlation id a request awaiting its body is remembered by
#: as it is; a longer one by its SHA-256 digest (see L{_tracking_key}).
_LONGEST_TRACKED_ID = 256


def _tracking_key(cid: str) -> str | bytes:
    """
    What a request awaiting its body is remembered by: its correlation id,
    or the id's SHA-256 digest (bytes, never equal to an id) when it is
    longer than L{_LONGEST_TRACKED_ID}.  The proxy chooses the ids, up to a
    frame's 16 MiB: thousands of requests awaiting their bodies would
    otherwise hold thousands of them.
    """
    if len(cid) <= _LONGEST_TRACKED_ID:
        return cid
    return hashlib.sha256(cid.encode("utf-8", "surrogatepass")).digest()


def _request_fields(event: m.RequestHeadersEvent, cid: str) -> dict[str, str]:
    """
    The request a log line names, cut short and escaped (L{request_in_log}),
    with its correlation id.
    """
    fields = request_in_log(event.method, event.uri, event.metadata.client_ip)
    fields["cid"] = peer_text(cid, SHORT_TEXT_IN_LOG)
    return fields


def _chunk_fields(scan: _BodyScan, event: m.RequestBodyChunkEvent, cid: str) -> dict[str, str]:
    """What a log line names for a body chunk: the request its scan kept, and the chunk."""
    fields = dict(scan.logged)
    fields["uri"] = f"{fields['uri']} (body chunk {event.chunk_index})"
    fields["cid"] = peer_text(cid, SHORT_TEXT_IN_LOG)
    return fields


def _log_uninspected(failure: Uninspectable, blocked: bool, fields: dict[str, str]) -> None:
    """Log a body the rules could not inspect: refused, or let through by the [body] policy."""
    if blocked:
        format = "Request body cannot be inspected, blocked ({status}): {reason}: {method} {uri}{client} [{cid}]"
    else:
        format = "Request body not fully inspected, allowed by the [body] policy: {reason}: {method} {uri}{client} [{cid}]"
    log.info(
        format,
        status=failure.status,
        # It may quote the request's content codings.
        reason=peer_text(failure.reason),
        **fields,
    )
