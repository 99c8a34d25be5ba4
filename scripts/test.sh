#!/usr/bin/env bash
# Installs what is missing, builds everything, and runs the whole test suite (ctest).
# GPU tests (label `gpu`) skip with a message where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
build_dir=${TRIPLANE_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" -j"${TRIPLANE_JOBS:-2}"
cd "$build_dir"
ctest --output-on-failure -j"${TRIPLANE_TEST_JOBS:-2}" --timeout 600 "$@"
