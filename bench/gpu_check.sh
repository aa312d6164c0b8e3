#!/usr/bin/env bash
# The GPU check of this wave: every GPU figure it can get in one run of at most 9 minutes on an H100 or H200, in
# priority order, left in $OUT as three files: gpu_check.json (every step's status and JSON), gpu_check.md (one
# table) and gpu_check_steps.tar.gz (each step's JSON and log, the official harness's results); refreshed after
# every step, so a run cut short keeps what it measured. How to run it on a lent machine: docs/PERFORMANCE.md,
# "How to run the GPU check".
#
#   bash bench/gpu_prepare.sh                    # here, first: fills .gpu/ (wheels, official code, ComfyUI)
#   OUT=dir bash bench/gpu_check.sh              # on the GPU machine (random real-shape weights, no downloads)
#   TINY=1 OUT=dir bash bench/gpu_check.sh       # CPU smoke at tiny shapes (CI: tests/test_gpu_check.py)
#
# Each workload is ONE step line: `step NAME CAP_S SCRIPT "GPU ARGS" "TINY ARGS" [NEED_S]` runs
#   python3 SCRIPT --out $STEPS/NAME.json GPU_ARGS                       (TINY=1: --tiny --device cpu TINY_ARGS)
# under `timeout` with CAP_S seconds (CAP_<NAME>=s overrides it), cut to what is left of BUDGET_S (default 540,
# counted from the script's start, wheel installs included, of which MERGE_S=15 stay for the last merge); a
# step with less than NEED_S (default MIN_S=30) s left is skipped: it could not measure anything useful. The step sees STEP_DEADLINE (epoch seconds of its limit) to
# plan within it. A missing script, a failure, a timeout or a step that cannot run here (exit status 3, its
# reason in its JSON's "skipped") is recorded in $STEPS/NAME.status.json and the run goes on; a step should
# write its JSON as it goes, so a timeout keeps what it measured. ONLY=name,name runs a subset. The merge
# (bench/gpu_check_merge.py) reads every status and JSON: a step's `summary` rows (figure, value, target,
# verdict) go into the table, else its `checks` lines. GPU_CHECK_LIB=1 only defines the functions (tests).
#
# Python paths: the wheels that bench/gpu_prepare.sh put in $GPU_DIR (default .gpu) are installed into
# $WORK/site/{ours,official,comfy} (pip --no-index --no-deps --target); our steps run with site/ours first on
# PYTHONPATH, the official harness with site/official only (transformers 4.49.0 and its tokenizers and
# huggingface_hub), the ComfyUI server of the budget runs with site/ours + site/comfy + $GPU_DIR/comfy_stub.
# GPU_ENV_SIM=1 (bench/gpu_prepare.sh --check) puts bench/gpu_env first on every path: imports of packages the
# GPU machine lacks fail as they would there; GPU_ENV_STANDINS=dir adds this machine's stand-ins of the GPU
# machine's versions last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BUDGET_S=${BUDGET_S:-540}; MERGE_S=${MERGE_S:-15}; MIN_S=${MIN_S:-30}
START=$(date +%s)
GPU_DIR=${GPU_DIR:-.gpu}; case $GPU_DIR in /*) ;; *) GPU_DIR=$ROOT/$GPU_DIR ;; esac

step() {
  local name=$1 cap=$2 script=$3 gpu_args=$4 tiny_args=$5 need=${6:-$MIN_S} args rc=-1 t0=0 t1=0 left status note=""
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
  local capvar="CAP_${name^^}"; cap=${!capvar:-$cap}
  args=$gpu_args; [ "${TINY:-0}" = 1 ] && args="--tiny --device cpu $tiny_args"
  left=$(( BUDGET_S - MERGE_S - ($(date +%s) - START) ))
  if [ ! -f "$script" ]; then status=missing
  elif [ "$left" -lt "$need" ] && [ "${TINY:-0}" != 1 ] || [ "$left" -lt "$MIN_S" ]; then
    status=skipped; note="no time left: ${left} s of BUDGET_S=${BUDGET_S}, the step needs ${need} s"
  else
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name: python3 $script --out $STEPS/$name.json $args (limit ${cap}s, ${left}s left)"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    STEP_DEADLINE=$((t0 + cap)) PYTHONUNBUFFERED=1 timeout --kill-after=10 "$cap" \
      python3 "$script" --out "$STEPS/$name.json" $args > "$STEPS/$name.log" 2>&1
    rc=$?; t1=$(date +%s)
    case $rc in 0) status=ok ;; 3) status=skipped ;; 124|137) status=timeout ;; *) status=failed ;; esac
    tail -4 "$STEPS/$name.log"
  fi
  echo "== $name: $status $note"
  printf '{"name": "%s", "script": "%s", "args": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s, "note": "%s"}\n' \
    "$name" "$script" "${args//\"/\'}" "$status" "$rc" "$((t1 - t0))" "$cap" "$note" > "$STEPS/$name.status.json"
  python3 bench/gpu_check_merge.py "$STEPS" "$OUT" --quiet || true
}

[ "${GPU_CHECK_LIB:-0}" = 1 ] && return 0 2>/dev/null
OUT=${OUT:?set OUT to a folder for the results}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}; STEPS=$WORK/steps; SITE=$WORK/site
mkdir -p "$STEPS"

# ---- Python paths (see the header) ----
HEAD=""; TAIL="${PYTHONPATH:-}"
if [ "${GPU_ENV_SIM:-0}" = 1 ]; then HEAD="$ROOT/bench/gpu_env:"; TAIL="${GPU_ENV_STANDINS:-}${TAIL:+:$TAIL}"; fi
for g in ours official comfy; do
  if compgen -G "$GPU_DIR/whl/$g/*.whl" > /dev/null; then
    timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$SITE/$g" "$GPU_DIR"/whl/$g/*.whl > "$STEPS/setup_$g.txt" 2>&1 \
      || { echo "installing $GPU_DIR/whl/$g failed:"; tail -3 "$STEPS/setup_$g.txt"; }
  fi
done
export PYTHONPATH="${HEAD}$SITE/ours${TAIL:+:$TAIL}"
export OFFICIAL_PYTHONPATH="${HEAD}$SITE/official${GPU_ENV_STANDINS:+:$GPU_ENV_STANDINS}"
COMFY_PYTHONPATH="$PYTHONPATH:$SITE/comfy:$GPU_DIR/comfy_stub"
if [ -z "${COMFYUI_DIR:-}" ] && [ -f "$GPU_DIR/ComfyUI/main.py" ]; then export COMFYUI_DIR=$GPU_DIR/ComfyUI; fi
if [ -z "${COMFYUI_ARGS:-}" ] && [ -f "$GPU_DIR/web/index.html" ]; then export COMFYUI_ARGS="--front-end-root $GPU_DIR/web"; fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
echo "setup: $(( $(date +%s) - START )) s; steps in $STEPS; results in $OUT"

# Steps in priority order, each with its cap and the least time worth starting it with (NEED_S); expected
# seconds on an H100 (estimates: nothing of this wave was measured on a GPU yet) and what is cut: the step table
# in docs/PERFORMANCE.md, "How to run the GPU check". What does not fit is recorded as skipped ("no time left").
# 1. issue 21: plain decode tok/s, % of bandwidth, kernels per token (compiled = torch.compile + CUDA graphs,
#    static = CUDA graphs); speculative with the oracle at tau 3.77 and adaptive k vs plain (compiled path,
#    reduced-vocabulary draft head run alongside)                                          expected ~110 s
step decode 150 bench/spec_decode.py "--paths compiled,static --repeats 1 --tokens 128" \
  "--paths compiled --compile eager --threads 1 --tokens 16 --prompt-len 16 --repeats 1 --k 4 --taus 3.77 --draft-vocab 256" 90
# 2. issue 21: one 1024² edit pass with 1/2/3 CFG branches, eager vs compiled, % of dense bf16 peak   ~80 s
step denoise_pass 100 bench/denoise_pass.py "--repeats 3" "--compile eager --threads 1 --repeats 1 --branches 2,3" 60
# 3. issues 9/20/21, ours: the official harness's workloads through BagelPipeline (compile all), TaylorSeer
#    first, one timed run each after an 8-step warm-up                                      ~100 s
CASES=t2i_1024_taylorseer,edit_1024_taylorseer,edit_1024,t2i_1024,und_980
step side_by_side 130 bench/gpu_side_by_side.py \
  "--repeats 1 --only workloads --compile all --cases $CASES --warmup-steps 8 --ntok 128" \
  "--repeats 1 --only workloads --compile all --cases $CASES --warmup-steps 2" 60
# 4. issues 9/20/21, official: the same workloads in the official code (its own Python path) in groups
#    (TaylorSeer pair; edit_1024; t2i_1024 + und_980) while time is left, merged into ours   ~165 s
OFFICIAL_ARGS="--kit $GPU_DIR/official --ours $STEPS/side_by_side.json --passes $STEPS/denoise_pass.json"
step official 190 bench/gpu_official.py "$OFFICIAL_ARGS --ntok 128" \
  "$OFFICIAL_ARGS --groups t2i_1024_taylorseer,edit_1024_taylorseer;edit_1024" 90
# 5. issue 22: per weight mode at real shapes (decode tok/s, 1024² s/image, peak memory, agreement)   ~140 s
step quant 140 bench/quant_gpu.py "--modes default int8 fp8_e4m3fn_fast nf4 --tokens 64 --rows 1 4096" \
  "--modes default int8" 60
# 6. issue 23: GPU + CPU split vs one device (latents, greedy ids, s/step, tok/s)          ~70 s
step placement 90 bench/placement.py "" "" 60
# 7. issue 22: the real ComfyUI server capped at 24 / 16 / 12 GiB, shipped workflows, weight_dtype auto
#    (writes a 29 GB random checkpoint first)                                               ~40 s + ~90 s a budget
PYTHONPATH=$COMFY_PYTHONPATH step quant_budget 400 bench/quant_budget.py \
  "--budgets 24 16 12 --tokens 64 --keep-logs $STEPS/quant_budget_logs" "--budgets 24 --keep-logs $STEPS/quant_budget_logs" 150

python3 bench/gpu_check_merge.py "$STEPS" "$OUT"
echo "total: $(( $(date +%s) - START )) s of BUDGET_S=$BUDGET_S; results: $(ls "$OUT" | tr '\n' ' ')"
