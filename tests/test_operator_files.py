"""
The files an operator writes by hand (L{sentinel_twisted._operator_files}):
the proxy's allowlist and token files and the agent's token file are read
within a size, and their errors name the line an editor shows.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from sentinel_twisted._operator_files import OperatorFileError, operator_lines, read_operator_file
from sentinel_twisted.agent.tap import MAX_TOKEN_FILE_BYTES as AGENT_TOKEN_FILE_BYTES
from sentinel_twisted.agent.tap import TokenFileError as AgentTokenFileError
from sentinel_twisted.agent.tap import read_token_file
from sentinel_twisted.proxy.auth import MAX_TOKEN_FILE_BYTES, TokenFileError, parse_token_file
from sentinel_twisted.proxy.config import MAX_ALLOW_FILE_BYTES, AllowFileError, read_allow_file

SECRET = "s3cr3t-t0ken-value"


class OperatorLinesTests(TestCase):
    def test_lines_end_at_a_line_feed_alone(self) -> None:
        text = "a\r\nb\x0cc\nd\x0be\x1cf\x85g\u2028h\n"
        self.assertEqual(
            list(operator_lines(text)), [(1, "a"), (2, "b\x0cc"), (3, "d\x0be\x1cf\x85g\u2028h"), (4, "")]
        )

    def test_a_lone_carriage_return_stays_in_its_line(self) -> None:
        self.assertEqual(list(operator_lines("a\rb\nc")), [(1, "a\rb"), (2, "c")])


class ReadOperatorFileTests(TestCase):
    def write(self, data: bytes) -> str:
        path = Path(self.mktemp())
        path.write_bytes(data)
        return str(path)

    def test_text_without_its_byte_order_mark(self) -> None:
        self.assertEqual(read_operator_file(self.write(b"\xef\xbb\xbfwaf-1\n"), 100, "allowlist"), "waf-1\n")

    def test_a_file_of_exactly_the_limit_is_read(self) -> None:
        self.assertEqual(read_operator_file(self.write(b"x" * 100), 100, "allowlist"), "x" * 100)

    def test_a_larger_file_is_refused_and_not_read_whole(self) -> None:
        path = self.write(b"x" * 101)
        error = self.assertRaises(OperatorFileError, read_operator_file, path, 100, "token file")
        self.assertEqual(str(error), f"{path}: larger than 100 bytes, more than any token file")

    def test_an_endless_file_is_refused(self) -> None:
        # A path given by mistake: read up to the limit, never to its end.
        error = self.assertRaises(OperatorFileError, read_operator_file, "/dev/zero", 4096, "allowlist")
        self.assertEqual(str(error), "/dev/zero: larger than 4,096 bytes, more than any allowlist")

    def test_a_missing_file(self) -> None:
        path = self.mktemp()
        error = self.assertRaises(OperatorFileError, read_operator_file, path, 100, "allowlist")
        self.assertEqual(str(error), f"cannot read allowlist {path}: No such file or directory")

    def test_the_first_line_that_is_not_utf8_as_an_editor_numbers_it(self) -> None:
        path = self.write(b"a\x0cb\nc\xff\n")
        error = self.assertRaises(OperatorFileError, read_operator_file, path, 100, "allowlist")
        self.assertEqual(str(error), f"{path}:2: not UTF-8 text")


class FilesTests(TestCase):
    """What each reader makes of the odd characters and the sizes."""

    def write(self, data: str | bytes) -> str:
        path = Path(self.mktemp())
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(0o600)
        return str(path)

    def test_an_allowlist_line_with_a_form_feed_is_one_line(self) -> None:
        # Python's splitlines() made two agents of what an editor shows as
        # one line of two words; the error names that line.
        path = self.write("ops-1\nwaf-1\x0cauth-1\n")
        error = self.assertRaises(AllowFileError, read_allow_file, path)
        self.assertEqual(str(error), f"{path}:2: expected one agent id or pattern, got 2 words")

    def test_allowlist_errors_name_the_line_an_editor_shows(self) -> None:
        path = self.write("waf-1\u2028\nops-1 extra\n")
        error = self.assertRaises(AllowFileError, read_allow_file, path)
        self.assertTrue(str(error).startswith(f"{path}:2: "), str(error))

    def test_a_large_allowlist_is_refused(self) -> None:
        path = self.write(b"#" * (MAX_ALLOW_FILE_BYTES + 1))
        error = self.assertRaises(AllowFileError, read_allow_file, path)
        self.assertIn("larger than 1,048,576 bytes", str(error))

    def test_token_file_errors_name_the_line_an_editor_shows(self) -> None:
        path = self.write(f"waf-1 {SECRET}\x0c\nlonely\n")
        error = self.assertRaises(TokenFileError, parse_token_file, path)
        self.assertEqual(str(error), f"{path}:2: expected 'AGENT_ID TOKEN', found 1 field")

    def test_a_token_file_line_with_a_vertical_tab_is_one_line(self) -> None:
        path = self.write(f"waf-1 {SECRET}\x0bauth-1 other\n")
        error = self.assertRaises(TokenFileError, parse_token_file, path)
        self.assertEqual(str(error), f"{path}:1: expected 'AGENT_ID TOKEN', found 4 fields")
        self.assertNotIn(SECRET, str(error))

    def test_a_large_token_file_is_refused_without_its_content(self) -> None:
        path = self.write(f"waf-1 {SECRET}\n".encode() + b"#" * MAX_TOKEN_FILE_BYTES)
        error = self.assertRaises(TokenFileError, parse_token_file, path)
        self.assertEqual(str(error), f"{path}: larger than 4,194,304 bytes, more than any token file")

    def test_the_agents_token_file(self) -> None:
        self.assertEqual(read_token_file(self.write(f"# mine\r\n{SECRET}\x0c\r\n"))[0], SECRET)
        for data in (f"{SECRET}\x85other\n", f"{SECRET}\u2028other\n"):
            error = self.assertRaises(AgentTokenFileError, read_token_file, self.write(data))
            self.assertIn("must hold exactly one token on one line", str(error))
        path = self.write(b"#" * (AGENT_TOKEN_FILE_BYTES + 1))
        error = self.assertRaises(AgentTokenFileError, read_token_file, path)
        self.assertEqual(str(error), f"{path}: larger than 65,536 bytes, more than any token file")
        path = self.write(b"tok\xff\n")
        error = self.assertRaises(AgentTokenFileError, read_token_file, path)
        self.assertEqual(str(error), f"{path}:1: not UTF-8 text")
