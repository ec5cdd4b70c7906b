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
import struct
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


def shoot(test: TestCase, chromium: str, url: str, name: str, size: str) -> Any:
    """A screenshot of C{url} at C{size} (C{W,H}), kept as C{build/NAME}."""

    async def go() -> str:
        os.makedirs(BUILD, exist_ok=True)
        screenshot = os.path.join(BUILD, name)
        if os.path.exists(screenshot):
            os.unlink(screenshot)
        shot = await deferToThread(
            run_chromium, chromium, "--hide-scrollbars", f"--window-size={size}", f"--screenshot={screenshot}", url
        )
        test.assertEqual(shot.returncode, 0, shot.stderr[-2000:])
        with open(screenshot, "rb") as f:
            header = f.read(24)
        test.assertEqual(header[:8], b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", header[16:24])
        test.assertEqual(f"{width},{height}", size)
        test.assertGreater(os.path.getsize(screenshot), 5000)
        return screenshot

    return ensureDeferred(go())


def cells(row: Element) -> dict[str, str]:
    """A table row's cells by their class (without C{num})."""
    return {c.attrs.get("class", "").replace("num ", ""): c.text for c in row.children if c.tag == "td"}


class StatusPageTests(TestCase):
    timeout = 120

    def test_page_in_headless_chromium(self) -> Any:
        chromium = find_chromium()

        async def go() -> None:
            h = await Harness(self).start("--request-timeout", "0.5")
            # A refused registration (wrong protocol version), with markup in its id.
            with self.assertRaises(RuntimeError):
                await h.agent("<b>old</b>", protocol_version=1)

            def waf_decides(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if body["uri"] == "/slow":
                    return None
                return block(403) if body["uri"] == "/blocked" else answer()

            waf = await h.agent("waf", decide=waf_decides)
            await h.agent("bot", events=(1, 2, 5))
            paused_bot = await h.agent("bot")
            history = h.gateway_service.history
            # Snapshots between the requests, as every 10 s in service.
            for _ in range(3):
                self.assertEqual((await h.get("/ok")).code, 200)
                history.sample()
            self.assertEqual((await h.get("/blocked")).code, 403)
            history.sample()
            self.assertEqual((await h.get("/slow")).code, 503)
            paused_bot.pause()
            waf.health(1)
            await wait_until(
                lambda: any(c.is_paused for c in h.pool.connections("bot"))
                and h.pool.connections("waf")[0].health_state == 1,
                what="pause and health",
            )
            blocked = h.pool.connections("bot")[0]
            # Marked as not reading; not aborted while the test looks.
            blocked.write_stall_timeout = 600
            blocked.set_write_blocked(True)
            self.addCleanup(blocked.set_write_blocked, False)

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
            self.assertIn("the client gets 503", dom.by_id("policy-text").text)

            # Per agent: rate, decisions, latency, failures, paused and write-blocked.
            agents = {r.attrs["data-agent"]: cells(r) for r in dom.select("tr") if "data-agent" in r.attrs}
            self.assertEqual(set(agents), {"waf", "bot"})
            waf_row, bot_row = agents["waf"], agents["bot"]
            self.assertEqual(waf_row["mode"], "reverse (json)")
            self.assertRegex(waf_row["rps"], r"^[0-9.e-]+/s$")
            self.assertNotEqual(waf_row["rps"], "0/s")
            self.assertIn("allow 3", waf_row["decisions"])
            self.assertIn("block 1", waf_row["decisions"])
            self.assertRegex(waf_row["p50"], r"^[0-9.]+ (ms|s)$")
            self.assertRegex(waf_row["p99"], r"^[0-9.]+ (ms|s)$")
            self.assertEqual(waf_row["timeouts"], "1")
            self.assertEqual(waf_row["failures"], "1")
            self.assertEqual(waf_row["cancels"], "1")
            self.assertEqual((bot_row["paused"], bot_row["write-blocked"]), ("1", "1"))
            self.assertEqual(bot_row["connections"], "2")

            # Per connection: peer with pid and uid, events by name, age.
            rows = dom.select("tr", data_agent_id="bot")
            self.assertEqual(len(rows), 2)
            by_connection = {r.attrs["data-connection-id"]: r for r in dom.all if "data-connection-id" in r.attrs}
            self.assertEqual(set(by_connection), {c.connection_id for c in h.pool.connections()})
            for connection in h.pool.connections():
                row = cells(by_connection[connection.connection_id])
                self.assertEqual(row["agent"], connection.agent_id)
                self.assertEqual(row["flow"], "paused" if connection.is_paused else "open")
                self.assertEqual(row["write"], "blocked" if connection.is_write_blocked else "ok")
                self.assertEqual(row["in-flight"], "0")
                self.assertIn(f"pid {os.getpid()}, uid {os.getuid()}", row["peer"])
                self.assertRegex(row["age"], r"^(\d+ min )?\d+ s$")
            waf_connection = cells(by_connection[h.pool.connections("waf")[0].connection_id])
            self.assertEqual(waf_connection["health"], "healthy")
            self.assertEqual(waf_connection["answered"], "4")
            bot_events = cells(by_connection[h.pool.connections("bot")[0].connection_id])["events"]
            self.assertEqual(bot_events, "request_headers, request_body_chunk, request_complete")

            # The gateway: rates, status classes, quantiles, fail-open passes.
            self.assertNotEqual(dom.by_id("gateway-rps").text, "0/s")
            for element in ("gateway-p50", "gateway-p99", "upstream-p50", "upstream-p99"):
                self.assertRegex(dom.by_id(element).text, r"^[0-9.]+ (ms|s)$", element)
            self.assertEqual(dom.by_id("fail-open-passes").text, "0")
            classes = {r.attrs["data-code-class"]: cells(r) for r in dom.all if "data-code-class" in r.attrs}
            self.assertEqual(classes["2xx"]["total"], "3")
            self.assertEqual(classes["4xx"]["total"], "1")
            self.assertEqual(classes["5xx"]["total"], "1")
            requests = {r.attrs["data-decision"]: cells(r) for r in dom.all if "data-decision" in r.attrs}
            self.assertEqual(requests["allow"]["total"], "3")
            self.assertEqual(requests["block"]["total"], "1")
            self.assertEqual(requests["unavailable"]["total"], "1")
            self.assertEqual(requests["error"]["total"], "0")

            # Charts, drawn here: a line per series, nothing fetched.
            for chart, lines in (
                ("chart-requests", {"allowed", "denied", "failed"}),
                ("chart-latency", {"p50", "p99"}),
                ("chart-connections", {"connections"}),
            ):
                figure = dom.by_id(chart)
                drawn = [e for e in dom.all if e.tag == "polyline" and _inside(e, figure)]
                self.assertEqual({e.attrs["data-line"] for e in drawn}, lines, chart)
                self.assertTrue(all(e.attrs["points"] for e in drawn), chart)
            self.assertEqual([e for e in dom.all if e.tag in ("script", "img", "link")], [])

            # Registration rejections: by reason, the last one escaped.
            rejections = {r.attrs["data-reason"]: cells(r) for r in dom.all if "data-reason" in r.attrs}
            self.assertEqual(rejections["version"]["count"], "1")
            self.assertEqual(dom.by_id("last-rejected-agent").text, "<b>old</b>")
            self.assertTrue(dom.by_id("last-rejected-peer").text.startswith("unix"))
            self.assertEqual(dom.by_id("last-rejected-reason").text, "version")
            self.assertRegex(dom.by_id("last-rejected-age").text, r"^(\d+ min )?\d+ s$")
            self.assertRegex(dom.by_id("last-rejected-time").text, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")
            self.assertEqual([e for e in dom.all if e.tag == "b" and e.text == "old"], [])

            links = {a.attrs["href"] for a in dom.select("a")}
            self.assertEqual(links, {"/agents", "/metrics"})
            self.assertLess(len(dumped.stdout), 40_000)

            await shoot(self, chromium, url, "status-page.png", "1280,800")
            await shoot(self, chromium, url, "status-page-narrow.png", "420,900")

        return ensureDeferred(go())


def _inside(element: Element, ancestor: Element) -> bool:
    stack = list(ancestor.children)
    while stack:
        child = stack.pop()
        if child is element:
            return True
        stack.extend(child.children)
    return False
