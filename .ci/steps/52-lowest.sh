#!/usr/bin/env bash
# The suite again, against the lowest versions setup.cfg allows for every
# direct dependency (uv's --resolution lowest-direct), so that a lower bound
# that is not true breaks CI rather than a user.  The versions used are
# printed first.
set -euo pipefail
cd "$(dirname "$0")/../.."
LOW="${CI_TMP:-$(mktemp -d)}/venv-lowest"
python -m pip install -q uv
# On the oldest Python setup.cfg allows when the machine has it, on PATH or
# installed by pyenv (the newest dependencies run on the newest Python):
# code that only a later Python understands breaks CI too.
LOWEST=$(python -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg"); print(c["options"]["python_requires"].removeprefix(">="))')
LOWEST_PYTHON=""
for candidate in "python$LOWEST" $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$LOWEST".*/bin/python 2> /dev/null | sort -V | tail -n 1); do
    if "$candidate" -c pass 2> /dev/null; then
        LOWEST_PYTHON=$candidate
        break
    fi
done
if [ -n "$LOWEST_PYTHON" ]; then
    "$LOWEST_PYTHON" -m venv "$LOW"
else
    echo "-- no Python $LOWEST found: the lowest dependencies run on $(python -V)"
    python -m venv "$LOW"
fi
"$LOW/bin/python" -V
python -m uv pip install -q --python "$LOW/bin/python" --resolution lowest-direct -e '.[test]'
echo "-- lowest direct dependencies"
python -m uv pip freeze --python "$LOW/bin/python" --exclude-editable
"$LOW/bin/python" -m pytest
