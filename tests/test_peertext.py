"""
L{peer_text}: what a log line may carry of text a peer chose.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from sentinel_twisted._peertext import first_hidden, is_clean, peer_text


class PeerTextTests(TestCase):
    def test_short_clean_text_is_unchanged(self) -> None:
        self.assertEqual(peer_text("waf-1 café"), "waf-1 café")

    def test_control_format_and_separator_characters_are_escaped(self) -> None:
        self.assertEqual(
            peer_text("a\nb\x1b[2Jc\u2028d\u2029e\u200bf\u202eg"),
            "a\\x0ab\\x1b[2Jc\\u2028d\\u2029e\\u200bf\\u202eg",
        )

    def test_long_text_is_cut_in_the_middle_with_a_marker(self) -> None:
        text = "head-" + "x" * 10_000 + "-tail"
        cut = peer_text(text, 60)
        self.assertTrue(cut.startswith("head-"))
        self.assertTrue(cut.endswith("-tail"))
        self.assertIn("[...10010 characters, cut...]", cut)
        self.assertLess(len(cut), 100)

    def test_escapes_do_not_make_it_longer_than_about_the_limit(self) -> None:
        cut = peer_text("\u2028" * 200, 60)
        self.assertLess(len(cut), 100)
        self.assertTrue(is_clean(cut))

    def test_any_object_is_shown_by_its_text(self) -> None:
        self.assertEqual(peer_text(ValueError("bad\nthing")), "bad\\x0athing")

    def test_is_clean(self) -> None:
        self.assertTrue(is_clean("waf-1 ünïcode"))
        for bad in ("a\x00", "a\x7f", "a\x85", "a\u2028", "a\u2029", "a\u200b", "a\ufeff"):
            self.assertFalse(is_clean(bad), repr(bad))

    def test_first_hidden_names_position_and_character(self) -> None:
        self.assertEqual(first_hidden("ab\u2028c\n"), (2, "\u2028"))
        self.assertIsNone(first_hidden("abc"))
