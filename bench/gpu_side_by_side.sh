#!/usr/bin/env bash
# One GPU session of issue 9's figures, everything written under $OUT (bench/gpu_check.sh runs both sides as its
# steps side_by_side and official, within its 9-minute budget):
#   ours      bench/spec_decode.py (decode tokens/s after a 1024-token context, eager vs CUDA graph, kernels)
#             and bench/gpu_side_by_side.py (t2i_1024, edit_1024, und_980 through BagelPipeline; one 1024^2
#             pass with 1/2/3 CFG branches; image-block prefill; peak memory; attention kernel names)
#   official  the official BAGEL code at the same shapes (shared/perf/gpu/scripts/bench.py, $OFFICIAL), then
#             the side-by-side ratios
#
#   OUT=dir OFFICIAL=../shared/perf/gpu [OFFICIAL_PYTHONPATH=dir] bash bench/gpu_side_by_side.sh ours|official|all
#
# OFFICIAL must hold scripts/, shim/, tok/ and bagel/ (see its README); OFFICIAL_PYTHONPATH a folder with
# transformers 4.49.0 (+ tokenizers 0.21.x, huggingface_hub 0.36.x), put first on the official run's path.
# DECODE_ARGS / OURS_ARGS add options to the two benches; TINY=1 runs ours at tiny shapes on the CPU (smoke).
# TaylorSeer (issue 20): OURS_ARGS="--cases t2i_1024,edit_1024,und_980,t2i_1024_taylorseer,edit_1024_taylorseer"
# and ONLY=t2i_1024,edit_1024,und_980,t2i_1024_taylorseer,edit_1024_taylorseer add both sides' cached cases.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}; mkdir -p "$OUT"
WHAT=${1:-all}
if [ "${TINY:-0}" = 1 ]; then DEV="--tiny --device cpu"; DEC="--tiny --device cpu --threads 2 --tokens 32 --prompt-len 64 --repeats 1"
else DEV="${OURS_ARGS:-}"; DEC="${DECODE_ARGS:-}"; fi
rc=0
if [ "$WHAT" = ours ] || [ "$WHAT" = all ]; then
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  PYTHONUNBUFFERED=1 timeout "${DECODE_TIMEOUT:-240}" python3 bench/spec_decode.py $DEC --out "$OUT/decode.json" \
    2>&1 | tee "$OUT/decode.log" || rc=1
  PYTHONUNBUFFERED=1 timeout "${OURS_TIMEOUT:-300}" python3 bench/gpu_side_by_side.py $DEV --out "$OUT/ours.json" \
    2>&1 | tee "$OUT/ours.log" || rc=1
fi
if [ "$WHAT" = official ] || [ "$WHAT" = all ]; then
  OFFICIAL=$(cd "${OFFICIAL:?set OFFICIAL}" && pwd)
  mkdir -p "$OUT/official"
  (cd "$OFFICIAL" && PYTHONUNBUFFERED=1 PYTHONPATH="${OFFICIAL_PYTHONPATH:-}" OUT="$OUT/official" \
     ONLY=${ONLY:-t2i_1024,edit_1024,und_980} BUDGET_S=${BUDGET_S:-300} \
     timeout "${OFFICIAL_TIMEOUT:-420}" python3 scripts/bench.py > "$OUT/official.log" 2>&1) || rc=1
  tail -12 "$OUT/official.log"
  [ -f "$OUT/ours.json" ] && python3 bench/gpu_side_by_side.py --merge "$OUT/ours.json" \
    --official "$OUT/official/results.json" --out "$OUT/ours.json"
fi
exit $rc
