"""
Hostile agents against a real listener: does the memory they take come back?

    python -m benchmarks.hostile                 # both attacks, default sizes
    python -m benchmarks.hostile --quick         # small sizes (a smoke run)
    python -m benchmarks.hostile --server-path DIR   # sentinel_twisted from DIR

A listener (a L{ReverseConnectionFactory} with its defaults, on a UNIX
socket in a temporary directory) runs in a subprocess; this process attacks
it over the socket with plain blocking sockets and reads the listener's
memory from C{/proc/PID/status}: RSS before, peak during (C{VmHWM}, reset
before each attack through C{/proc/PID/clear_refs}) and after the attacking
connections are gone.

The attacks, as issue 11 reported them:

  - C{pong-echo}: registered agents send Pings padded with extra fields
    (10 MiB each, 150 in all) and read nothing.  A listener that echoes the
    body queues every byte of it; ours answers with the sequence and
    timestamp only, and skips control frames over 64 KiB without buffering
    them.
  - C{incomplete-frames}: 48 registered agents each send all but the last
    byte of a 16 MiB frame, and 48 unregistered connections all but the last
    byte of the largest frame they may send, and then wait.  Ours holds at
    most the incomplete-frame budget (64 MiB) and closes whoever holds the
    most beyond it; before registration a frame may not exceed 1 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_PREFIX = struct.Struct(">I")
MIB = 1024 * 1024


def frame(message_type: int, payload: bytes) -> bytes:
    return _PREFIX.pack(len(payload) + 1) + bytes([message_type]) + payload


def registration(agent_id: str) -> bytes:
    body = {
        "protocol_version": 2,
        "agent_id": agent_id,
        "capabilities": {
            "agent_id": agent_id,
            "name": "hostile",
            "version": "1",
            "supported_events": [1],
            "features": {
                "streaming_body": False,
                "websocket": False,
                "guardrails": False,
                "config_push": False,
                "metrics_export": False,
                "concurrent_requests": 1,
                "cancellation": False,
                "flow_control": False,
                "health_reporting": False,
            },
            "limits": {"max_body_size": 1, "max_concurrency": 1, "preferred_chunk_size": 1},
        },
        "auth_token": None,
        "metadata": None,
    }
    return frame(0x01, json.dumps(body).encode())


# -- the listener, in its own process -------------------------------------------

# Run with "python -c": the listener imports sentinel_twisted from
# --server-path when given (to measure other sources), else as installed.
SERVER = """
import sys
if sys.argv[2]:
    sys.path.insert(0, sys.argv[2])
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXServerEndpoint
from sentinel_twisted.proxy.factory import ReverseConnectionFactory

factory = ReverseConnectionFactory(clock=reactor)
endpoint = UNIXServerEndpoint(reactor, sys.argv[1], backlog=1024)
endpoint.listen(factory).addCallback(lambda port: print("ready", flush=True))
reactor.run()
"""


# -- measuring ---------------------------------------------------------------------


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def listener(server_path: str | None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    directory = tempfile.mkdtemp(prefix="sentinel-hostile-")
    path = os.path.join(directory, "s.sock")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, path, server_path or ""],
        stdout=subprocess.PIPE,
        text=True,
        cwd=directory,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"the listener did not start: {line!r}")
        yield process, path
    finally:
        process.terminate()
        process.wait(10)
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def register(path: str, agent_id: str) -> socket.socket:
    s = connect(path)
    s.sendall(registration(agent_id))
    header = recv_exactly(s, 4)
    body = recv_exactly(s, _PREFIX.unpack(header)[0])
    response = json.loads(body[1:])
    if not response["success"]:
        raise SystemExit(f"registration refused: {response['error']}")
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def send_all(s: socket.socket, data: bytes, deadline: float) -> int:
    """Send what the peer takes until it closes or the deadline; bytes sent."""
    view = memoryview(data)
    sent = 0
    s.setblocking(False)
    try:
        while sent < len(view) and time.monotonic() < deadline:
            _, writable, _ = select.select([], [s], [], 0.05)
            if not writable:
                continue
            try:
                sent += s.send(view[sent : sent + 1024 * 1024])
            except BlockingIOError:
                continue
            except OSError:
                break
    finally:
        s.setblocking(True)
    return sent


class Sampler:
    """The listener's RSS, sampled while an attack runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = status_kib(pid, "VmRSS")

    def sample(self) -> None:
        self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))


def settle(pid: int, seconds: float) -> int:
    time.sleep(seconds)
    return status_kib(pid, "VmRSS")


def pong_echo(pid: int, path: str, pings: int, size: int, connections: int) -> dict[str, Any]:
    sampler = Sampler(pid)
    socks = [register(path, f"pinger-{i}") for i in range(connections)]
    padding = "x" * size
    body = json.dumps({"sequence": 1, "timestamp_ms": 0, "padding": padding}).encode()
    ping = frame(0x41, body)
    sent = 0
    deadline = time.monotonic() + 60
    for i in range(pings):
        s = socks[i % connections]
        sent += send_all(s, ping, deadline)
        sampler.sample()
    time.sleep(0.5)
    sampler.sample()
    for s in socks:
        s.close()
    return {"sent_bytes": sent, "peak_sampled_kib": sampler.peak}


def incomplete_frames(
    pid: int, path: str, registered: int, unregistered: int, registered_size: int, early_size: int
) -> dict[str, Any]:
    sampler = Sampler(pid)
    socks = []
    deadline = time.monotonic() + 120
    sent = 0
    for i in range(registered):
        s = register(path, f"holder-{i % 250}-{i}")
        data = _PREFIX.pack(registered_size) + b"\x20" + b"x" * (registered_size - 2)
        sent += send_all(s, data, deadline)
        socks.append(s)
        sampler.sample()
    for _ in range(unregistered):
        s = connect(path)
        data = _PREFIX.pack(early_size) + b"\x01" + b"x" * (early_size - 2)
        sent += send_all(s, data, deadline)
        socks.append(s)
        sampler.sample()
    time.sleep(0.5)
    sampler.sample()
    for s in socks:
        s.close()
    return {"sent_bytes": sent, "peak_sampled_kib": sampler.peak}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with listener(args.server_path) as (process, path):
        time.sleep(0.5)
        attacks = {
            "pong-echo": lambda: pong_echo(
                process.pid, path, args.pings, args.ping_size, args.ping_connections
            ),
            "incomplete-frames": lambda: incomplete_frames(
                process.pid,
                path,
                args.registered,
                args.unregistered,
                args.frame_size,
                args.early_frame_size,
            ),
        }
        for name in args.attacks.split(","):
            before = status_kib(process.pid, "VmRSS")
            peak_reset = reset_peak(process.pid)
            started = time.monotonic()
            outcome = attacks[name]()
            elapsed = time.monotonic() - started
            peak = max(outcome["peak_sampled_kib"], status_kib(process.pid, "VmHWM") if peak_reset else 0)
            after = settle(process.pid, args.settle)
            result = {
                "attack": name,
                "rss_before_mb": round(before / 1024, 1),
                "rss_peak_mb": round(peak / 1024, 1),
                "rss_after_mb": round(after / 1024, 1),
                "sent_mb": round(outcome["sent_bytes"] / MIB, 1),
                "seconds": round(elapsed, 2),
            }
            results.append(result)
            print(
                f"{name:18} RSS before {result['rss_before_mb']:7.1f} MB, peak "
                f"{result['rss_peak_mb']:7.1f} MB, after {result['rss_after_mb']:7.1f} MB "
                f"({result['sent_mb']} MiB sent in {result['seconds']} s)",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default="pong-echo,incomplete-frames")
    parser.add_argument("--pings", type=int, default=150)
    parser.add_argument("--ping-size", type=int, default=10 * MIB)
    parser.add_argument("--ping-connections", type=int, default=1)
    parser.add_argument("--registered", type=int, default=48)
    parser.add_argument("--unregistered", type=int, default=48)
    parser.add_argument("--frame-size", type=int, default=16 * MIB, help="declared length, registered")
    parser.add_argument(
        "--early-frame-size", type=int, default=MIB, help="declared length, before registration"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before 'after'")
    parser.add_argument("--server-path", help="import sentinel_twisted for the listener from here")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.pings, args.ping_size = 10, MIB
        args.registered, args.unregistered = 4, 4
        args.frame_size, args.early_frame_size = 2 * MIB, 64 * 1024
        args.settle = 0.5
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
