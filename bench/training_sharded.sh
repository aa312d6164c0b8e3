#!/usr/bin/env bash
# Block F's sharded rows (docs/TRAINING.md): TSCD with FSDP2 (--shard full --checkpointing: layer casts just in
# time) on 2 gloo processes vs 1 process (no checkpointing),
# the bytes each rank holds, and a sharded run stopped after 17 steps and resumed sharded.
# Usage: bash bench/training_sharded.sh OUT_DIR [MODEL_DIR]  (a tiny checkpoint is made when MODEL_DIR is absent)
set -euo pipefail
OUT=${1:?usage: training_sharded.sh OUT_DIR [MODEL_DIR]}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
MODEL=${2:-$OUT/tiny}
[ -d "$MODEL" ] || python3 -c "from hyperbagel_core.testing import make_tiny_checkpoint as m; m('$MODEL', seed=0)"
F="--model $MODEL --prompts-file bench/training_prompts/train.txt --eval-prompts-file bench/training_prompts/held.txt
   --size 128 128 --threads 1 --steps 40 --eval-every 0 --pool 8 --lr 1e-3 --batch 2 --segments 6 --save-every 10"
S="--distributed --shard full --checkpointing"
python3 -m hyperbagel_core.training.tscd $F --out "$OUT/one.safetensors" --report "$OUT/one.json"
torchrun --standalone --nproc_per_node 2 -m hyperbagel_core.training.tscd $F $S \
    --out "$OUT/full.safetensors" --report "$OUT/full.json"
torchrun --standalone --nproc_per_node 2 -m hyperbagel_core.training.tscd $F $S \
    --out "$OUT/resumed.safetensors" --stop-after 17
torchrun --standalone --nproc_per_node 2 -m hyperbagel_core.training.tscd $F $S \
    --out "$OUT/resumed.safetensors" --report "$OUT/resumed.json"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
one, full, res = (json.load(open(f"{o}/{n}.json")) for n in ("one", "full", "resumed"))
rel = lambda a, b: max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
loss = lambda r: r["history"]["loss"]
print(json.dumps({"steps": len(loss(one)), "max_rel_diff_sharded_vs_1proc": rel(loss(full), loss(one)),
                  "max_rel_diff_sharded_resumed_vs_sharded": rel(loss(res), loss(full)),
                  "max_rel_diff_sharded_resumed_vs_1proc": rel(loss(res), loss(one)),
                  "bytes_1proc": one["shards"], "bytes_sharded": full["shards"]}, indent=1))
PY
