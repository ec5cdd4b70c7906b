# -*- test-case-name: tests.agent.test_rules -*-
"""
A request body as an upstream may decode it, for the body rules: its
content coding (C{gzip}, C{deflate}) inflated within a bound, and a JSON
document's charset (UTF-16, UTF-32) detected as Python's C{json.loads}
detects it.  A body that cannot be decoded is L{Uninspectable}: what then
happens is the rules file's L{BodyPolicy}.
"""

from __future__ import annotations

import codecs
import zlib
from collections.abc import Iterator, Mapping

import attrs

from ..._peertext import peer_text

#: The most inflated bytes produced (and matched) in one step.
INFLATE_PIECE = 64 * 1024

#: Inflated bytes past which the ratio bound applies: a small body may
#: compress very well (a run of spaces) without being a bomb.
RATIO_FLOOR = 1024 * 1024

#: The default bound on the bytes a compressed body inflates to: the
#: largest body the agent asks to see (its C{max_body_size}).
MAX_INFLATED_SIZE = 10 * 1024 * 1024

#: The default bound on inflated bytes per compressed byte (past L{RATIO_FLOOR}).
MAX_INFLATE_RATIO = 100

#: Content codings of a request that L{content_codings} reads; a request
#: with more gets L{MORE_CODINGS} after them.
MAX_CODINGS = 8

#: What stands for the codings past L{MAX_CODINGS}.
MORE_CODINGS = "..."

#: Characters of each coding name a refusal shows.
_CODING_SHOWN = 40

#: The content codings the rules inflate (C{x-gzip} is C{gzip}, RFC 9110
#: section 8.4.1.3).
INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})

#: Bytes that start a body read as JSON whatever its Content-Type (an
#: object, an array, or a lone string: C{json.loads} takes any of them).
JSON_STARTS = frozenset(b'{["')


@attrs.frozen
class BodyPolicy:
    """
    What body rules do with a body they cannot inspect, and how far they
    inflate one (the rules file's C{[body]} table).

    @ivar uninspectable: C{"block"} (the default): a body with an unknown or
        stacked content coding, a corrupt compressed stream, or one that
        inflates past the bounds is refused; C{"allow"}: it goes on, matched
        as far as it could be decoded (and as sent).
    @ivar max_inflated_size: the most bytes a compressed body may inflate to
        (the default is the agent's C{max_body_size}, 10 MiB).
    @ivar max_inflate_ratio: past L{RATIO_FLOOR} inflated bytes, the most
        inflated bytes per compressed byte received.
    """

    uninspectable: str = "block"
    max_inflated_size: int = MAX_INFLATED_SIZE
    max_inflate_ratio: int = MAX_INFLATE_RATIO

    @property
    def blocks(self) -> bool:
        """Whether an uninspectable body is refused."""
        return self.uninspectable == "block"


@attrs.frozen
class Uninspectable:
    """
    Why a body could not be decoded for the rules.

    @ivar reason: the text for the log and the block answer.
    @ivar status: the status a block answers with (C{415}: a content coding
        the rules do not decode, C{413}: past the inflate bounds, C{400}: a
        corrupt stream).
    @ivar code: the audit reason code.
    """

    reason: str
    status: int
    code: str


def content_codings(headers: Mapping[str, list[str]]) -> list[str]:
    """
    The request's content codings in the order applied, lower-cased,
    C{identity} left out (RFC 9110 section 8.4).
    """
    codings: list[str] = []
    for name, values in headers.items():
        if name.lower() != "content-encoding":
            continue
        for value in values:
            # Split no further than the codings kept: a header of a million
            # codings would otherwise make a million strings.
            for token in value.split(",", MAX_CODINGS):
                coding = token.strip().lower()
                if coding and coding != "identity":
                    if len(codings) == MAX_CODINGS:
                        # More than any body is coded with: it is stacked
                        # codings all the same, and the rest is not read.
                        codings.append(MORE_CODINGS)
                        return codings
                    codings.append(coding)
    return codings


def unsupported(codings: list[str]) -> Uninspectable | None:
    """Why the rules cannot decode a body with C{codings}, C{None}: they can."""
    if not codings or (len(codings) == 1 and codings[0] in INFLATABLE):
        return None
    # The refusal goes back to the proxy (and may be the client's answer):
    # the client's coding names in it are cut short.
    shown = ", ".join(peer_text(coding, _CODING_SHOWN) for coding in codings)
    what = "stacked content codings" if len(codings) > 1 else "an unsupported content coding"
    return Uninspectable(f"request body has {what} ({shown})", 415, "body_coding_unsupported")


class Inflater:
    """
    Inflates a C{gzip} or C{deflate} body as it streams, in pieces of at
    most L{INFLATE_PIECE} bytes, and stops at the policy's bounds: a
    decompression bomb costs at most C{max_inflated_size} bytes of work,
    never that much memory at once.  C{deflate} is the zlib format (RFC
    9110 section 8.4.1.2), or a raw deflate stream as some clients send
    it; C{gzip} may hold several members, as gzip files do.

    @ivar failure: why inflating stopped, C{None} while it goes on.
    """

    def __init__(self, coding: str, policy: BodyPolicy) -> None:
        self.coding = coding
        self.policy = policy
        self.failure: Uninspectable | None = None
        self._gzip = coding != "deflate"
        self._inflate: zlib._Decompress | None = zlib.decompressobj(31) if self._gzip else None
        self._head = b""
        self._received = 0
        self._produced = 0
        self._ended = False

    def feed(self, data: bytes, last: bool = False) -> Iterator[bytes]:
        """The inflated bytes that C{data} gives, piece by piece."""
        if self.failure is not None:
            return
        self._received += len(data)
        data, self._head = self._head + data, b""
        if self._inflate is None:
            # zlib or raw deflate: told by the first two bytes.
            if len(data) < 2 and not last:
                self._head = data
                return
            self._inflate = zlib.decompressobj(15 if _zlib_header(data) else -15)
        yield from self._pieces(data, last)
        if last and self.failure is None and self._received and not self._ended:
            self._fail(f"the {self.coding} stream of the request body ends early", 400)

    def _pieces(self, data: bytes, last: bool) -> Iterator[bytes]:
        inflate = self._inflate
        assert inflate is not None
        # A turn either fills its piece (bounded by max_inflated_size) or
        # consumes all its input; one more per gzip member.  A full piece
        # may leave output inside zlib with no input left: turn again.
        full = False
        while (data or full) and self.failure is None:
            if self._ended:
                if self._gzip and len(data) < 2 and not last:
                    # Another member's magic number may follow.
                    self._head = data
                    return
                if self._gzip and data[:2] == b"\x1f\x8b":
                    inflate = self._inflate = zlib.decompressobj(31)
                    self._ended = False
                else:
                    self._fail(f"the request body has data after its {self.coding} stream", 400)
                    return
            limit = min(INFLATE_PIECE, self.policy.max_inflated_size - self._produced + 1)
            try:
                piece = inflate.decompress(data, limit)
            except zlib.error as e:
                self._fail(f"the request body is not a valid {self.coding} stream ({e})", 400)
                return
            self._produced += len(piece)
            if self._produced > self.policy.max_inflated_size:
                self._fail(
                    f"the request body inflates past {self.policy.max_inflated_size} bytes", 413
                )
                return
            consumed = self._received - len(inflate.unconsumed_tail)
            if self._produced > RATIO_FLOOR and self._produced > self.policy.max_inflate_ratio * consumed:
                self._fail(
                    f"the request body inflates more than {self.policy.max_inflate_ratio} times", 413
                )
                return
            full = len(piece) == limit and not inflate.eof
            if inflate.eof:
                self._ended = True
                data = inflate.unused_data
            else:
                data = inflate.unconsumed_tail
            if piece:
                yield piece

    def _fail(self, reason: str, status: int) -> None:
        code = "body_inflate_limit" if status == 413 else "body_coding_corrupt"
        self.failure = Uninspectable(reason, status, code)


def _zlib_header(data: bytes) -> bool:
    """Whether C{data} starts with a zlib header (RFC 1950): deflate, and a checksum."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def json_charset(head: bytes) -> str:
    """
    The encoding of a JSON document starting with C{head} (its first four
    bytes, or all of a shorter body), as C{json.loads} tells it from bytes:
    a byte order mark, or RFC 4627's pattern of zero bytes (the first two
    characters are ASCII).  Django, Flask and Starlette decode bodies so.
    """
    if head.startswith((codecs.BOM_UTF32_BE, codecs.BOM_UTF32_LE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if len(head) >= 4:
        if not head[0]:
            return "utf-16-be" if head[1] else "utf-32-be"
        if not head[1]:
            return "utf-16-le" if head[2] or head[3] else "utf-32-le"
    elif len(head) == 2:
        if not head[0]:
            return "utf-16-be"
        if not head[1]:
            return "utf-16-le"
    return "utf-8"


class Transcoder:
    """
    A body in UTF-16 or UTF-32 (by L{json_charset}) as UTF-8, as it
    streams: C{body} patterns and C{body_contains} then see its text.  A
    UTF-8 body is left as it is (it is matched as sent).

    @ivar charset: the body's encoding, C{None} until its first four bytes
        (or its end) are seen.
    """

    def __init__(self) -> None:
        self.charset: str | None = None
        self._head = b""
        self._decoder: codecs.IncrementalDecoder | None = None

    def feed(self, data: bytes, last: bool = False) -> bytes:
        """The UTF-8 text that C{data} gives, C{b""} for a UTF-8 body."""
        if self.charset is None:
            self._head += data
            if len(self._head) < 4 and not last:
                return b""
            data, self._head = self._head, b""
            self.charset = json_charset(data)
            if self.charset.startswith("utf-8"):
                return b""
            self._decoder = codecs.getincrementaldecoder(self.charset)("replace")
        if self._decoder is None:
            return b""
        return self._decoder.decode(data, last).encode("utf-8", "replace")
