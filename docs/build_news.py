#!/usr/bin/env python3
"""
Keep NEWS.rst built from the fragments in newsfragments/ (towncrier).

    python docs/build_news.py            rewrite NEWS.rst's "unreleased" section
    python docs/build_news.py --check    exit 1 if NEWS.rst is out of date (CI)
    python docs/build_news.py --release  turn the fragments into the release
                                         notes of the version in setup.cfg

Until a release, the fragments stay in newsfragments/ and NEWS.rst shows
them as "VERSION (unreleased)", between two comment lines.  --release
drops that preview and runs the ordinary C{towncrier build}, which writes
the dated section and removes the fragments (stage the result with git).
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEWS = ROOT / "NEWS.rst"
START = ".. towncrier release notes start\n"
BEGIN, END = ".. unreleased start\n", ".. unreleased end\n"


def towncrier(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "towncrier", "build", f"--version={version('sentinel_twisted')}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"towncrier failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def without_preview(text: str) -> str:
    if BEGIN not in text:
        return text
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + tail.lstrip("\n")


def fragments() -> list[Path]:
    return [p for p in (ROOT / "newsfragments").iterdir() if p.name[0] not in "._"
            and p.name != "README.md"]


def rendered() -> str:
    """NEWS.rst as it should be: the released notes plus a fresh preview."""
    text = without_preview(NEWS.read_text(encoding="utf-8"))
    if START not in text:
        raise SystemExit(f"{NEWS} lacks the line {START.strip()!r}")
    if not fragments():
        return text
    preview = towncrier("--draft", "--date=unreleased").strip("\n")
    head, _, tail = text.partition(START)
    return f"{head}{START}\n{BEGIN}\n{preview}\n\n{END}\n{tail.lstrip(chr(10))}"


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        if NEWS.read_text(encoding="utf-8") != rendered():
            print("NEWS.rst does not match newsfragments/: run python docs/build_news.py")
            return 1
        return 0
    if argv == ["--release"]:
        NEWS.write_text(without_preview(NEWS.read_text(encoding="utf-8")), encoding="utf-8")
        towncrier("--yes")
        return 0
    if argv:
        print(__doc__)
        return 2
    NEWS.write_text(rendered(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
