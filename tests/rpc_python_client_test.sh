#!/usr/bin/env bash
# Runs examples/python/triplane_client.py (pycapnp, an implementation we did not write) against
# the real node (`triplane serve`). Exit 77 = skipped (no venv/pip/PyPI).
# usage: rpc_python_client_test.sh TRIPLANE_EXE CLI_EXE CLIENT_PY SCHEMA VENV_DIR
set -uo pipefail
node_exe=$1 cli=$2 client=$3 schema=$4 venv=$5

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import capnp' 2>/dev/null; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    echo "SKIP: cannot create a Python venv (python3-venv missing?)"
    exit 77
  fi
  if ! timeout 240 "$venv/bin/pip" install --quiet pycapnp >/dev/null 2>&1; then
    echo "SKIP: pip could not install pycapnp (PyPI unreachable?)"
    exit 77
  fi
fi

work=$(mktemp -d)
trap 'kill $node_pid 2>/dev/null; wait $node_pid 2>/dev/null; rm -rf "$work"' EXIT
token=$("$cli" hash-token pyuser tenant 2>"$work/token" >"$work/tokens") || exit 1
token=$(sed 's/^token: //' "$work/token")
"$node_exe" serve --data-dir "$work/data" --listen 127.0.0.1:0 --tokens "$work/tokens" \
  >"$work/out" 2>"$work/node.log" &
node_pid=$!
for _ in $(seq 600); do grep -q "serving on" "$work/out" && break; sleep 0.1; done
port=$(sed -n 's/^triplane: serving on [^ ]*:\([0-9]*\) .*/\1/p' "$work/out")
[ -n "$port" ] || { echo "node did not start"; cat "$work/node.log"; exit 1; }

TRIPLANE_ENDPOINT=127.0.0.1:$port TRIPLANE_TOKEN=$token timeout 60 \
  "$venv/bin/python" "$client" "$schema"
rc=$?
kill -TERM $node_pid
wait $node_pid
node_rc=$?
[ $node_rc -eq 0 ] || { echo "node exited with $node_rc"; tail -20 "$work/node.log"; exit 1; }
exit $rc
