#!/usr/bin/env bash
# The test command of the README: install what is missing, lint, then run the whole suite.
# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
# Two workers, each taking whole modules (their shared runs stay in one process); the 25 slowest tests are listed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
python -m ruff check .
python -m pytest -q tests -n 2 --dist loadscope --durations=25 "$@"
