#!/usr/bin/env bash
# Release hygiene: the sdist and the wheel build, pass `twine check`, carry
# what they should, and the wheel installed (not editable) into a fresh venv
# runs `twistd sentinel-reverse`, plugin discovery included.  NEWS.rst must
# match newsfragments/.
set -euo pipefail
REPO=$(pwd)
WORK=$(mktemp -d "${CI_TMP:-/tmp}/wheel.XXXXXX")
LISTENER_PID=
cleanup() {
    if [ -n "$LISTENER_PID" ] && kill -0 "$LISTENER_PID" 2>/dev/null; then
        kill -KILL "$LISTENER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

python -m pip install -q build twine towncrier

echo "-- NEWS.rst is built from newsfragments/"
python docs/build_news.py --check

echo "-- python -m build (sdist, then the wheel from the sdist)"
python -m build --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls "$WORK/dist"
python -m twine check --strict "$WORK"/dist/*

echo "-- contents"
python - "$WORK"/dist/*.whl "$WORK"/dist/*.tar.gz <<'EOF'
import sys, tarfile, zipfile

wheel, sdist = sys.argv[1:3]
names = set(zipfile.ZipFile(wheel).namelist())
problems = []
def need(present, what):
    if not present:
        problems.append(what)
plugins = sorted(n for n in names if n.startswith("twisted/plugins/") and n.endswith(".py"))
print("wheel plugins:", plugins)
need("twisted/plugins/sentinel_reverse.py" in names, "wheel lacks twisted/plugins/sentinel_reverse.py")
need("twisted/__init__.py" not in names, "wheel has twisted/__init__.py (would shadow Twisted)")
need("twisted/plugins/__init__.py" not in names, "wheel has twisted/plugins/__init__.py (would shadow Twisted's plugins)")
need(not any(n.endswith("dropin.cache") for n in names), "wheel has a dropin.cache")
need("sentinel_twisted/py.typed" in names, "wheel lacks sentinel_twisted/py.typed")
need(not any(n.startswith(("tests/", "examples/", "docs/")) for n in names), "wheel has tests, examples or docs as packages")

members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
for path in ["README.md", "NEWS.rst", "setup.cfg", "pyproject.toml", "MANIFEST.in",
             "docs/index.md", "docs/embedding.md", "docs/operators.md",
             "examples/embed_listener.py", "tests/test_examples.py",
             "twisted/plugins/sentinel_reverse.py", "newsfragments/README.md"]:
    need(path in members, f"sdist lacks {path}")
need(not any(m.endswith("dropin.cache") for m in members), "sdist has a dropin.cache")
if problems:
    sys.exit("\n".join(problems))
print("wheel and sdist contents ok")
EOF

echo "-- the wheel in a fresh venv"
python -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$WORK"/dist/*.whl
cd "$WORK"   # nothing of the checkout on the path from here on
"$WORK/venv/bin/twistd" --help > twistd-help.txt
grep -q "sentinel-reverse" twistd-help.txt || { cat twistd-help.txt; echo "twistd does not list sentinel-reverse"; exit 1; }
if [ -e "$REPO/twisted/plugins/sentinel_agent.py" ]; then
    grep -q "sentinel-agent" twistd-help.txt || { cat twistd-help.txt; echo "twistd does not list sentinel-agent"; exit 1; }
fi
expected="sentinel_twisted $(cd "$REPO" && python -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg"); print(c["metadata"]["version"])')"
actual=$("$WORK/venv/bin/twistd" sentinel-reverse --version)
[ "$actual" = "$expected" ] || { echo "version: got '$actual', expected '$expected'"; exit 1; }
echo "$actual"

echo "-- twistd -n sentinel-reverse starts, registers an agent, stops on SIGTERM"
extra=()
# The gateway and status page (when present) would take TCP ports: not here.
"$WORK/venv/bin/twistd" sentinel-reverse --help > reverse-help.txt
if grep -q -- "--http=" reverse-help.txt; then extra+=(--http none); fi
if grep -q -- "--status=" reverse-help.txt; then extra+=(--status none); fi
echo "twistd -n sentinel-reverse --listen unix:$WORK/s.sock ${extra[*]}"
"$WORK/venv/bin/twistd" -n --pidfile= sentinel-reverse --listen "unix:$WORK/s.sock" "${extra[@]}" \
    > listener.log 2>&1 &
LISTENER_PID=$!
"$WORK/venv/bin/python" - "$WORK/s.sock" <<'EOF'
import json, os, socket, struct, sys, time

path = sys.argv[1]
deadline = time.monotonic() + 20
while not os.path.exists(path):
    if time.monotonic() > deadline:
        sys.exit(f"{path} did not appear")
    time.sleep(0.05)
features = dict.fromkeys(["streaming_body", "websocket", "guardrails", "config_push",
                          "metrics_export", "cancellation", "flow_control",
                          "health_reporting"], False)
features["concurrent_requests"] = 1
body = json.dumps({
    "protocol_version": 2, "agent_id": "wheel-check", "auth_token": None, "metadata": None,
    "capabilities": {"agent_id": "wheel-check", "name": "ci", "version": "0", "supported_events": [1],
                     "features": features,
                     "limits": {"max_body_size": 1, "max_concurrency": 1, "preferred_chunk_size": 1}},
}).encode()
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(path)
s.sendall(struct.pack("!IB", len(body) + 1, 1) + body)
data = b""
while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
    chunk = s.recv(65536)
    if not chunk:
        sys.exit(f"connection closed after {data!r}")
    data += chunk
answer = json.loads(data[5:])
if not answer["success"]:
    sys.exit(f"registration refused: {answer}")
print("registered:", answer["connection_id"], "proxy", answer["proxy_version"])
s.close()
EOF
kill -TERM "$LISTENER_PID"
for _ in $(seq 100); do
    kill -0 "$LISTENER_PID" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$LISTENER_PID" 2>/dev/null; then
    cat listener.log; echo "twistd did not stop within 10 s of SIGTERM"; exit 1
fi
status=0; wait "$LISTENER_PID" || status=$?
LISTENER_PID=
# A clean SIGTERM stop exits 0 (the programs keep twistd from re-raising it).
[ "$status" -eq 0 ] || { cat listener.log; echo "twistd exited with status $status"; exit 1; }
grep -q "Server Shut Down." listener.log || { cat listener.log; echo "no clean shutdown"; exit 1; }
[ ! -e "$WORK/s.sock" ] || { cat listener.log; echo "the socket outlived twistd"; exit 1; }
grep -q "Agent wheel-check registered connection" listener.log || { cat listener.log; exit 1; }
if grep -q "GatewaySite\|StatusSite" listener.log; then cat listener.log; echo "--http none / --status none ignored"; exit 1; fi
if grep -q "Traceback" listener.log; then cat listener.log; exit 1; fi
echo "wheel ok"
