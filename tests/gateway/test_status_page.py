"""
The status page as a person sees it: loaded in headless Chromium, checked
through the DOM Chromium built, with a screenshot kept under C{build/}
(a CI artifact).

Without Chromium the test is skipped on a developer's machine and fails in
CI (C{CI} set), where C{.ci/steps/20-chromium.sh} installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from .support import Harness, ScriptedAgent, answer, block, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, "build")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("CI"):
        raise AssertionError("chromium is not installed (CI installs it in .ci/steps/20-chromium.sh)")
    raise SkipTest("chromium is not installed")


def run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    profile = tempfile.mkdtemp(prefix="st-chromium-")
    try:
        return subprocess.run(
            [binary, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Element:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.text = ""
        self.children: list[Element] = []


class DOM(HTMLParser):
    """The elements of a serialised DOM, with their text, by id and by tag."""

    VOID = {"meta", "link", "br", "img", "input", "hr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.root = Element("#root", {})
        self.stack = [self.root]
        self.all: list[Element] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        self.all.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        for element in self.stack[1:]:
            element.text += data

    def by_id(self, id_: str) -> Element:
        (element,) = [e for e in self.all if e.attrs.get("id") == id_]
        return element

    def select(self, tag: str, **attrs: str) -> list[Element]:
        return [
            e
            for e in self.all
            if e.tag == tag and all(e.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


class StatusPageTests(TestCase):
    timeout = 90

    def test_page_in_headless_chromium(self) -> Any:
        chromium = find_chromium()

        async def go() -> None:
            h = await Harness(self).start()

            def waf_decides(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                return block(403) if body["uri"] == "/blocked" else answer()

            waf = await h.agent("waf", decide=waf_decides)
            await h.agent("bot", events=(1, 2, 5))
            paused_bot = await h.agent("bot")
            paused_bot.pause()
            waf.health(1)
            await wait_until(
                lambda: any(c.is_paused for c in h.pool.connections("bot"))
                and h.pool.connections("waf")[0].health_state == 1,
                what="pause and health",
            )
            self.assertEqual((await h.get("/ok")).code, 200)
            self.assertEqual((await h.get("/blocked")).code, 403)

            url = h.status_url("/")
            dumped = await deferToThread(run_chromium, chromium, "--dump-dom", url)
            self.assertEqual(dumped.returncode, 0, dumped.stderr[-2000:])
            dom = DOM(dumped.stdout.decode("utf-8"))

            (refresh,) = dom.select("meta", http_equiv="refresh")
            self.assertEqual(refresh.attrs["content"], "5")
            self.assertEqual(dom.by_id("agent-count").text, "2")
            self.assertEqual(dom.by_id("connection-count").text, "3")
            self.assertEqual(dom.by_id("registrations").text, "3")
            self.assertEqual(dom.by_id("policy").text, "fail closed")
            rows = dom.select("tr", data_agent_id="bot")
            self.assertEqual(len(rows), 2)
            by_connection = {r.attrs["data-connection-id"]: r for r in dom.all if "data-connection-id" in r.attrs}
            self.assertEqual(set(by_connection), {c.connection_id for c in h.pool.connections()})
            for connection in h.pool.connections():
                row = by_connection[connection.connection_id]
                cells = {c.attrs.get("class", ""): c.text for c in row.children}
                self.assertEqual(cells["agent"], connection.agent_id)
                self.assertEqual(cells["flow"], "paused" if connection.is_paused else "open")
                self.assertEqual(cells["num in-flight"], "0")
            waf_row = by_connection[h.pool.connections("waf")[0].connection_id]
            self.assertIn("healthy", waf_row.text)
            requests = {r.attrs["data-decision"]: r for r in dom.all if "data-decision" in r.attrs}
            self.assertIn("1", requests["allow"].text)
            self.assertIn("1", requests["block"].text)
            links = {a.attrs["href"] for a in dom.select("a")}
            self.assertEqual(links, {"/agents", "/metrics"})

            os.makedirs(BUILD, exist_ok=True)
            screenshot = os.path.join(BUILD, "status-page.png")
            if os.path.exists(screenshot):
                os.unlink(screenshot)
            shot = await deferToThread(
                run_chromium,
                chromium,
                "--hide-scrollbars",
                "--window-size=1280,720",
                f"--screenshot={screenshot}",
                url,
            )
            self.assertEqual(shot.returncode, 0, shot.stderr[-2000:])
            with open(screenshot, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            self.assertGreater(os.path.getsize(screenshot), 5000)

        return ensureDeferred(go())
