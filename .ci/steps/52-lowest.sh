#!/usr/bin/env bash
# The suite again, against the lowest versions setup.cfg allows for every
# direct dependency (uv's --resolution lowest-direct), so that a lower bound
# that is not true breaks CI rather than a user.  The versions used are
# printed first.
set -euo pipefail
cd "$(dirname "$0")/../.."
LOW="${CI_TMP:-$(mktemp -d)}/venv-lowest"
python -m pip install -q uv
python -m venv "$LOW"
python -m uv pip install -q --python "$LOW/bin/python" --resolution lowest-direct -e '.[test]'
echo "-- lowest direct dependencies"
python -m uv pip freeze --python "$LOW/bin/python" --exclude-editable
"$LOW/bin/python" -m pytest
