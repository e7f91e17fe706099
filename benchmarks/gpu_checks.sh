#!/usr/bin/env bash
# One GPU session's checks in one command (device time is scarce: build once, run everything,
# keep one log). Usage, on a GPU host from the repository root:
#
#   bash benchmarks/gpu_checks.sh [STAGE ...]     # default: build internode multiprocess cuda
#
# Stages (each bounded by its own timeout; a failing stage does not stop the others):
#   build         pip install --no-build-isolation --no-deps -e .  (hosts without network)
#   internode     the virtual-node suite: 2 nodes x 1 and 2 nodes x 2 ranks (internode kernels)
#                 and the network-leg timeout test
#   multiprocess  the whole multi-process suite (NVSHMEM, 2 and 4 processes)
#   cuda          JAX_EP_TEST_BACKEND=cuda pytest -q tests (single process, kernels vs reference)
#   ll            the low-latency kernel profile and benchmark (benchmarks/results)
#   harness       the normal-mode kernels without JAX against the numpy model (ep_harness.py),
#                 then under compute-sanitizer memcheck, racecheck and synccheck
#   reliability   soak, stress, compute-sanitizer on the LL harness
#
# A stage's time limit can be lowered from the environment: LIMIT_<stage, - as _>=SECONDS.
# Logs go to $OUT (the device tool's folder) or ./gpu_checks: checks.log (everything, with a
# header per stage) and summary.txt (one line per stage: status and seconds).
set -u
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONUNBUFFERED=1
out="${OUT:-gpu_checks}"
mkdir -p "$out"
log="$out/checks.log"
summary="$out/summary.txt"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build internode multiprocess cuda)

run_stage() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  local override="LIMIT_${name//-/_}"  # e.g. LIMIT_internode=200 to fit one device call
  limit=${!override:-$limit}
  local start=$SECONDS
  echo "===== $name: $* (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -ne 0 ] && status="FAILED rc=$rc"
  [ $rc -eq 124 ] && status="TIMED OUT"
  echo "$name: $status ($((SECONDS - start)) s)" | tee -a "$summary" "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$log" 2>&1
for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      run_stage build 300 python3 -m pip install --no-build-isolation --no-deps -e . ;;
    internode)
      run_stage internode 900 python3 -m pytest -q -x tests/multiprocess/test_multiprocess.py \
        -k "internode or missing_rank" ;;
    multiprocess)
      run_stage multiprocess 1200 python3 -m pytest -q tests/multiprocess ;;
    cuda)
      JAX_EP_TEST_BACKEND=cuda run_stage cuda 1200 python3 -m pytest -q tests \
        --ignore=tests/multiprocess ;;
    ll)
      run_stage ll-profile 300 python3 benchmarks/profile_ll.py --out benchmarks/results
      run_stage ll-bench 600 python3 benchmarks/bench_low_latency.py --out benchmarks/results ;;
    harness)
      run_stage harness 600 python3 benchmarks/ep_harness.py --out "$out"
      run_stage harness-sanitizer 900 python3 benchmarks/ep_harness.py --sanitizer all \
        --iters 1 --out "$out" ;;
    reliability)
      run_stage soak 300 python3 benchmarks/soak.py --out "$out"
      run_stage stress 300 python3 benchmarks/stress.py --out "$out"
      run_stage sanitizer 600 bash -c 'nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
        -Ixla_ffi -lineinfo benchmarks/ll_phases.cu -o /tmp/ll_phases && for t in memcheck \
        racecheck synccheck; do compute-sanitizer --tool $t --error-exitcode 1 \
        /tmp/ll_phases --iters 2 && compute-sanitizer --tool $t --error-exitcode 1 \
        /tmp/ll_phases --ranks 4 --tokens 64 --iters 1 || exit 1; done' ;;
    *)
      echo "unknown stage $stage" | tee -a "$summary" ;;
  esac
done
cat "$summary"
