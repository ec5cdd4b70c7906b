# -*- test-case-name: tests.agent.test_rules -*-
"""
What a compiled rule is, and what it looks at in a request: the rule's
conditions, matched against a view of the request computed once (paths
as sent, decoded and normalized; header values; the client address).
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Iterable, Iterator
from typing import Protocol
from urllib.parse import unquote

import attrs

from ... import messages as m

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RulesError(Exception):
    """
    A rules file that cannot be used.  C{problems} holds one line per
    problem (C{rule 'id' (#n): reason}); C{str()} prefixes each with the
    file name.

    @ivar source: the file (or other source) of the rules.
    @ivar problems: one line per problem.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(source, problems)
        self.source = source
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {p}" for p in self.problems)


class _Problems(Exception):
    """Problems in one part of a rule, gathered by the compiler."""


@attrs.frozen
class _Defaults:
    block_status: int = 403
    block_body: str = "Forbidden"
    redirect_status: int = 302


class Pattern(Protocol):
    """A compiled rule pattern (RE2): what the rules ask of one."""

    def search(self, text: str) -> object | None:
        """A match of the pattern anywhere in C{text}, or C{None}."""


@attrs.frozen(kw_only=True)
class Rule:
    """
    One compiled rule.  Conditions that are C{None} or empty always hold.

    @ivar id: the rule's id, from the file.
    @ivar position: its place in the file, from 1.
    @ivar description: what it is for, from the file.
    @ivar methods: the methods it applies to (upper-case), C{None} for all.
    @ivar path: a pattern the request path must match (searched, not
        anchored).
    @ivar uri: the whole request target must match it.
    @ivar query: the query must match it.
    @ivar headers: C{(name, pattern)}: a value of each named header must match
        its pattern.
    @ivar any_header: some header value must match it.
    @ivar header_present: headers that must be there.
    @ivar header_missing: headers that must not be there.
    @ivar client_ip: networks the client address must be in (one of them);
        empty: any address.
    @ivar client_ip_not: networks the client address must not be in.
    @ivar body_contains: byte strings the body must contain (any of them).
    @ivar body: the body must match it.
    @ivar decision: what the rule decides when it matches, C{None}: it decides
        nothing.
    @ivar request_ops: header operations on the request when it matches.
    @ivar response_ops: header operations on the response when it matches.
    @ivar tags: audit tags added when it matches.
    """

    id: str
    position: int
    description: str = ""
    methods: frozenset[str] | None = None
    path: Pattern | None = None
    uri: Pattern | None = None
    query: Pattern | None = None
    headers: tuple[tuple[str, Pattern], ...] = ()
    any_header: Pattern | None = None
    header_present: tuple[str, ...] = ()
    header_missing: tuple[str, ...] = ()
    client_ip: tuple[_Network, ...] = ()
    client_ip_not: tuple[_Network, ...] = ()
    body_contains: tuple[bytes, ...] = ()
    body: Pattern | None = None
    decision: m.Decision | None = None
    request_ops: tuple[m.HeaderOp, ...] = ()
    response_ops: tuple[m.HeaderOp, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def on_body(self) -> bool:
        """Whether the rule looks at the body (and so decides on it)."""
        return bool(self.body_contains) or self.body is not None

    def matches(self, request: _RequestView) -> bool:
        """Whether every condition except those on the body holds."""
        if self.methods is not None and request.method not in self.methods:
            return False
        if self.path is not None and not _any_search(self.path, request.paths):
            return False
        if self.uri is not None and not _any_search(self.uri, request.uris):
            return False
        if self.query is not None and not _any_search(self.query, request.queries):
            return False
        for name, pattern in self.headers:
            if not _any_search(pattern, request.header_values_of(name)):
                return False
        if self.any_header is not None and not _any_search(self.any_header, request.header_values):
            return False
        for name in self.header_present:
            if name not in request.headers:
                return False
        for name in self.header_missing:
            if name in request.headers:
                return False
        if self.client_ip and not _in_networks(request.client_ip, self.client_ip):
            return False
        if self.client_ip_not and _in_networks(request.client_ip, self.client_ip_not):
            return False
        return True


def _in_networks(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, networks: tuple[_Network, ...]
) -> bool:
    # An unparseable client address is in no network: "client_ip" does not
    # match it and "client_ip_not" does, the cautious reading of both.
    return ip is not None and any(ip in net for net in networks if ip.version == net.version)


def _any_search(pattern: Pattern, values: Iterable[str]) -> bool:
    return any(pattern.search(v) is not None for v in values)


#: Characters of a path normalised at a time: a piece of whole segments,
#: longer only when it is one segment.  A path of megabytes (a proxy's
#: events are up to 16 MiB) made a string per segment in C{posixpath}
#: (Python 3.10) and in C{re.sub}: twenty times its size.  Piece by piece
#: the work costs the result, and a piece's worth besides.
_PATH_PIECE = 8192

#: The first character of a segment.
_SEGMENT = re.compile(r"[^/]")

#: The C{..} segments a normalised relative path starts with (the ones
#: that take segments off the pieces before it).
_LEADING_UPS = re.compile(r"(?:\.\.(?:/|\Z))*")

#: A path parameter (RFC 3986 section 3.3): C{;} up to the end of its segment.
_PATH_PARAMETER = re.compile(r";[^/]*")


def _normalize_path(path: str, drop_parameters: bool = False) -> str:
    """
    Collapse repeated slashes and resolve C{.} and C{..} segments.  A
    trailing slash survives, and a last segment C{.} or C{..} leaves one
    (C{/a/b/.} is C{/a/b/}, C{/a/b/..} is C{/a/}), as RFC 3986 section
    5.2.4 removes dot segments.  An empty path is C{/}.

    With C{drop_parameters}, path parameters go first: C{/admin;x/a;b=1}
    is C{/admin/a}.  Servlet containers (Tomcat, Jetty) and the frameworks
    on them drop them before they route, so C{/admin;x} reaches C{/admin}
    there (and C{/a/..;/admin} is C{/admin}).

    The path is resolved in pieces of whole segments (L{_PATH_PIECE}
    characters), each with C{posixpath.normpath} as a relative path; the
    C{..} segments a piece starts with then take segments off the pieces
    kept before it, and the kept pieces are joined once at the end.
    """
    # (A first segment that is all parameter leaves the slash after it first.)
    absolute = path.startswith("/") or (drop_parameters and path.startswith(";"))
    # The resolved pieces (no empty, "." or ".." segment), and the segments in each.
    kept: list[str] = []
    segments: list[int] = []
    # The ".." segments that go above the start of a relative path (they stay).
    ups = 0
    for start, end in _pieces(path):
        piece = path[start:end]
        if drop_parameters and ";" in piece:
            piece = _PATH_PARAMETER.sub("", piece)
        if "/" in piece:
            # A piece of several segments: at most _PATH_PIECE characters.
            piece = posixpath.normpath(piece.lstrip("/"))
        if piece in ("", "."):
            continue
        # What the piece leaves of those before it: ".." segments first.
        ups_match = _LEADING_UPS.match(piece)
        after_ups = ups_match.end() if ups_match is not None else 0
        pops = (after_ups + 1) // 3
        while pops and kept:
            if segments[-1] <= pops:
                pops -= segments.pop()
                kept.pop()
            else:
                kept[-1] = kept[-1].rsplit("/", pops)[0]
                segments[-1] -= pops
                pops = 0
        if not absolute:
            ups += pops
        if after_ups < len(piece):
            rest = piece[after_ups:]
            kept.append(rest)
            segments.append(rest.count("/") + 1)
    if ups:
        kept.insert(0, ("../" * ups)[:-1])
    if not kept:
        return "/"
    if absolute:
        kept.insert(0, "")
    if _directory(path, drop_parameters):
        kept.append("")
    return "/".join(kept)


def _pieces(path: str) -> Iterator[tuple[int, int]]:
    """
    Where the pieces of L{_normalize_path} are in C{path}: runs of whole
    segments of at most L{_PATH_PIECE} characters (a longer segment is a
    piece of its own), without the slashes before and between them.
    """
    length = len(path)
    segment = _SEGMENT.search(path)
    while segment is not None:
        start = segment.start()
        if length - start <= _PATH_PIECE:
            end = length
        else:
            end = path.rfind("/", start, start + _PATH_PIECE + 1)
            if end < 0:
                end = path.find("/", start + _PATH_PIECE)
                if end < 0:
                    end = length
        yield start, end
        segment = _SEGMENT.search(path, end)


def _directory(path: str, drop_parameters: bool) -> bool:
    """
    Whether C{path} (without its parameters, with C{drop_parameters}) ends
    with a slash or a dot segment: its normal form ends with a slash.
    """
    start = path.rfind("/") + 1
    end = len(path)
    if drop_parameters:
        parameter = path.find(";", start)
        if parameter >= 0:
            end = parameter
    return end - start <= 2 and path[start:end] in ("", ".", "..")


#: What C{urllib.parse.urlsplit} strips from the start of a URL: C0
#: controls and space.
_C0_OR_SPACE = "".join(map(chr, range(0x21)))

#: An absolute URI's scheme and its colon (RFC 3986 section 3.1).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _target_parts(uri: str, fragment: bool = True) -> tuple[str, str]:
    """
    The path and the query of a request target.  An absolute-form one
    (C{http://host/admin?x}) is split as C{urllib.parse.urlsplit} splits
    it (controls and spaces stripped from its start, tabs and line breaks
    taken out, a fragment left out), except that nothing is refused and
    nothing remembered: C{urlsplit} raises C{ValueError} on a host it finds
    invalid (C{http://[/admin}), which failed the event (and allowed it,
    with C{--fail-open}), and it caches the last 128 URLs it split, each
    of up to 16 MiB here, with their parts.

    With C{fragment} false, a C{#} is an ordinary character of the path or
    the query: servers differ.  Node's C{url.parse} (Express) leaves a
    fragment out of an origin-form target as C{urlsplit} does, so that
    C{/admin#x} is C{/admin} there; Go's C{ParseRequestURI} keeps it in the
    path or the query (C{?id=1#union select}).
    """
    if uri.startswith("/") or not uri:
        if fragment:
            uri = uri.partition("#")[0]
        path, _, query = uri.partition("?")
        return path, query
    target = uri.lstrip(_C0_OR_SPACE)
    for unsafe in "\t\r\n":
        if unsafe in target:
            target = target.replace(unsafe, "")
    scheme = _SCHEME.match(target)
    start = scheme.end() if scheme is not None else 0
    if target.startswith("//", start):
        # The authority, up to the path, the query or the fragment.
        ends = [at for at in (target.find(c, start + 2) for c in "/?#") if at >= 0]
        start = min(ends, default=len(target))
    end = target.find("#", start) if fragment else -1
    if end < 0:
        end = len(target)
    question = target.find("?", start, end)
    if question < 0:
        return target[start:end], ""
    return target[start:question], target[question + 1 : end]


class _RequestView:
    """What rules look at in a RequestHeaders event, computed once."""

    __slots__ = ("method", "paths", "uris", "queries", "headers", "client_ip", "_header_values", "_values_of")

    def __init__(self, event: m.RequestHeadersEvent) -> None:
        self.method = event.method.upper()
        uri = event.uri
        paths: list[str] = []
        queries: list[str] = []
        # A "#" is read both ways (see _target_parts): a rule sees what
        # either kind of server makes of the target.
        for fragment in (True, False) if "#" in uri else (True,):
            raw_path, raw_query = _target_parts(uri, fragment)
            decoded = percent_decoded(raw_path)
            normalized = _normalize_path(decoded)
            without_parameters = _normalize_path(decoded, True) if ";" in decoded else normalized
            paths += (raw_path, decoded, normalized, without_parameters)
            queries += (raw_query, percent_decoded(raw_query, plus=True))
        self.paths = _unique(paths)
        self.uris = _unique((uri, percent_decoded(uri)))
        self.queries = _unique(queries)
        headers: dict[str, list[str]] = {}
        for name, values in event.headers.items():
            headers.setdefault(name.lower(), []).extend(values)
        self.headers = headers
        self._header_values: tuple[str, ...] | None = None
        self._values_of: dict[str, tuple[str, ...]] = {}
        try:
            ip = ipaddress.ip_address(event.metadata.client_ip)
        except ValueError:
            self.client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        else:
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            self.client_ip = ip

    def header_values_of(self, name: str) -> tuple[str, ...]:
        """
        The values of the header C{name} (lower-case), as sent and
        percent-decoded (for C{header}): applications decode cookies and
        the like (PHP's C{$_COOKIE}, Express's cookie-parser), so that
        C{id=1%20union%20select} is C{id=1 union select} to them.
        """
        found = self._values_of.get(name)
        if found is None:
            values = self.headers.get(name, ())
            found = self._values_of[name] = _unique([*values, *(percent_decoded(v, plus=True) for v in values)])
        return found

    @property
    def header_values(self) -> tuple[str, ...]:
        """Every header's values, as sent and percent-decoded (for C{any_header})."""
        if self._header_values is None:
            values = [v for vs in self.headers.values() for v in vs]
            self._header_values = _unique([*values, *(percent_decoded(v, plus=True) for v in values)])
        return self._header_values


#: Up to 1024 valid percent escapes in a row.  Bounded: a repeat of a
#: group keeps backtracking state for each time round, and a run of a
#: million escapes would keep a million (possessive repeats, which keep
#: none, are Python 3.11's); a longer run is several matches end to end.
_ESCAPE_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2}){1,1024}")

#: Texts up to this length are decoded by urllib itself.
_SHORT_TEXT = 4096

#: Decoded pieces gathered before they are joined (bounds the list).
_PIECES_JOINED = 4096


def percent_decoded(text: str, plus: bool = False) -> str:
    """
    C{urllib.parse.unquote(text)} (C{unquote_plus} with C{plus}), the same
    result at a cost in proportion to C{text}: urllib splits a text at every
    C{%}, so a URI or header of megabytes of escapes (a proxy's events are
    up to 16 MiB) became millions of strings and seconds of the reactor's
    time.  Each run of valid escapes is decoded as one UTF-8 byte string,
    as urllib decodes them (a literal ASCII character ends any UTF-8
    sequence, so the runs between them decode alike).
    """
    if plus:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    if len(text) <= _SHORT_TEXT:
        return unquote(text)
    joined: list[str] = []
    pieces: list[str] = []
    # The bytes of the run of escapes under way, which may go on in the
    # next match (a character's bytes may straddle two).
    run = bytearray()
    position = 0
    for match in _ESCAPE_RUN.finditer(text):
        start, end = match.span()
        if start > position:
            if run:
                pieces.append(run.decode("utf-8", "replace"))
                run.clear()
            pieces.append(text[position:start])
        run += bytes.fromhex(text[start:end].replace("%", ""))
        position = end
        if len(pieces) >= _PIECES_JOINED:
            joined.append("".join(pieces))
            pieces.clear()
    if run:
        pieces.append(run.decode("utf-8", "replace"))
    pieces.append(text[position:])
    joined.append("".join(pieces))
    return "".join(joined)


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


