# -*- test-case-name: tests.test_operator_files -*-
"""
Files an operator writes by hand and the programs read: the proxy's
allowlist and token files, the agent's token file.

Each is read whole, up to a size that no such file reaches (a path given
by mistake, such as C{/dev/zero} or a log, is refused rather than read
into memory), decoded as UTF-8 (a leading byte order mark left out, as
Windows editors save one), and numbered line by line as an editor numbers
it, so that an error names the line the operator sees.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["OperatorFileError", "operator_lines", "operator_text", "read_operator_file"]


class OperatorFileError(ValueError):
    """A file that cannot be read, is too large, or is not UTF-8; the text says which."""


def read_operator_file(path: str, limit: int, kind: str) -> str:
    """
    The text of the file at C{path}, at most C{limit} bytes; C{kind} names
    what it is in the errors (C{"token file"}).

    @raise OperatorFileError: the file cannot be read (the system's reason),
        is larger than C{limit} bytes, or is not UTF-8 (the number of its
        first line that is not).  The text names C{path}, never the
        file's content.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise OperatorFileError(f"cannot read {kind} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise OperatorFileError(f"{path}: larger than {limit:,} bytes, more than any {kind}")
    text = operator_text(data)
    if isinstance(text, int):
        raise OperatorFileError(f"{path}:{text}: not UTF-8 text")
    return text


def operator_text(data: bytes) -> str | int:
    """
    The text of a file an operator wrote, a leading byte order mark left
    out; or, when it is not UTF-8, the number of its first line that is
    not (as L{operator_lines} numbers them).
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return data[: e.start].count(b"\n") + 1


def operator_lines(text: str) -> Iterator[tuple[int, str]]:
    """
    The lines of C{text} with their numbers from 1, as editors count them:
    a line ends at a line feed (a carriage return before it is dropped).
    The other characters C{str.splitlines} ends a line at (form feed,
    vertical tab, U+0085, U+2028 and more) stay where they are: an editor
    shows them inside a line, and an error names that line.
    """
    for number, line in enumerate(text.split("\n"), 1):
        yield number, line[:-1] if line.endswith("\r") else line
