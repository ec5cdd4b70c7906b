"""
Counting the values of a payload before decoding it (L{sentinel_twisted._values}).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted._values import json_values, msgpack_values


def values_of(value: Any) -> int:
    """The values a decoded C{value} is made of: itself, its elements, a map's keys and values."""
    if isinstance(value, list):
        return 1 + sum(values_of(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + values_of(v) for v in value.values())
    return 1


_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
_documents = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=60,
)


class JsonValuesTests(SynchronousTestCase):
    def test_a_count_of_separators(self) -> None:
        self.assertEqual(json_values(b"[1,2,3]", 100), 4)
        self.assertEqual(json_values(b'{"a":[1,2],"b":{}}', 100), values_of({"a": [1, 2], "b": {}}) + 1)
        self.assertEqual(json_values(b'"text"', 100), 1)

    def test_commas_in_strings_count_only_below_the_limit(self) -> None:
        payload = json.dumps(["a,b:c[d{e" * 100, "x"]).encode()
        # One, the bracket and the comma of the list, and 400 in the text.
        self.assertEqual(json_values(payload, 10_000), 3 + 400)
        # Past the limit, counted again without what the strings hold.
        self.assertEqual(json_values(payload, 10), 3)

    def test_escaped_quotes_and_backslashes_do_not_end_a_string(self) -> None:
        text = 'he said \\"x,y\\" ' + "\\\\" + '", [1,2], "' + "\\\\\\" + '"'
        payload = json.dumps([text, [1, 2]]).encode()
        self.assertEqual(json.loads(payload)[0], text)
        self.assertEqual(json_values(payload, 3), 5)

    def test_more_strings_than_the_limit_is_enough(self) -> None:
        payload = json.dumps(["s"] * 1000).encode()
        self.assertGreater(json_values(payload, 100), 100)

    @settings(max_examples=300, deadline=None)
    @given(_documents)
    def test_never_fewer_than_the_values(self, document: Any) -> None:
        payload = json.dumps(document).encode()
        count = values_of(document)
        self.assertGreaterEqual(json_values(payload, 10**9), count)
        # Over a limit, a count may stop short of the values, but it is over
        # the limit only when the values are.
        for limit in (0, 1, 2, count - 1, count):
            result = json_values(payload, limit)
            self.assertTrue(result >= count or result > limit >= 0 and count > limit, (limit, result))


class MsgpackValuesTests(SynchronousTestCase):
    def test_every_kind_of_value(self) -> None:
        document = {
            "a": [1, -1, 300, -300, 70000, 2**40, -(2**40), 1.5, None, True, False],
            "s": ["", "x" * 40, "y" * 300, "z" * 70000],
            "b": [b"", b"q" * 300, b"r" * 70000],
            "m": {str(i): [] for i in range(20)},
            "l": list(range(20)),
        }
        payload = msgspec.msgpack.encode(document)
        self.assertEqual(msgpack_values(payload, 10**6), values_of(document))

    def test_extensions(self) -> None:
        for size in (1, 2, 4, 8, 16, 3, 300, 70000):
            payload = msgspec.msgpack.encode([msgspec.msgpack.Ext(1, b"e" * size), 1])
            self.assertEqual(msgpack_values(payload, 100), 3, size)

    def test_large_containers_are_counted(self) -> None:
        document = {"a": [[]] * 70000, "m": {str(i): 0 for i in range(70000)}}
        payload = msgspec.msgpack.encode(document)
        self.assertEqual(msgpack_values(payload, 10**6), values_of(document))
        self.assertEqual(values_of(document), 3 + 70000 + 2 + 2 * 70000)

    def test_counting_stops_past_the_limit(self) -> None:
        """One byte per value: of a million, the first 101 are looked at."""
        payload = b"\xdd" + (1_000_000).to_bytes(4, "big") + b"\x90" * 1_000_000
        self.assertEqual(msgpack_values(payload, 100), 101)

    def test_a_payload_cut_short(self) -> None:
        self.assertEqual(msgpack_values(b"\xdd\xff\xff\xff\xff\x90\x90", 10**6), 3)
        self.assertEqual(msgpack_values(b"\xdb\xff\xff", 10), 1)
        self.assertEqual(msgpack_values(b"", 10), 0)

    @settings(max_examples=300, deadline=None)
    @given(_documents)
    def test_exactly_the_values(self, document: Any) -> None:
        payload = msgspec.msgpack.encode(document)
        self.assertEqual(msgpack_values(payload, 10**9), values_of(document))
        self.assertEqual(msgpack_values(payload, 0), 1)
