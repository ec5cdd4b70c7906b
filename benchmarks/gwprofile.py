"""
Where the gateway spends per request: a fixed number of HTTP requests
through C{twistd sentinel-reverse --http} (built-in echo upstream), with no
agent or with one reference agent, the gateway run under a profiler.

    python -m benchmarks.gwprofile --requests 20000 --events none
    python -m benchmarks.gwprofile --requests 20000 --events 1 --profiler cprofile
    python -m benchmarks.gwprofile --requests 4000 --events 1,3,4,5 --profiler callgrind

With C{callgrind} the instructions of the gateway process are counted
(deterministic, unlike a rate on a shared machine); run it twice with two
request counts and divide the difference by the difference in requests to
get instructions per request without start-up and shut-down.  With
C{cprofile} the stats are written where C{--out} says (C{pstats} reads
them); the call counts divided by the requests are the calls per request.

The client is a plain blocking loop over C{--connections} kept-alive
connections, one request in flight on each; it is no load test (use
C{python -m benchmarks.run --sections gateway} for rates).
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

from benchmarks.gateway import _TWISTD, free_port, run_wrk, wait_for_port
from benchmarks.reference import peers_dir


def _responses(buffer: bytearray) -> int:
    """Complete responses at the start of C{buffer}, removed from it."""
    done = 0
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return done
        head = bytes(buffer[:end]).lower()
        if not head.startswith(b"http/1.1 200"):
            raise RuntimeError(f"not a 200: {head!r}")
        index = head.find(b"content-length:")
        if index >= 0:
            total = end + 4 + int(head[index + 15 :].split(b"\r\n", 1)[0])
            if len(buffer) < total:
                return done
        elif b"transfer-encoding: chunked" in head:
            last = buffer.find(b"\r\n0\r\n\r\n", end + 2)
            if last < 0:
                return done
            total = last + 7
        else:
            raise RuntimeError(f"a response of unknown length: {head!r}")
        del buffer[:total]
        done += 1


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def load(port: int, requests: int, connections: int) -> float:
    """C{requests} GETs over C{connections} connections; the seconds it took."""
    request = b"GET /bench HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
    selector = selectors.DefaultSelector()
    sent = 0
    answered = 0
    buffers: dict[socket.socket, bytearray] = {}
    for _ in range(min(connections, requests)):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffers[s] = bytearray()
        selector.register(s, selectors.EVENT_READ)
        s.sendall(request)
        sent += 1
    started = time.monotonic()
    while answered < requests:
        for key, _ in selector.select(60):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            data = s.recv(65536)
            if not data:
                raise RuntimeError("the gateway closed a connection")
            buffer = buffers[s]
            buffer += data
            for _ in range(_responses(buffer)):
                answered += 1
                if sent < requests:
                    s.sendall(request)
                    sent += 1
    elapsed = time.monotonic() - started
    for s in buffers:
        s.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=1000, help="requests before the profiled ones (cprofile: not excluded)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--events", default="none", help="the reference agent's events (none: no agent)")
    parser.add_argument("--profiler", choices=("none", "cprofile", "callgrind", "strace"), default="none")
    parser.add_argument("--out", default="gateway.prof")
    parser.add_argument("--wrk", type=float, default=0, help="load with wrk -c64 for this many seconds instead; prints CPU per request")
    parser.add_argument("--peers", default=None)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--path", default=None, help="PYTHONPATH for the gateway (another checkout)")
    a = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="gwprofile-")
    sock = os.path.join(workdir, "gateway.sock")
    port = free_port()
    twistd = [a.python, "-c", _TWISTD, "--nodaemon", "--logfile", os.path.join(workdir, "gateway.log"),
              "--pidfile", os.path.join(workdir, "gateway.pid")]
    if a.profiler == "cprofile":
        twistd += ["--profile", os.path.abspath(a.out), "--profiler", "cprofile", "--savestats"]
    argv = [*twistd, "sentinel-reverse", "--listen", f"unix:{sock}",
            "--http", f"tcp:{port}:interface=127.0.0.1", "--status", "none", "--fail-open"]
    if a.profiler == "strace":
        argv = ["strace", "-f", "-c", "-o", os.path.abspath(a.out), *argv]
    if a.profiler == "callgrind":
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={os.path.abspath(a.out)}", *argv]
    env = dict(os.environ)
    if a.path:
        env["PYTHONPATH"] = a.path
    gateway = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    agent = None
    try:
        wait_for_port(port, 600, gateway)
        if a.events != "none":
            agent = subprocess.Popen(
                [os.path.join(peers_dir(a), "rust-agent"), "--connect", f"unix:{sock}",
                 "--agent-id", "profile", "--connections", "4", "--events", a.events, "--quiet"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
            assert agent.stdout is not None
            for _ in range(4):
                agent.stdout.readline()
            time.sleep(0.5)
        if a.warmup:
            load(port, a.warmup, a.connections)
        if a.wrk:
            before = _cpu(gateway.pid)
            result = run_wrk(f"http://127.0.0.1:{port}/bench", 64, a.wrk)
            after = _cpu(gateway.pid)
            count = result["rps"] * max(1, int(round(a.wrk)))
            user, system = ((b - a) / count * 1e6 for a, b in zip(before, after, strict=True))
            print(
                f"wrk: {result['rps']:,.0f}/s; gateway CPU per request {user + system:.1f} us "
                f"(user {user:.1f}, system {system:.1f})",
                flush=True,
            )
        else:
            elapsed = load(port, a.requests, a.connections)
            print(f"{a.requests} requests in {elapsed:.2f} s: {a.requests / elapsed:,.0f}/s", flush=True)
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait()
        if a.profiler == "strace":
            # strace keeps SIGTERM to itself: the gateway gets it directly.
            with open(os.path.join(workdir, "gateway.pid")) as f:
                os.kill(int(f.read()), signal.SIGTERM)
        else:
            gateway.terminate()
        gateway.wait(600)


if __name__ == "__main__":
    main()
