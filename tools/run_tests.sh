#!/usr/bin/env bash
# The test command of the README: install what is missing, lint, then run the whole suite.
# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
python -m ruff check .
python -m pytest -q tests --durations=25 "$@"
