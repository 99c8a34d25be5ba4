#!/usr/bin/env bash
# Every GPU test and the GPU benchmark in one go, for a session that has the device machine.
#
#   1. Here (no GPU needed):    scripts/gpu-check.sh pack
#      Builds the GPU targets and fills build-gpu-check/ (ignored by git: /build*/): the test and
#      bench binaries, their non-system shared libraries, the fixtures and where the binaries
#      expect them. About 20 MB.
#   2. On the device machine:   the device tool's run with
#        command:   bash scripts/gpu-check.sh run
#        carry:     ["build-gpu-check"]
#        timeout_s: 540   (leaves time for a second try inside the 15 minutes)
#      Runs each test case of the gpu-labelled binaries (*_gpu_test) and of gpu_cuda_backend_test
#      one by one (a hang costs one case, not the run), then bench_inference_gpu, then the kernel
#      tests and one end-to-end case under compute-sanitizer memcheck; writes logs and JSON under
#      $OUT and prints a short table last. Exit status 0 when no case failed.
#
# libcublas, libcublasLt and libnccl are not carried (hundreds of MB): the run looks for them on
# the device machine (CUDA's lib64, PyTorch's nvidia/* wheels; see ../shared/notes/GPU.md).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/carry.sh
pack_dir=build-gpu-check
mode=${1:-}

pack() {
  set -e
  local build_dir=${TRIPLANE_BUILD_DIR:-build}
  [[ -f $build_dir/CMakeCache.txt ]] || cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release >/dev/null
  grep -q '^TRIPLANE_HAVE_CUDA' "$build_dir/CMakeCache.txt" 2>/dev/null || true
  local targets=(gpu_kernels_gpu_test gpu_cuda_backend_gpu_test gpu_cuda_backend_test bench_inference_gpu
                 triplane-generate triplane triplane-cli rpc_bench)
  cmake --build "$build_dir" --target "${targets[@]}" -j"${TRIPLANE_JOBS:-2}"
  rm -rf "$pack_dir"
  mkdir -p "$pack_dir/bin" "$pack_dir/lib" "$pack_dir/fixtures/llama"
  cp "$build_dir/gpu/gpu_kernels_gpu_test" "$build_dir/gpu/gpu_cuda_backend_gpu_test" \
     "$build_dir/gpu/gpu_cuda_backend_test" "$build_dir/bench/bench_inference_gpu" \
     "$build_dir/gpu/triplane-generate" "$pack_dir/bin/"
  # The node with a CUDA inference worker, end to end (serve, RPC, CLI): it needs bwrap for its
  # session plane, which the device machine lacks.
  mkdir -p "$pack_dir/node"
  cp "$build_dir/apps/triplane/triplane" "$build_dir/apps/triplane-cli/triplane-cli" \
     "$build_dir/bench/rpc_bench" "$build_dir/actors/triplane-sandbox-exec" "$pack_dir/node/"
  carry_bwrap "$pack_dir/bwrap"
  carry_libs "$pack_dir/lib" "$pack_dir"/bin/* "$pack_dir"/node/*
  local fixtures
  fixtures=$(sed -n 's/^TRIPLANE_FIXTURES_DIR:PATH=//p' "$build_dir/CMakeCache.txt")
  echo "$fixtures" >"$pack_dir/fixtures-path"  # as compiled into the tests (may hold ..)
  cp -r "$fixtures"/llama/tiny-llama-* "$pack_dir/fixtures/llama/"
  echo "packed $(du -sh "$pack_dir" | cut -f1) into $pack_dir/ (fixtures expected at $(cat "$pack_dir/fixtures-path"))"
  echo "device tool: run command 'bash scripts/gpu-check.sh run', carry [\"$pack_dir\"], timeout_s 540"
}

# The first directory holding library $1 among the usual places of the device machine.
find_lib_dir() {
  local dir
  for dir in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
             /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib \
             /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/*/lib /usr/lib/x86_64-linux-gnu; do
    [[ -e $dir/$1 ]] && { echo "$dir"; return; }
  done
  find /opt /usr -name "$1" -print -quit 2>/dev/null | xargs -r dirname
}

run() {
  [[ -d $pack_dir/bin ]] || { echo "no $pack_dir/: run 'scripts/gpu-check.sh pack' here first and carry it"; exit 2; }
  local out=${OUT:-$pack_dir/out}
  mkdir -p "$out"
  local libs=$PWD/$pack_dir/lib
  for lib in libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
    local dir
    dir=$(find_lib_dir "$lib")
    if [[ -n $dir ]]; then libs=$libs:$dir; else echo "WARNING: $lib not found on this machine"; fi
  done
  export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  nvidia-smi -L 2>&1 | tee "$out/nvidia-smi.txt"
  local fixtures
  fixtures=$(cat "$pack_dir/fixtures-path")
  if [[ ! -f $fixtures/llama/tiny-llama-bf16/model.safetensors ]]; then  # never overwrite real fixtures
    mkdir -p "$fixtures/llama" && cp -r "$pack_dir"/fixtures/llama/* "$fixtures/llama/"
  fi

  local results=$out/results.tsv
  : >"$results"
  local bin name escaped log status start seconds rc
  for bin in "$pack_dir"/bin/*_test; do
    mkdir -p "$out/logs"
    "$bin" --list-test-names-only 2>&1 | sed '/^$/d' | grep -v 'test cases' >"$out/logs/names.txt" || true
    while IFS= read -r name; do
      [[ -n $name ]] || continue
      escaped=$(printf '%s' "$name" | sed 's/[][,\\*]/\\&/g')
      log="$out/logs/$(basename "$bin")-$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '_' | cut -c1-60).log"
      start=$(date +%s%N)
      timeout 60 "$bin" "$escaped" -r compact >"$log" 2>&1
      rc=$?
      seconds=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
      if [[ $rc -eq 124 ]]; then status=TIMEOUT
      elif [[ $rc -ne 0 ]]; then status=FAIL
      elif grep -q 'SKIPPED' "$log"; then status=SKIP
      elif grep -q 'No tests ran' "$log"; then status=NOTRUN
      else status=pass
      fi
      printf '%s\t%s\t%s\t%s\n' "$status" "$(basename "$bin")" "$seconds" "$name" >>"$results"
      # The measured errors the fixture tests print (WARN) go to the summary too.
      grep -h 'of the range\|of the logit range' "$log" | sed 's/^.*warning: //; s/^/    /' >>"$out/measured.txt" || true
    done <"$out/logs/names.txt"
  done

  # The generate command end to end on the bf16 fixture's 7-token prompt, beside the reference
  # greedy continuation (same tokens expected unless a step's margin is below bf16's error).
  echo "== triplane-generate --backend cuda"
  local fixture=$fixtures/llama/tiny-llama-bf16 prompt expected_tokens got
  { read -r prompt; read -r expected_tokens; } < <(python3 scripts/fixture-prompt.py "$fixture/expected.safetensors" 1)
  start=$(date +%s%N)
  timeout 60 "$pack_dir/bin/triplane-generate" --model "$fixture" --tokens "$prompt" --max-new-tokens 12 \
    --backend cuda >"$out/logs/generate.log" 2>&1
  rc=$?
  seconds=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  got=$(tail -n 1 "$out/logs/generate.log")
  if [[ $rc -eq 124 ]]; then status=TIMEOUT
  elif [[ $rc -ne 0 ]]; then status=FAIL
  elif [[ $got == "$expected_tokens" ]]; then status=pass
  else status=DIFF
  fi
  printf '%s\t%s\t%s\t%s\n' "$status" "generate" "$seconds" "got $got, reference $expected_tokens" >>"$results"

  echo "== bench_inference_gpu"
  timeout 240 "$pack_dir/bin/bench_inference_gpu" --json "$out/bench_inference_gpu.json" \
    --model-dir /tmp/triplane-llama-3.2-1b-random 2>&1 | tee "$out/bench.log"
  local bench_rc=${PIPESTATUS[0]}

  # The node serving the bf16 fixture on CUDA: `triplane serve`, then triplane-cli generate over
  # RPC (the reference greedy tokens expected), models, and a clean SIGTERM.
  if [[ -x $pack_dir/node/triplane ]]; then
    echo "== triplane serve --triplane.inference-backend=cuda"
    install_carried_bwrap "$pack_dir/bwrap"
    local data=/tmp/tp-gpu-serve node_pid endpoint token generated models
    rm -rf "$data"
    "$pack_dir/node/triplane" serve --data-dir "$data" --listen 127.0.0.1:0 --model "$fixture" \
      --triplane.inference-backend='"cuda"' >"$out/logs/serve.out" 2>"$out/logs/serve.err" &
    node_pid=$!
    for _ in $(seq 100); do grep -q 'serving on' "$out/logs/serve.out" && break; sleep 0.2; done
    endpoint=$(sed -n 's/^triplane: serving on \([^ ]*\) .*/\1/p' "$out/logs/serve.out")
    token=$(awk '$1=="default"{print $2}' "$data/client-tokens" 2>/dev/null)
    start=$(date +%s%N)
    generated=$(TRIPLANE_ENDPOINT=$endpoint TRIPLANE_TOKEN=$token timeout 60 "$pack_dir/node/triplane-cli" \
                generate --tokens "$prompt" --max-tokens 12 2>>"$out/logs/serve.cli")
    rc=$?
    models=$(TRIPLANE_ENDPOINT=$endpoint TRIPLANE_TOKEN=$token timeout 20 "$pack_dir/node/triplane-cli" models 2>&1)
    seconds=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    kill -TERM "$node_pid" 2>/dev/null
    wait "$node_pid"
    local node_rc=$?
    if [[ $rc -ne 0 || $node_rc -ne 0 ]]; then status=FAIL
    elif [[ $generated == "$expected_tokens" && $models == *backend=cuda* ]]; then status=pass
    else status=DIFF
    fi
    printf '%s\t%s\t%s\t%s\n' "$status" "serve+cli" "$seconds" \
      "generate rc $rc: $generated (reference $expected_tokens); $models; node exit $node_rc" >>"$results"
    # Tokens streamed over RPC from the CUDA worker on the 1B-shaped model the benchmark wrote.
    if [[ -f /tmp/triplane-llama-3.2-1b-random/config.json ]]; then
      timeout 200 "$pack_dir/node/rpc_bench" --quick --backend cuda --model /tmp/triplane-llama-3.2-1b-random \
        --json "$out/rpc_bench_cuda.json" >"$out/logs/rpc_bench_cuda.log" 2>&1
      rc=$?
      printf '%s\t%s\t%s\t%s\n' "$([[ $rc -eq 0 ]] && echo pass || echo FAIL)" "rpc_bench" "-" \
        "$(grep 'generated-token streaming' "$out/logs/rpc_bench_cuda.log")" >>"$results"
    fi
  fi

  # Last, as time allows: the kernels and one end-to-end case under compute-sanitizer's memcheck
  # (out-of-bounds and misaligned accesses; it works on the Firecracker machines, see KINDS.md).
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [[ -n $sanitizer ]]; then
    for bin_case in "gpu_kernels_gpu_test|" \
                    "gpu_cuda_backend_gpu_test|on CUDA KV-cached decoding matches recomputing the whole sequence"; do
      bin=${bin_case%%|*}
      name=${bin_case#*|}
      log="$out/logs/memcheck-$bin.log"
      start=$(date +%s%N)
      timeout 100 "$sanitizer" --tool memcheck --error-exitcode 3 "$pack_dir/bin/$bin" ${name:+"$name"} -r compact \
        >"$log" 2>&1
      rc=$?
      seconds=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
      case $rc in 0) status=pass ;; 124) status=TIMEOUT ;; *) status=FAIL ;; esac
      printf '%s\t%s\t%s\t%s\n' "$status" "memcheck" "$seconds" "$bin ${name:-(all cases)}" >>"$results"
    done
  else
    echo "compute-sanitizer not found: memcheck skipped"
  fi

  echo
  echo "== GPU check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
  awk -F'\t' '{printf "%-7s %6ss  %-26s %s\n", $1, $3, $2, substr($4, 1, 90)}' "$results"
  [[ -s $out/measured.txt ]] && { echo "measured errors:"; sort -u "$out/measured.txt"; }
  echo "bench (rc $bench_rc):"
  sed -n '/^device/p;/^device-to-device/p;/^phase/,$p' "$out/bench.log"
  # At most 8 files come back from the device tool: the per-case logs travel as one archive.
  tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
  local failed
  failed=$(grep -c -v -E '^(pass|SKIP)' "$results")
  echo "cases: $(grep -c '^pass' "$results") passed, $(grep -c '^SKIP' "$results") skipped, $failed failed or timed out"
  [[ $failed -eq 0 && $bench_rc -eq 0 ]]
}

case $mode in
  pack) pack ;;
  run) run ;;
  *) echo "usage: scripts/gpu-check.sh pack|run (see the comment at the top)"; exit 2 ;;
esac
