"""
Reloads (SIGHUP) of C{twistd sentinel-reverse} with agents registering and
requests in flight, as generated sequences (hypothesis, deterministic): the
token and allowlist files are rewritten (valid in every way an editor
writes them, or broken), reloaded, and after every step

  - the connections that stay in service are exactly those whose agent and
    token the policy in force (the last valid files) allows; the others
    are closing, once their requests in flight are answered or timed out;
  - every request gets exactly one outcome: its answer, or
    L{ConnectionClosed} / L{RequestTimeout};
  - a broken file gives one error line naming the file (and the line, where
    there is one), and the policy in force does not change;
  - the gateway (without C{--agent}) still consults every agent seen that
    may register again, and no agent that is away and retired;
  - no log event holds a token, in its text or in any field, and none
    carries a traceback.

In memory: the listener on a memory clock, memory transports, the reload
called directly (C{tests.test_twistd} sends a real twistd the signal).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from sentinel_twisted import messages as m
from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.shared import Gateway
from sentinel_twisted.proxy._reload import ConfigurationReloader
from sentinel_twisted.proxy.auth import TokenFileChecker
from sentinel_twisted.proxy.config import AgentAllowlist, read_allow_file

from ._proxy_support import (
    Proxy,
    answer_frame,
    lose,
    registration_frame,
    request_headers,
    take_frames,
)

AGENTS = ("waf-1", "waf-2", "bot-1")
PATTERNS = ("waf-1", "waf-2", "bot-1", "waf-*", "nobody")
#: Every token any file or agent ever holds: none may reach a log event.
TOKENS = ("Tk-alpha-91f3", "Tk-bravo-27c8", "Tk-charlie-5e0d", "Tk-delta-c4b6")
TIMEOUT = 10.0

decorations = st.fixed_dictionaries(
    {
        "bom": st.booleans(),
        "crlf": st.booleans(),
        "comments": st.booleans(),
        "blank": st.booleans(),
        "trailing": st.sampled_from(["", " ", "\t", "  "]),
        "separator": st.sampled_from([" ", "\t", "   "]),
    }
)


def render(lines: list[str], style: dict[str, Any]) -> bytes:
    """C{lines} as an editor might save them."""
    out = []
    if style["comments"]:
        out.append("# agents of this proxy")
    for line in lines:
        out.append(line + style["trailing"])
        if style["blank"]:
            out.append("")
    eol = "\r\n" if style["crlf"] else "\n"
    data = (eol.join(out) + eol).encode("utf-8")
    return b"\xef\xbb\xbf" + data if style["bom"] else data


#: Broken token files: (lines before the broken one, the broken line's
#: bytes, what the error says); "" before the marker means "no line".
BROKEN_TOKENS = [
    ("duplicate", ":2:", "is listed twice"),
    ("three fields", ":2:", "found 3 fields"),
    ("one field", ":2:", "found 1 field"),
    ("not utf-8", ":2:", "not UTF-8"),
    ("no agent", "", "lists no agent"),
    ("missing", "", "cannot read token file"),
    ("directory", "", "cannot read token file"),
]
BROKEN_ALLOW = [
    ("two words", ":2:", "expected one agent id or pattern"),
    ("not utf-8", ":2:", "not UTF-8"),
    ("no pattern", "", "no agent id or pattern"),
    ("missing", "", "cannot read"),
]


class Tracked:
    """One of our agents' connections, and what the model expects of it."""

    def __init__(self, agent_id: str, token: str | None, protocol: Any, transport: Any) -> None:
        self.agent_id = agent_id
        self.token = token
        self.protocol = protocol
        self.transport = transport
        self.connection = protocol.connection
        #: A reload since registration did not allow it, or the agent left.
        self.retired = False
        self.lost = False
        #: Correlation id -> outcomes seen ("answer" or the error's class).
        self.requests: dict[str, list[str]] = {}


class ReloadMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="st-reload-props-")
        self.tokens_path = os.path.join(self.dir, "tokens")
        self.allow_path = os.path.join(self.dir, "allowed")
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.serial = 0
        self.events_checked = 0

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self.events.append)
        shutil.rmtree(self.dir, True)

    # -- files -------------------------------------------------------------------

    def write(self, path: str, data: bytes, mode: int = 0o600) -> None:
        if os.path.isdir(path):
            os.rmdir(path)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    def token_lines(self, tokens: dict[str, str], style: dict[str, Any]) -> list[str]:
        return [f"{agent}{style['separator']}{token}" for agent, token in tokens.items()]

    @initialize(
        tokens=st.dictionaries(st.sampled_from(AGENTS), st.sampled_from(TOKENS), min_size=1),
        patterns=st.lists(st.sampled_from(PATTERNS), min_size=1, unique=True),
        require_auth=st.booleans(),
    )
    def start(self, tokens: dict[str, str], patterns: list[str], require_auth: bool) -> None:
        style = {"bom": False, "crlf": False, "comments": False, "blank": False, "trailing": "", "separator": " "}
        self.write(self.tokens_path, render(self.token_lines(tokens, style), style))
        self.write(self.allow_path, render(patterns, style))
        self.policy_tokens = dict(tokens)
        self.policy_allow = AgentAllowlist(tuple(patterns))
        self.require_auth = require_auth
        self.world_readable = False
        self.proxy = Proxy(
            TokenFileChecker(self.tokens_path),
            allowed_agents=read_allow_file(self.allow_path),
            request_timeout=TIMEOUT,
            require_auth=require_auth,
            max_connections_per_agent=1000,
        )
        self.reloader = ConfigurationReloader(
            self.proxy.factory, token_file=self.tokens_path, allow_file=self.allow_path
        )
        self.gateway = Gateway(self.proxy.pool, GatewayConfig(), object(), clock=self.proxy.clock)  # type: ignore[arg-type]
        self.gateway.watch_agents()
        self.reloader.reloaded.append(self.gateway.forget_absent_agents)
        self.reloader.reloaded.append(self.forgotten)
        self.tracked: list[Tracked] = []
        #: The agents the gateway consults: those seen, less those forgotten.
        self.seen: set[str] = set()

    # -- the model ---------------------------------------------------------------

    def admits(self, agent_id: str, token: str | None) -> bool:
        """Whether the policy in force admits this agent with this token."""
        if not self.policy_allow.allows(agent_id):
            return False
        if token is None:
            return not self.require_auth
        return self.policy_tokens.get(agent_id) == token

    def may_register(self, agent_id: str) -> bool:
        """What the reloader calls not retired."""
        if not self.policy_allow.allows(agent_id):
            return False
        return not self.require_auth or agent_id in self.policy_tokens

    def settle(self) -> None:
        """The reactor reports the close of every transport the proxy closed."""
        for t in self.tracked:
            if t.transport.disconnecting and not t.lost:
                t.lost = True
                lose(t.protocol)

    def reload(self) -> tuple[bool, list[dict[str, Any]]]:
        before = len(self.events)
        ok = self.reloader.reload()
        self.settle()
        return ok, self.events[before:]

    # -- agents ------------------------------------------------------------------

    @rule(
        agent_id=st.sampled_from(AGENTS),
        which=st.sampled_from(["right", "wrong", "none", "any"]),
        any_token=st.sampled_from(TOKENS),
    )
    def register(self, agent_id: str, which: str, any_token: str) -> None:
        if which == "right":
            token: str | None = self.policy_tokens.get(agent_id, any_token)
        elif which == "wrong":
            token = next(t for t in TOKENS if t != self.policy_tokens.get(agent_id))
        elif which == "none":
            token = None
        else:
            token = any_token
        expected = self.admits(agent_id, token)
        protocol, transport = self.proxy.connect()
        protocol.dataReceived(registration_frame(agent_id, token=token))
        [(_, payload)] = take_frames(transport)
        response = m.decode(payload, m.RegistrationResponse)
        assert response.success == expected, (agent_id, which, response.error)
        if expected:
            self.tracked.append(Tracked(agent_id, token, protocol, transport))
            self.seen.add(agent_id)
        else:
            assert transport.disconnecting
            lose(protocol)

    def live(self) -> list[Tracked]:
        return [t for t in self.tracked if not t.lost]

    @precondition(lambda self: any(not t.lost for t in self.tracked))
    @rule(index=st.integers(0, 100))
    def send_request(self, index: int) -> None:
        live = self.live()
        t = live[index % len(live)]
        self.serial += 1
        cid = f"r{self.serial}"
        outcomes = t.requests[cid] = []
        d = t.connection.send_event(request_headers(cid))

        def failed(f: Failure) -> None:
            outcomes.append(type(f.value).__name__)

        d.addCallbacks(lambda _: outcomes.append("answer"), failed)
        if t.connection.is_closed:
            # Nothing new goes to a closing connection.
            assert outcomes == ["ConnectionClosed"], outcomes

    @precondition(lambda self: any(not t.lost and t.connection.in_flight for t in self.tracked))
    @rule(index=st.integers(0, 100))
    def answer(self, index: int) -> None:
        waiting = [t for t in self.live() if t.connection.in_flight]
        t = waiting[index % len(waiting)]
        cid = next(c for c, o in t.requests.items() if not o)
        t.protocol.dataReceived(answer_frame(cid))
        self.settle()

    @precondition(lambda self: any(not t.lost for t in self.tracked))
    @rule(index=st.integers(0, 100))
    def agent_leaves(self, index: int) -> None:
        live = self.live()
        t = live[index % len(live)]
        t.lost = True
        t.retired = True
        lose(t.protocol)
        self.settle()

    @rule(seconds=st.sampled_from([0.05, 1.0, TIMEOUT + 1]))
    def time_passes(self, seconds: float) -> None:
        self.proxy.clock.advance(seconds)
        self.settle()
        self.proxy.clock.advance(0)
        self.settle()

    # -- files and reloads ---------------------------------------------------------

    @rule(
        tokens=st.dictionaries(st.sampled_from(AGENTS), st.sampled_from(TOKENS), min_size=1),
        style=decorations,
        world_readable=st.booleans(),
        busy=st.booleans(),
    )
    def reload_valid_tokens(
        self, tokens: dict[str, str], style: dict[str, Any], world_readable: bool, busy: bool
    ) -> None:
        self.busy(busy)
        self.write(self.tokens_path, render(self.token_lines(tokens, style), style), 0o644 if world_readable else 0o600)
        self.policy_tokens = dict(tokens)
        self.world_readable = world_readable
        self.valid_reload()

    @rule(patterns=st.lists(st.sampled_from(PATTERNS), min_size=1), style=decorations, busy=st.booleans())
    def reload_valid_allowlist(self, patterns: list[str], style: dict[str, Any], busy: bool) -> None:
        self.busy(busy)
        # Duplicates are allowed in an allowlist.
        self.write(self.allow_path, render(patterns, style))
        self.policy_allow = AgentAllowlist(tuple(patterns))
        self.valid_reload()

    def busy(self, busy: bool) -> None:
        """If C{busy}, a request in flight on every connection in service."""
        if busy:
            for index, t in enumerate(self.live()):
                if not t.connection.is_closed:
                    self.send_request(index)

    def valid_reload(self) -> None:
        ok, events = self.reload()
        assert ok, [formatEvent(e) for e in events]
        warnings = [formatEvent(e) or "" for e in events if e["log_level"] == LogLevel.warn]
        permission = [w for w in warnings if "readable by group or others" in w]
        # Used, with a warning at every reload while it stays so.
        if self.world_readable:
            assert len(permission) == 1 and self.tokens_path in permission[0], warnings
        else:
            assert not permission, warnings
        for t in self.tracked:
            if not self.admits(t.agent_id, t.token):
                t.retired = True

    @rule(kind=st.sampled_from(BROKEN_TOKENS), style=decorations)
    def reload_broken_tokens(self, kind: tuple[str, str, str], style: dict[str, Any]) -> None:
        name, where, says = kind
        good = "waf-1 Tk-alpha-91f3"
        broken = {
            "duplicate": ["waf-1 Tk-alpha-91f3", "waf-1 Tk-bravo-27c8"],
            "three fields": [good, "waf-2 Tk-bravo-27c8 extra"],
            "one field": [good, "Tk-bravo-27c8"],
            "no agent": [],
        }
        if name == "missing":
            if os.path.isdir(self.tokens_path):
                os.rmdir(self.tokens_path)
            elif os.path.exists(self.tokens_path):
                os.unlink(self.tokens_path)
        elif name == "directory":
            if os.path.exists(self.tokens_path) and not os.path.isdir(self.tokens_path):
                os.unlink(self.tokens_path)
            os.makedirs(self.tokens_path, exist_ok=True)
        elif name == "not utf-8":
            data = render([good, "waf-2 Tk-\xff"], {**style, "comments": False, "blank": False})
            self.write(self.tokens_path, data.replace(b"\xc3\xbf", b"\xff"))
        else:
            self.write(self.tokens_path, render(broken[name], {**style, "comments": False, "blank": False}))
        self.broken_reload("--token-file", self.tokens_path, where, says)

    @rule(kind=st.sampled_from(BROKEN_ALLOW), style=decorations)
    def reload_broken_allowlist(self, kind: tuple[str, str, str], style: dict[str, Any]) -> None:
        name, where, says = kind
        plain = {**style, "comments": False, "blank": False}
        if name == "missing":
            if os.path.exists(self.allow_path):
                os.unlink(self.allow_path)
        elif name == "two words":
            self.write(self.allow_path, render(["waf-1", "waf-2 bot-1"], plain))
        elif name == "not utf-8":
            self.write(self.allow_path, render(["waf-1", "bot-\xff"], plain).replace(b"\xc3\xbf", b"\xff"))
        else:
            self.write(self.allow_path, render([], {**style, "comments": True}))
        self.broken_reload("--allow-file", self.allow_path, where, says)

    def broken_reload(self, option: str, path: str, where: str, says: str) -> None:
        factory = self.proxy.factory
        checker, config = factory.token_checker, factory.config
        in_service = [t for t in self.tracked if not t.connection.is_closed]
        ok, events = self.reload()
        assert not ok
        [event] = events
        text = formatEvent(event) or ""
        assert event["log_level"] == LogLevel.error, text
        assert text.startswith("Reload failed, the configuration in force is unchanged: " + option), text
        assert path + where in text, (path + where, text)
        assert says in text, text
        assert factory.token_checker is checker and factory.config is config
        assert all(not t.connection.is_closed for t in in_service)
        # The operator mends the file (the policy in force, written again).
        self.restore()

    def restore(self) -> None:
        plain = {"bom": False, "crlf": False, "comments": False, "blank": False, "trailing": "", "separator": " "}
        self.write(self.tokens_path, render(self.token_lines(self.policy_tokens, plain), plain))
        self.write(self.allow_path, render(list(self.policy_allow.patterns), plain))
        self.world_readable = False

    # -- properties ------------------------------------------------------------------

    @invariant()
    def in_service_are_exactly_those_allowed(self) -> None:
        if not hasattr(self, "proxy"):
            return
        pool = self.proxy.pool
        in_pool = {c.connection_id for c in pool.connections()}
        for t in self.tracked:
            c = t.connection
            if t.retired:
                # Closing: nothing new goes to it; gone once closed.
                assert c.is_closed, (t.agent_id, t.token)
                if t.lost:
                    assert c.connection_id not in in_pool
            else:
                assert not c.is_closed and c.connection_id in in_pool, (t.agent_id, t.token)
                assert self.admits(t.agent_id, t.token)
        assert in_pool <= {t.connection.connection_id for t in self.tracked}

    @invariant()
    def every_request_has_one_outcome(self) -> None:
        if not hasattr(self, "proxy"):
            return
        for t in self.tracked:
            for cid, outcomes in t.requests.items():
                assert len(outcomes) <= 1, (cid, outcomes)
                if outcomes:
                    assert outcomes[0] in ("answer", "ConnectionClosed", "RequestTimeout"), outcomes
                if t.lost:
                    assert len(outcomes) == 1, (cid, outcomes)

    def forgotten(self, retired: Any) -> None:
        """After the gateway's: what it forgets, in the model."""
        pool = self.proxy.pool
        for agent_id in list(self.seen):
            assert retired(agent_id) == (not self.may_register(agent_id)), agent_id
            if agent_id not in pool and retired(agent_id):
                self.seen.discard(agent_id)

    @invariant()
    def the_gateway_waits_for_exactly_the_agents_that_may_return(self) -> None:
        if not hasattr(self, "proxy"):
            return
        known = set(self.gateway.agent_ids())
        assert known == self.seen, (known, self.seen)
        if not self.reloader.draining:
            # Once the reload's drains are done, no agent it retired is
            # waited for; every other agent seen still is (fail closed).
            registered = set(self.proxy.pool.agent_ids())
            for agent_id in known:
                assert agent_id in registered or self.may_register(agent_id), agent_id

    @invariant()
    def no_token_is_logged_and_nothing_failed(self) -> None:
        for event in self.events[self.events_checked :]:
            text = formatEvent(event) or ""
            fields = repr({k: v for k, v in event.items() if k != "log_logger"})
            for token in TOKENS:
                assert token not in text and token not in fields, text
            assert "log_failure" not in event, text
        self.events_checked = len(self.events)


ReloadMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ReloadPropertyTests = ReloadMachine.TestCase
