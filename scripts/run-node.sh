#!/usr/bin/env bash
# Installs what is missing, builds, and starts a Triplane node on embedded defaults
# (state under ./data, API on 127.0.0.1:7400). Extra arguments go to `triplane serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
build_dir=${TRIPLANE_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build_dir" -j"${TRIPLANE_JOBS:-2}" --target triplane triplane-cli
exec "$build_dir/apps/triplane/triplane" serve "$@"
