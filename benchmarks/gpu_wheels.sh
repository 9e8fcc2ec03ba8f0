#!/usr/bin/env bash
# Fill .whl/ with what the GPU machines' image lacks for benchmarks/gpu_check.sh (it has torch, transformers,
# pytest, tensorboard, ... but no network and no deepspeed; its Python is 3.12): deepspeed (built here as a pure
# Python wheel, PyPI ships only its source) and the needs the image misses (hjson, pydantic and its parts), at
# this machine's versions. Then carry .whl with the call:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
versions=$(python - <<'PY'
from importlib.metadata import version  # versions only: importing deepspeed would print to stdout

print(" ".join(f"{name}=={version(name)}" for name in
               ("hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")))
print(f"deepspeed=={version('deepspeed')}")
PY
)
deepspeed_pin=$(tail -1 <<< "$versions")
needs=$(head -1 <<< "$versions")
python -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "$deepspeed_pin"
# shellcheck disable=SC2086  # one argument per pinned name
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $needs
ls -l .whl
du -sh .whl
