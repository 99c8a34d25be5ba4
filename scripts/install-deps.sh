#!/usr/bin/env bash
# Installs the Debian 12 packages Triplane builds and runs with. Idempotent: when everything is
# already present it prints nothing and touches nothing. Needs root (or sudo) only when it installs.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libcaf-dev
  capnproto libcapnp-dev
  librocksdb-dev libgflags-dev libsnappy-dev zlib1g-dev libbz2-dev liblz4-dev libzstd-dev
  libspdlog-dev libfmt-dev
  libjemalloc-dev
  catch2
  libssl-dev
  bubblewrap
  python3
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo_cmd=(sudo)
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
