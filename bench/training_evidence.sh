#!/usr/bin/env bash
# The CPU evidence of docs/TRAINING.md: every trainer on a tiny random checkpoint, one thread each,
# one run at a time. Usage: bash bench/training_evidence.sh OUT_DIR  (block A2 alone takes about 19 minutes
# on one core)
set -euo pipefail
OUT=${1:?usage: training_evidence.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
P="--prompts-file bench/training_prompts/train.txt --eval-prompts-file bench/training_prompts/held.txt --size 128 128 --threads 1"
python3 -c "from hyperbagel_core.testing import make_tiny_checkpoint as m; m('$OUT/tiny', seed=0)"
M="--model $OUT/tiny"

# A. TSCD, text scales 1-5, evaluated at 4 (the pipeline's default): 6-NFE expert vs training-free 6-pass solvers
python3 -m hyperbagel_core.training.tscd $M $P --out "$OUT/A/six.safetensors" --steps 1500 --eval-every 500 \
    --pool 64 --lr 1e-3 --batch 4 --report "$OUT/A/report.json"
# A2. the same with 1000 training prompts (make_prompts.py), a pool of 4096 teacher trajectories, 12000 steps and
# an EMA of the masters: docs/TRAINING.md run A7, the best guided 6-NFE figure (about 19 min, the pool 9.5 of them)
python3 -m hyperbagel_core.training.tscd $M ${P/train.txt/train_1000.txt} --out "$OUT/A2/six.safetensors" \
    --steps 12000 --eval-every 2000 --pool 4096 --lr 1e-3 --batch 4 --ema 0.999 --report "$OUT/A2/report.json"
# B. the same without guidance (scale 1): the trajectory part of the task alone
python3 -m hyperbagel_core.training.tscd $M $P --out "$OUT/B/six.safetensors" --steps 1500 --eval-every 500 \
    --pool 64 --lr 1e-3 --batch 4 --scale-range 1 1 --eval-scale 1 --report "$OUT/B/report.json"
# C. DMDO on top of a short TSCD run (60 steps) and on top of run A
python3 -m hyperbagel_core.training.tscd $M $P --out "$OUT/C/six_tscd60.safetensors" --steps 60 --eval-every 60 \
    --pool 16 --lr 1e-3 --report "$OUT/C/tscd60.json"
python3 -m hyperbagel_core.training.dmdo $M $P --init "$OUT/C/six_tscd60.safetensors" --out "$OUT/C/six_dmdo.safetensors" \
    --steps 200 --eval-every 50 --lr 1e-5 --fake-lr 1e-4 --batch 2 --report "$OUT/C/dmdo.json"
python3 -m hyperbagel_core.training.dmdo $M $P --init "$OUT/A/six.safetensors" --out "$OUT/C/six_dmdo_on_A.safetensors" \
    --steps 200 --eval-every 50 --lr 1e-5 --fake-lr 1e-4 --batch 2 --report "$OUT/C/dmdo_on_A.json"
# C2. DMDO on a teacher trained as a flow model (bench/flow_teacher.py: the tiny checkpoint's generation side
# trained on synthetic two-mode latents, 8000 steps), unguided, 64²: on top of a short TSCD (30 steps), the
# paper's pairing and fresh noise, then the same recipe on the untrained checkpoint (about 20 min in all)
python3 bench/flow_teacher.py --work "$OUT/C2" --steps 8000 --noises 16
Q="--prompts-file bench/training_prompts/train_1000.txt --eval-prompts-file bench/training_prompts/held.txt \
    --size 64 64 --threads 1 --scale-range 1 1 --eval-scale 1"
DM="--steps 600 --eval-every 100 --lr 5e-6 --fake-lr 1e-3 --batch 4 --fake-warmup 100 --eval-noises 64"
for W in teacher base; do
    python3 -m hyperbagel_core.training.tscd --model "$OUT/C2/$W" $Q --eval-noises 16 \
        --out "$OUT/C2/$W-six30.safetensors" --steps 30 --eval-every 30 --pool 16 --lr 1e-3 --batch 4
done
for N in fresh pair; do
    python3 -m hyperbagel_core.training.dmdo --model "$OUT/C2/teacher" $Q $DM --noise $N \
        --init "$OUT/C2/teacher-six30.safetensors" --out "$OUT/C2/dmdo-$N.safetensors" --report "$OUT/C2/dmdo-$N.json"
done
python3 -m hyperbagel_core.training.dmdo --model "$OUT/C2/base" $Q $DM --noise fresh \
    --init "$OUT/C2/base-six30.safetensors" --out "$OUT/C2/dmdo-random.safetensors" --report "$OUT/C2/dmdo-random.json"
# D. 1-NFE (ADP, latent + pixel discriminators) from run A's 6-NFE expert vs 1- and 2-step Euler
python3 -m hyperbagel_core.training.adversarial $M $P --init "$OUT/A/six.safetensors" --out "$OUT/D/one.safetensors" \
    --steps 400 --eval-every 100 --lr 3e-4 --batch 2 --pair-weight 20 --report "$OUT/D/report.json"
# E. draft head on a target trained on stdlib docstrings
python3 bench/draft_head_stdlib.py --work "$OUT/E" --lm-seconds 100 --questions 250 --steps 500 --max-new-tokens 40
# F. 2 gloo processes vs 1 process, and a killed + resumed run, same loss curve
F="$M $P --steps 40 --eval-every 0 --pool 8 --lr 1e-3 --batch 2 --segments 6 --save-every 10"
python3 -m hyperbagel_core.training.tscd $F --out "$OUT/F/one.safetensors" --report "$OUT/F/one.json"
torchrun --standalone --nproc_per_node 2 -m hyperbagel_core.training.tscd $F --distributed \
    --out "$OUT/F/two.safetensors" --report "$OUT/F/two.json"
python3 -m hyperbagel_core.training.tscd $F --out "$OUT/F/resumed.safetensors" --stop-after 17
python3 -m hyperbagel_core.training.tscd $F --out "$OUT/F/resumed.safetensors" --report "$OUT/F/resumed.json"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
one, two, res = (json.load(open(f"{o}/F/{n}.json"))["history"]["loss"] for n in ("one", "two", "resumed"))
rel = lambda a, b: max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
print(json.dumps({"steps": len(one), "max_rel_diff_2proc_vs_1proc": rel(two, one),
                  "max_rel_diff_resumed_vs_uninterrupted": rel(res, one)}))
PY
# F, sharded: the same with FSDP2 (--shard full), its bytes per rank, a sharded run killed and resumed
bash bench/training_sharded.sh "$OUT/F/sharded" "$OUT/tiny"
# G. editing: TSCD on 24 synthetic edit pairs (make_edit_pairs.py), 4 held-out pairs x 2 noises, vs the
# training-free solvers within 6 network passes of the edit teacher (3 passes per guided step)
python3 bench/make_edit_pairs.py "$OUT/G/pairs" --train 24 --held 4
python3 -m hyperbagel_core.training.tscd $M --edit-pairs "$OUT/G/pairs/train.jsonl" \
    --eval-edit-pairs "$OUT/G/pairs/held.jsonl" --threads 1 --out "$OUT/G/six.safetensors" --steps 1500 \
    --eval-every 500 --pool 64 --lr 1e-3 --batch 4 --report "$OUT/G/report.json"
