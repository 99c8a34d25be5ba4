#!/usr/bin/env bash
# The sandbox tests on another Linux host than the build machine: made for the device machine
# (the device tool), whose kernel runs cgroup v2 where the build machine has v1 only.
#
#   1. Here:                 scripts/cgroup-check.sh pack
#      Builds the sandbox test binaries and fills build-cgroup-check/ (ignored by git): the
#      binaries, triplane-sandbox-exec beside them, their non-system shared libraries, and this
#      machine's bwrap with its libraries (the device machine has no bubblewrap and no apt).
#   2. On the other host:    bash scripts/cgroup-check.sh run      (carry ["build-cgroup-check"])
#      Prints the host's cgroup set-up, installs bwrap as /usr/local/bin/bwrap when none is
#      there, runs the test binaries and prints a table. Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/carry.sh
pack_dir=build-cgroup-check
tests=(actors_sandbox_process_test actors_sandbox_pool_test actors_session_core_test actors_session_actor_test
       actors_workspace_test actors_workspace_sync_test actors_tar_members_test)

pack() {
  set -e
  local build_dir=${TRIPLANE_BUILD_DIR:-build}
  cmake --build "$build_dir" --target "${tests[@]}" triplane_sandbox_exec sandbox_bench -j"${TRIPLANE_JOBS:-2}"
  rm -rf "$pack_dir"
  mkdir -p "$pack_dir/bin"
  for t in "${tests[@]}" triplane-sandbox-exec; do cp "$build_dir/actors/$t" "$pack_dir/bin/"; done
  cp "$build_dir/bench/sandbox_bench" "$pack_dir/bin/"
  carry_libs "$pack_dir/lib" "$pack_dir"/bin/*
  carry_bwrap "$pack_dir/bwrap"
  echo "packed $(du -sh "$pack_dir" | cut -f1) into $pack_dir/"
}

run() {
  [[ -d $pack_dir/bin ]] || { echo "no $pack_dir/: run 'scripts/cgroup-check.sh pack' first and carry it"; exit 2; }
  local out=${OUT:-$pack_dir/out}
  mkdir -p "$out/logs"
  {
    echo "== host"; uname -r; id; echo "cgroup of this shell: $(cat /proc/self/cgroup)"
    mount | grep -E 'cgroup' || true
    for f in cgroup.controllers cgroup.subtree_control; do
      echo "/sys/fs/cgroup/$f: $(cat /sys/fs/cgroup/$f 2>/dev/null)"
    done
    echo "own group's controllers: $(cat "/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)/cgroup.controllers" 2>/dev/null)"
    echo "user namespaces: max $(cat /proc/sys/user/max_user_namespaces 2>/dev/null)," \
         "apparmor restrict $(cat /proc/sys/kernel/apparmor_restrict_unprivileged_userns 2>/dev/null || echo n/a)"
    echo "python3: $(command -v python3) $(ls -la /usr/bin/python3 2>&1)"
  } 2>&1 | tee "$out/host.txt"
  install_carried_bwrap "$pack_dir/bwrap" | tee -a "$out/host.txt"
  export LD_LIBRARY_PATH=$PWD/$pack_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  local results=$out/results.txt t rc
  : >"$results"
  for t in "${tests[@]}"; do
    timeout 240 "$pack_dir/bin/$t" -r compact >"$out/logs/$t.log" 2>&1
    rc=$?
    printf '%-32s rc %-3s %s\n' "$t" "$rc" "$(grep -E '^(Passed|Failed|No tests)' "$out/logs/$t.log" | tail -n 1)" >>"$results"
    grep -E 'failed|FAILED' "$out/logs/$t.log" | head -40 >>"$results" || true
  done
  # As a service manager starts a node: alone in a cgroup of its own, with controllers available
  # from the parent (what systemd's Delegate=yes gives). Each binary again, so that every
  # sandbox test runs on cgroup v2 groups (the node moves itself into a leaf child).
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    local svc delegated=/sys/fs/cgroup/triplane-delegated
    mkdir -p "$delegated" && echo "+memory +pids +cpu" >/sys/fs/cgroup/cgroup.subtree_control
    for t in "${tests[@]}"; do
      # A fresh group per binary: a group whose controllers are enabled takes no new process.
      svc=/sys/fs/cgroup/triplane-check-$t.service
      mkdir -p "$svc"
      timeout 240 bash -c 'echo $$ >"$1/cgroup.procs" && exec "$2" -r compact' _ "$svc" "$pack_dir/bin/$t" \
        >"$out/logs/service-$t.log" 2>&1
      rc=$?
      printf '%-32s rc %-3s %s\n' "service: $t" "$rc" "$(grep -E '^(Passed|Failed|No tests)' "$out/logs/service-$t.log" | tail -n 1)" >>"$results"
      grep -E 'failed|FAILED' "$out/logs/service-$t.log" | head -40 >>"$results" || true
      echo "  $svc: type $(cat "$svc/cgroup.type"), enabled for children: $(cat "$svc/cgroup.subtree_control")" >>"$results"
    done
    echo "per-command groups left behind: $(find /sys/fs/cgroup/triplane-check-* -mindepth 1 -type d ! -name 'triplane-node.*' | wc -l)" >>"$results"
    # A directory delegated by configuration (cgroup-parent), the test process elsewhere.
    TRIPLANE_TEST_CGROUP_PARENT=$delegated timeout 120 "$pack_dir/bin/actors_sandbox_process_test" "[cgroup]" \
      -r compact >"$out/logs/delegated.log" 2>&1
    rc=$?
    printf '%-32s rc %-3s %s\n' "cgroup-parent $delegated" "$rc" "$(grep -E '^(Passed|Failed|No tests)' "$out/logs/delegated.log" | tail -n 1)" >>"$results"
    grep -E 'failed|FAILED' "$out/logs/delegated.log" | head -20 >>"$results" || true
  fi
  # The benchmark, as a node under a service manager runs it (cgroup v2 groups), on this host's
  # disk and on its tmpfs (sandbox_bench measures both).
  if [[ -f /sys/fs/cgroup/cgroup.controllers && ${CGROUP_CHECK_BENCH:-1} == 1 ]]; then
    svc=/sys/fs/cgroup/triplane-check-bench.service
    mkdir -p "$svc"
    timeout 300 bash -c 'echo $$ >"$1/cgroup.procs" && exec "$2" --json "$3" --dir /var/tmp' _ "$svc" \
      "$pack_dir/bin/sandbox_bench" "$out/sandbox_bench.json" >"$out/sandbox_bench.log" 2>&1
    rc=$?
    printf '%-32s rc %-3s\n' "sandbox_bench (/var/tmp: $(stat -f -c %T /var/tmp))" "$rc" >>"$results"
  fi
  grep -h 'cgroup mechanism of this host\|enforced: memory' "$out"/logs/*.log >>"$results" || true
  tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
  echo "== results"; cat "$results"
  ! grep -q 'rc [1-9]' "$results"
}

case ${1:-} in
  pack) pack ;;
  run) run ;;
  *) echo "usage: scripts/cgroup-check.sh pack|run (see the comment at the top)"; exit 2 ;;
esac
