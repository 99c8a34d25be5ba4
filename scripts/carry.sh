# Sourced by scripts/gpu-check.sh and scripts/cgroup-check.sh: what binaries built here need on
# the device machine, which has neither Debian's libraries nor bubblewrap (and no apt).

# Copies into DEST the non-system shared libraries the binaries BIN... link to. Left out: the C
# runtime (there), libstdc++/libgcc_s (the device's are newer and backward compatible), and
# CUDA's own libraries (found there, hundreds of MB).
carry_libs() {
  local dest=$1 bin name path
  shift
  mkdir -p "$dest"
  for bin in "$@"; do
    { ldd "$bin" 2>/dev/null || true; } | awk '/=> \//{print $1, $3}' | while read -r name path; do
      case $name in
        libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*) ;;
        libcublas*|libcublasLt*|libnccl*|libcuda.so*|libcudart.so*) ;;
        *) cp -L "$path" "$dest/$name" ;;
      esac
    done
  done
}

# Copies this machine's bwrap and its libraries (but the C runtime) into DEST.
carry_bwrap() {
  local dest=$1 name path
  mkdir -p "$dest"
  cp /usr/bin/bwrap "$dest/bwrap"
  ldd /usr/bin/bwrap | awk '/=> \//{print $1, $3}' | while read -r name path; do
    case $name in libc.so*|ld-linux*) ;; *) cp -L "$path" "$dest/$name" ;; esac
  done
}

# On the device machine: installs the bwrap carried in DIR as /usr/local/bin/bwrap unless one
# is there (where the sessions look for it), with its carried libraries where the system lacks
# them.
install_carried_bwrap() {
  local dir=$1
  command -v bwrap >/dev/null && return 0
  if ldd "$dir/bwrap" | grep -q 'not found'; then
    mkdir -p /usr/local/lib/triplane-bwrap && cp "$dir"/* /usr/local/lib/triplane-bwrap/
    printf '#!/bin/sh\nLD_LIBRARY_PATH=/usr/local/lib/triplane-bwrap exec /usr/local/lib/triplane-bwrap/bwrap "$@"\n' \
      >/usr/local/bin/bwrap
    chmod 755 /usr/local/bin/bwrap
  else
    cp "$dir/bwrap" /usr/local/bin/bwrap
  fi
  echo "installed bwrap: $(/usr/local/bin/bwrap --version 2>&1)"
}
