#!/usr/bin/env bash
# The GPU check of this wave: every GPU figure in one run of at most 9 minutes on an H100 or H200, written to
# $OUT/gpu_check.json and $OUT/gpu_check.md (one table), each step's own JSON and log beside them.
#
#   OUT=dir bash bench/gpu_check.sh              # on the GPU machine (random real-shape weights, no downloads)
#   TINY=1 OUT=dir bash bench/gpu_check.sh       # CPU smoke at tiny shapes (CI: tests/test_gpu_check.py)
#
# Each workload is ONE step line: `step NAME CAP_S SCRIPT "GPU ARGS" "TINY ARGS"` runs
#   python3 SCRIPT --out $OUT/NAME.json GPU_ARGS                         (TINY=1: --tiny --device cpu TINY_ARGS)
# under `timeout` with CAP_S seconds (CAP_<NAME>=s overrides it), cut to what is left of BUDGET_S (default 540,
# of which MERGE_S=20 stay for the merge); a step with less than MIN_S=30 s left is skipped. A missing script,
# a failure or a timeout is recorded in $OUT/NAME.status.json and the run goes on; a step should write its JSON
# as it goes, so a timeout keeps what it measured. ONLY=name,name runs a subset. The merge
# (bench/gpu_check_merge.py) reads every status and JSON: a step's `summary` rows (figure, value, target,
# verdict) go into the table, else its `checks` lines. GPU_CHECK_LIB=1 only defines the functions (tests).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUDGET_S=${BUDGET_S:-540}; MERGE_S=${MERGE_S:-20}; MIN_S=${MIN_S:-30}
START=$(date +%s)

step() {
  local name=$1 cap=$2 script=$3 gpu_args=$4 tiny_args=$5 args rc t0 t1 left status
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
  local capvar="CAP_${name^^}"; cap=${!capvar:-$cap}
  args=$gpu_args; [ "${TINY:-0}" = 1 ] && args="--tiny --device cpu $tiny_args"
  left=$(( BUDGET_S - MERGE_S - ($(date +%s) - START) ))
  if [ ! -f "$script" ]; then status=missing; rc=-1; t0=0; t1=0
  elif [ "$left" -lt "$MIN_S" ]; then status=skipped; rc=-1; t0=0; t1=0
  else
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name: python3 $script --out $OUT/$name.json $args (limit ${cap}s, ${left}s left)"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 timeout --kill-after=10 "$cap" python3 "$script" --out "$OUT/$name.json" $args \
      > "$OUT/$name.log" 2>&1
    rc=$?; t1=$(date +%s)
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    tail -4 "$OUT/$name.log"
  fi
  echo "== $name: $status"
  printf '{"name": "%s", "script": "%s", "args": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s}\n' \
    "$name" "$script" "$args" "$status" "$rc" "$((t1 - t0))" "$cap" > "$OUT/$name.status.json"
}

[ "${GPU_CHECK_LIB:-0}" = 1 ] && return 0 2>/dev/null
OUT=${OUT:?set OUT to a folder for the results}; mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

# issue 21: plain decode tok/s, % of bandwidth, kernels per token (static = CUDA graphs, compiled = + torch.compile);
# speculative with the oracle at tau 3.77 and adaptive k vs plain on the compiled path (reduced-vocabulary head)
step decode 190 bench/spec_decode.py "--paths compiled,static --repeats 1" \
  "--paths compiled --compile eager --threads 1 --tokens 16 --prompt-len 16 --repeats 1 --k 4 --taus 3.77 --draft-vocab 256"
# issue 21: one 1024² edit pass with 1/2/3 CFG branches, eager vs compiled, % of dense bf16 peak
step denoise_pass 110 bench/denoise_pass.py "--repeats 3" "--compile eager --threads 1 --repeats 1 --branches 2,3"
# issue 9/21: ours side of the side by side with the official code (its official half: see docs/PERFORMANCE.md)
step side_by_side 130 bench/gpu_side_by_side.py "--repeats 1 --only workloads --compile all" \
  "--repeats 1 --only workloads --compile all"
# issue 10: quantized modes (decode tok/s, 1024² s/image, peak memory per mode)
step quant 90 bench/quant_gpu.py "--modes default fp8_e4m3fn_fast int8 nf4 --steps 20 --tokens 64" \
  "--size 64 --steps 3 --tokens 8 --modes default int8"

python3 bench/gpu_check_merge.py "$OUT"
