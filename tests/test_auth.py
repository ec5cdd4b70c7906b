"""
Token authentication: the token file format, constant-time comparison, and
tokens never showing up in errors or reprs.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sentinel_twisted.proxy import auth
from sentinel_twisted.proxy.auth import (
    ITokenChecker,
    StaticTokenChecker,
    TokenFileChecker,
    TokenFileError,
    parse_token_file,
)

SECRET = "tok-0a9b8c7d6e5f-secret"


class TokenFileTests(TestCase):
    def write(self, text: str | bytes, mode: int = 0o600) -> str:
        path = Path(self.mktemp())
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        path.chmod(mode)
        return str(path)

    def assertFileError(self, text: str | bytes, *fragments: str) -> str:
        path = self.write(text)
        with self.assertRaises(TokenFileError) as caught:
            parse_token_file(path)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment.replace("PATH", path), message)
        self.assertNotIn(SECRET, message)
        return message

    def test_lines_comments_and_blank_lines(self) -> None:
        path = self.write(f"# agents\n\nwaf-1 {SECRET}\n  auth-2   other-token  \n# end\n")
        self.assertEqual(
            parse_token_file(path), {"waf-1": SECRET.encode(), "auth-2": b"other-token"}
        )

    def test_line_with_one_field_names_file_and_line(self) -> None:
        self.assertFileError(f"waf-1 {SECRET}\nlonely\n", "PATH:2:", "found 1 field")

    def test_line_with_three_fields_names_file_and_line_not_the_token(self) -> None:
        self.assertFileError(f"# c\nwaf-1 {SECRET} extra\n", "PATH:2:", "found 3 fields")

    def test_agent_listed_twice(self) -> None:
        self.assertFileError(f"waf-1 a\nwaf-1 {SECRET}\n", "PATH:2:", "agent 'waf-1' is listed twice")

    def test_file_without_agents(self) -> None:
        self.assertFileError("# nothing here\n\n", "lists no agent")

    def test_missing_file(self) -> None:
        path = self.mktemp()
        with self.assertRaises(TokenFileError) as caught:
            parse_token_file(path)
        self.assertIn(f"cannot read token file {path}", str(caught.exception))

    def test_file_that_is_not_utf8(self) -> None:
        self.assertFileError(b"waf-1 \xff\xfe\n", "PATH:1: not UTF-8")

    def test_file_that_is_not_utf8_names_the_line(self) -> None:
        self.assertFileError(b"# agents\nwaf-1 ok\nauth-1 \xff\xfe\n", "PATH:3: not UTF-8")

    def test_byte_order_mark_is_not_part_of_the_first_agent_id(self) -> None:
        # Windows editors start UTF-8 files with one; the first agent must
        # still be "waf-1", and a first comment still a comment.
        path = self.write(f"\ufeffwaf-1 {SECRET}\r\nauth-2 other\r\n")
        self.assertEqual(parse_token_file(path), {"waf-1": SECRET.encode(), "auth-2": b"other"})
        path = self.write("\ufeff# agents\nwaf-1 t\n")
        self.assertEqual(parse_token_file(path), {"waf-1": b"t"})

    def test_checker_reads_the_file(self) -> None:
        checker = TokenFileChecker(self.write(f"waf-1 {SECRET}\n"))
        self.assertTrue(checker.check_token("waf-1", SECRET))
        self.assertFalse(checker.check_token("waf-1", "guess"))

    def test_reload_picks_up_changes(self) -> None:
        path = self.write(f"waf-1 {SECRET}\n")
        checker = TokenFileChecker(path)
        Path(path).write_text("waf-1 rotated\n")
        checker.reload()
        self.assertFalse(checker.check_token("waf-1", SECRET))
        self.assertTrue(checker.check_token("waf-1", "rotated"))

    def test_bad_reload_keeps_the_previous_tokens(self) -> None:
        path = self.write(f"waf-1 {SECRET}\n")
        checker = TokenFileChecker(path)
        Path(path).write_text("broken line here\n")
        self.assertRaises(TokenFileError, checker.reload)
        self.assertTrue(checker.check_token("waf-1", SECRET))

    def test_group_readable_file_is_warned_about(self) -> None:
        checker = TokenFileChecker(self.write(f"waf-1 {SECRET}\n", mode=0o640))
        assert checker.permission_warning is not None
        self.assertIn("readable by group or others", checker.permission_warning)

    def test_owner_only_file_is_not_warned_about(self) -> None:
        checker = TokenFileChecker(self.write(f"waf-1 {SECRET}\n", mode=0o600))
        self.assertIsNone(checker.permission_warning)

    def test_repr_shows_agents_not_tokens(self) -> None:
        checker = TokenFileChecker(self.write(f"waf-1 {SECRET}\n"))
        self.assertIn("waf-1", repr(checker))
        self.assertNotIn(SECRET, repr(checker))
        self.assertNotIn(SECRET, str(vars(checker).get("path")))


class StaticCheckerTests(TestCase):
    def setUp(self) -> None:
        self.checker = StaticTokenChecker({"waf-1": SECRET, "bytes": SECRET.encode()})

    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(ITokenChecker, self.checker))

    def test_right_token(self) -> None:
        self.assertTrue(self.checker.check_token("waf-1", SECRET))
        self.assertTrue(self.checker.check_token("bytes", SECRET))

    def test_wrong_token(self) -> None:
        for guess in ("", SECRET[:-1], SECRET + "x", SECRET.upper()):
            self.assertFalse(self.checker.check_token("waf-1", guess))

    def test_unknown_agent(self) -> None:
        self.assertFalse(self.checker.check_token("waf-2", SECRET))

    def test_non_ascii_token_is_compared_not_crashed(self) -> None:
        self.assertFalse(self.checker.check_token("waf-1", "tök\udcff"))

    def test_comparison_is_constant_time(self) -> None:
        calls: list[tuple[Any, Any]] = []
        original = hmac.compare_digest

        def spy(a: Any, b: Any) -> bool:
            calls.append((a, b))
            return original(a, b)

        self.patch(auth.hmac, "compare_digest", spy)
        self.assertTrue(self.checker.check_token("waf-1", SECRET))
        self.assertFalse(self.checker.check_token("waf-1", "nope"))
        self.assertFalse(self.checker.check_token("unknown", "nope"))
        self.assertEqual(len(calls), 3, "every check, unknown agents included, goes through compare_digest")
        self.assertTrue(all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls))

    def test_module_does_not_compare_with_equality(self) -> None:
        # A cheap guard against a later "expected == given" shortcut.
        source = Path(auth.__file__).read_text()
        self.assertNotIn("== given", source)
        self.assertNotIn("given ==", source)

    def test_repr_shows_agents_not_tokens(self) -> None:
        self.assertNotIn(SECRET, repr(self.checker))


class FileModeTests(TestCase):
    def test_token_file_checker_works_on_a_read_only_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text(f"waf-1 {SECRET}\n")
        path.chmod(0o400)
        self.addCleanup(os.chmod, path, 0o600)
        self.assertTrue(TokenFileChecker(str(path)).check_token("waf-1", SECRET))
