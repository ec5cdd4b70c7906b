# -*- test-case-name: tests.test_values -*-
"""
How many values a payload decodes to, found before it is decoded.

Decoding makes a Python object of every value a payload holds (each
string, number, list and map, and each key of a map), some 60 to 80 bytes
apiece: a frame of 16 MiB that holds nothing but empty lists decodes to
some 400 MiB in JSON, and to more than 1 GiB in MessagePack, where an
empty list takes one byte.  Counted first, such a frame can be refused
before anything of it is decoded.

What they cost is bounded: L{json_values} reads the payload once, in C
(a few times when it is over its C{limit}); L{msgpack_values} steps from
value to value in Python, and stops as soon as it has counted past its
C{limit}.
"""

from __future__ import annotations

import re
import struct
from typing import Final

__all__ = ["COUNTED_ABOVE", "VALUE_COST", "json_values", "msgpack_values"]

#: Payloads up to this many bytes are decoded without their values being
#: counted first: they hold too few values to matter.
COUNTED_ABOVE: Final = 4096

#: About the bytes of memory that one decoded value takes (a short string,
#: an empty list or map and its slot in its container), for the accounts
#: of what decoded events hold.
VALUE_COST: Final = 64

# Bytes that may begin a JSON value other than a first element or a
# top-level value: each value after the first of a container follows a
# comma, each member of a map has its colon, and each container opens with
# a bracket.
_JSON_SEPARATORS: Final = b",:[{"
# A string once its escapes are gone.
_STRING: Final = re.compile(rb'"[^"]*"')


def json_values(payload: bytes, limit: int) -> int:
    """
    No fewer than the values that JSON C{payload} decodes to, or, over
    C{limit}, a number over it: one, plus one for each comma, colon and
    opening bracket.  Counted so, a text full of commas counts high; so
    once that count is over C{limit} the payload is counted again without
    what its strings hold (each string is a value: more strings than
    C{limit} are enough to say it is over).  The first count costs one
    pass over the payload in C, the second a few more.
    """
    count = 1 + len(payload) - len(payload.translate(None, _JSON_SEPARATORS))
    if count <= limit:
        return count
    # Without escapes, the strings are what lies between two quotes.  An
    # escape is a backslash and the character after it, so removing every
    # pair of backslashes from the left, then every backslash and quote,
    # leaves each quote that begins or ends a string, and only those.
    plain = payload.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = plain.count(b'"') // 2
    if strings > limit:
        return strings
    outside = _STRING.sub(b"", plain)
    return 1 + len(outside) - len(outside.translate(None, _JSON_SEPARATORS))


# MessagePack (https://github.com/msgpack/msgpack/blob/master/spec.md):
# for each first byte, the bytes of a value of fixed size, else 0.
_FIXED = bytearray(256)
for _b in range(0x00, 0x80):  # positive fixint
    _FIXED[_b] = 1
for _b in range(0xE0, 0x100):  # negative fixint
    _FIXED[_b] = 1
for _b, _size in {
    0xC0: 1,  # nil
    0xC1: 1,  # never used: the decoder refuses it
    0xC2: 1,  # false
    0xC3: 1,  # true
    0xCA: 5,  # float 32
    0xCB: 9,  # float 64
    0xCC: 2,  # uint 8
    0xCD: 3,  # uint 16
    0xCE: 5,  # uint 32
    0xCF: 9,  # uint 64
    0xD0: 2,  # int 8
    0xD1: 3,  # int 16
    0xD2: 5,  # int 32
    0xD3: 9,  # int 64
    0xD4: 3,  # fixext 1
    0xD5: 4,  # fixext 2
    0xD6: 6,  # fixext 4
    0xD7: 10,  # fixext 8
    0xD8: 18,  # fixext 16
}.items():
    _FIXED[_b] = _size

_U8 = struct.Struct(">B").unpack_from
_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from

# The rest: (how its length is read, the bytes before its content, and
# what the length counts: bytes of content, elements, or pairs of a map).
_BYTES, _ELEMENTS, _PAIRS = 0, 1, 2
_SIZED = {
    0xC4: (_U8, 2, _BYTES),  # bin 8
    0xC5: (_U16, 3, _BYTES),  # bin 16
    0xC6: (_U32, 5, _BYTES),  # bin 32
    0xC7: (_U8, 3, _BYTES),  # ext 8 (and its type byte)
    0xC8: (_U16, 4, _BYTES),  # ext 16
    0xC9: (_U32, 6, _BYTES),  # ext 32
    0xD9: (_U8, 2, _BYTES),  # str 8
    0xDA: (_U16, 3, _BYTES),  # str 16
    0xDB: (_U32, 5, _BYTES),  # str 32
    0xDC: (_U16, 3, _ELEMENTS),  # array 16
    0xDD: (_U32, 5, _ELEMENTS),  # array 32
    0xDE: (_U16, 3, _PAIRS),  # map 16
    0xDF: (_U32, 5, _PAIRS),  # map 32
}


def msgpack_values(payload: bytes, limit: int) -> int:
    """
    The number of values that MessagePack C{payload} holds, each key of a
    map counted as one, or a number over C{limit} once it has counted past
    it.  A payload cut short is counted as far as it goes (the decoder
    refuses it anyway).
    """
    count = 0
    pos = 0
    end = len(payload)
    pending = 1
    fixed = _FIXED
    while pending and pos < end:
        count += 1
        if count > limit:
            break
        pending -= 1
        first = payload[pos]
        size = fixed[first]
        if size:
            pos += size
        elif first <= 0x8F:  # fixmap
            pending += 2 * (first & 0x0F)
            pos += 1
        elif first <= 0x9F:  # fixarray
            pending += first & 0x0F
            pos += 1
        elif first <= 0xBF:  # fixstr
            pos += 1 + (first & 0x1F)
        else:
            read, head, kind = _SIZED[first]
            if pos + head > end:
                break
            (length,) = read(payload, pos + 1)
            if kind == _BYTES:
                pos += head + length
            else:
                pending += length if kind == _ELEMENTS else 2 * length
                pos += head
    return count
