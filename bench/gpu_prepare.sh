#!/usr/bin/env bash
# Fills $GPU_DIR (default .gpu/, ignored by git) with what bench/gpu_check.sh needs on a lent GPU machine beyond
# the tracked tree, and prints what would travel against the device tool's 64 MiB. Run it HERE (it downloads),
# in the checkout that the device call sends (the session's own repository), before the call that carries it.
#
#   bash bench/gpu_prepare.sh            # make .gpu/ and check the wheels' requirements against the GPU image
#   bash bench/gpu_prepare.sh --check    # + the TINY=1 GPU check on this machine with only the GPU image's
#                                        #   packages importable (bench/gpu_env) and the carried wheels
#
# What goes in (docs/PERFORMANCE.md, "How to run the GPU check"):
#   whl/ours      diffusers 0.42.1 (the FLUX VAE, the UniPC / DPM++ solvers; not on the GPU image)
#   whl/official  transformers 4.49.0, tokenizers 0.21.4, huggingface_hub 0.36.2 (the official code's versions)
#   whl/comfy     torchsde 0.2.6, trampoline 0.1.2 (ComfyUI imports torchsde at startup)
#   official/     scripts/ shim/ tok/ of $KIT (shared/perf/gpu) and bagel/ = `git archive 056b5fd modeling data
#                 inferencer.py` of ByteDance-Seed/Bagel ($BAGEL_GIT: its git dir, e.g. the search tool's
#                 `fetch github:ByteDance-Seed/Bagel` mirror); never committed
#   ComfyUI/      $COMFY_SRC (a ComfyUI checkout, a125cd8) without tests, .git and caches (skipped if absent)
#   comfy_stub/   an import stand-in for PyAV (`av`): ComfyUI imports it at startup for its video types; its
#                 35 MB wheel does not fit the 64 MiB carry; the budget runs use no video node, and any use of
#                 the stand-in raises
#   web/          an empty frontend root (--front-end-root: the budget runs drive the server over HTTP only)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GPU_DIR=${GPU_DIR:-.gpu}
KIT=${KIT:-../shared/perf/gpu}
BAGEL_GIT=${BAGEL_GIT:-/work/.mirror/ByteDance-Seed+Bagel/repo}
BAGEL_COMMIT=056b5fd
COMFY_SRC=${COMFY_SRC:-/work/comfy/ComfyUI}
LIMIT=$((64 << 20))
CHECK=0; [ "${1:-}" = --check ] && CHECK=1

[ -f "$KIT/scripts/bench.py" ] || { echo "no official harness at KIT=$KIT (shared/perf/gpu)"; exit 2; }
git --git-dir="$BAGEL_GIT" cat-file -e "$BAGEL_COMMIT^{commit}" 2>/dev/null || {
  echo "no official BAGEL code: BAGEL_GIT=$BAGEL_GIT is not a git dir holding $BAGEL_COMMIT"
  echo "(fetch it with the search tool's fetch of github:ByteDance-Seed/Bagel, or git clone --bare it, and set BAGEL_GIT)"
  exit 2; }

T=$GPU_DIR.tmp
rm -rf "$T"; mkdir -p "$T/whl/ours" "$T/whl/official" "$T/whl/comfy" "$T/official/bagel" "$T/comfy_stub/av/subtitles" "$T/web"
gpu_wheels() {   # wheels for the GPU machine: CPython 3.12, manylinux x86-64 (the device notes' recipe)
  local dest=$1; shift
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$@" \
    2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
}
gpu_wheels "$T/whl/ours" diffusers==0.42.1
gpu_wheels "$T/whl/official" transformers==4.49.0 tokenizers==0.21.4 huggingface_hub==0.36.2
gpu_wheels "$T/whl/comfy" torchsde==0.2.6 trampoline==0.1.2

cp -r "$KIT/scripts" "$KIT/shim" "$KIT/tok" "$T/official/"
git --git-dir="$BAGEL_GIT" archive "$BAGEL_COMMIT" modeling data inferencer.py | tar -x -C "$T/official/bagel"
chmod -R u+w "$T/official"

if [ -f "$COMFY_SRC/main.py" ]; then
  mkdir -p "$T/ComfyUI"
  tar -C "$COMFY_SRC" --exclude=./tests --exclude=./tests-unit --exclude=./.git --exclude=./.github \
    --exclude=./.ci --exclude='__pycache__' --exclude='*.pyc' --exclude=./user -cf - . | tar -x -C "$T/ComfyUI"
else
  echo "no ComfyUI at COMFY_SRC=$COMFY_SRC: the budget runs (step quant_budget) will be skipped on the GPU"
fi
cat > "$T/comfy_stub/av/__init__.py" <<'EOF'
"""Import stand-in for PyAV in the GPU check's ComfyUI (bench/gpu_prepare.sh): video only, never used there."""


def __getattr__(name):
    raise AttributeError(f"av.{name}: PyAV is not installed in the GPU check (its wheel does not fit the carry)")
EOF
printf 'class InputContainer:\n    """Stand-in (bench/gpu_prepare.sh)."""\n' > "$T/comfy_stub/av/container.py"
: > "$T/comfy_stub/av/subtitles/__init__.py"
printf 'class SubtitleStream:\n    """Stand-in (bench/gpu_prepare.sh)."""\n' > "$T/comfy_stub/av/subtitles/stream.py"
echo '<!doctype html><title>hyperbagel GPU check</title>' > "$T/web/index.html"
{
  echo "made by bench/gpu_prepare.sh on $(date -u +%Y-%m-%dT%H:%MZ) from $(git rev-parse --short HEAD)"
  echo "official code: ByteDance-Seed/Bagel $BAGEL_COMMIT ($(git --git-dir="$BAGEL_GIT" rev-parse "$BAGEL_COMMIT"))"
  echo "harness: $KIT ($(sha256sum "$KIT/scripts/bench.py" | cut -c1-16))"
  [ -d "$T/ComfyUI" ] && echo "ComfyUI: $COMFY_SRC ($(grep -o '[0-9.]*' "$T/ComfyUI/comfyui_version.py" | head -1))"
  (cd "$T" && ls whl/*/*.whl)
} > "$T/MANIFEST.txt"
rm -rf "$GPU_DIR"; mv "$T" "$GPU_DIR"
grep -qx '/.gpu/' .gitignore 2>/dev/null || [ "$GPU_DIR" != .gpu ] || echo "warning: .gpu/ is not in .gitignore"

python3 bench/gpu_wheels.py "$GPU_DIR/whl" | tail -n 12

# what travels: tracked + untracked-not-ignored files, and the carried $GPU_DIR
python3 - "$GPU_DIR" "$LIMIT" <<'EOF'
import subprocess, sys
from pathlib import Path
gpu, limit = Path(sys.argv[1]), int(sys.argv[2])
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True,
                       check=True).stdout.decode().split("\0")
tree = sum(Path(f).stat().st_size for f in files if f and Path(f).is_file())
size = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
for d in ("whl/ours", "whl/official", "whl/comfy", "official", "ComfyUI", "comfy_stub"):
    if (gpu / d).exists():
        print(f"  {d:14s} {size(gpu / d) / 2**20:6.1f} MiB")
total = tree + size(gpu)
print(f"travels: tree {tree / 2**20:.1f} MiB + {gpu} {size(gpu) / 2**20:.1f} MiB = {total / 2**20:.1f} MiB of 64 MiB")
sys.exit(0 if total <= limit else f"over the device tool's 64 MiB: drop something from {gpu}")
EOF

[ "$CHECK" = 1 ] || exit 0
# ---- --check: the TINY check here with the GPU image's packages only (bench/gpu_env) ----
# Stand-ins of the GPU image's versions where this machine's differ in what they import (huggingface_hub 2.x
# needs httpx2; transformers 5.25 needs huggingface_hub 2.x), made once in $STANDINS (not carried).
STANDINS=${STANDINS:-${TMPDIR:-/tmp}/gpu_check_standins}
if [ ! -f "$STANDINS/.done" ]; then
  rm -rf "$STANDINS"; mkdir -p "$STANDINS.whl"
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$STANDINS.whl" \
    huggingface_hub==1.33.0 transformers==5.17.0 tokenizers==0.23.2 accelerate==1.15.0 "httpx<1" "httpcore<2"
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$STANDINS" "$STANDINS.whl"/*.whl
  touch "$STANDINS/.done"
fi
OUTC=${OUTC:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_sim.XXXXXX")}
: > "$OUTC.refused"
# the official harness needs torchvision and ComfyUI a full torch stack: a python that has them (ComfyUI's venv)
PYX=${COMFYUI_PYTHON:-$( [ -x /work/comfy/venv/bin/python ] && echo /work/comfy/venv/bin/python || echo python3)}
echo "TINY check with the GPU image's packages only; results in $OUTC"
GPU_ENV_SIM=1 GPU_ENV_STANDINS=$STANDINS GPU_ENV_LOG=$OUTC.refused TINY=1 OUT=$OUTC OMP_NUM_THREADS=1 \
  OFFICIAL_PYTHON=$PYX COMFYUI_PYTHON=$PYX bash bench/gpu_check.sh > "$OUTC.log" 2>&1 || true
rc=0
python3 - "$OUTC" <<'EOF' || rc=$?
import json, sys
rec = json.load(open(f"{sys.argv[1]}/gpu_check.json"))
print("statuses:", rec["meta"]["statuses"])
sys.exit(1 if any(v != "ok" for v in rec["meta"]["statuses"].values()) else 0)
EOF
echo "imports refused in the check (packages the GPU machine lacks; optional probes are expected):"
cut -d: -f2- "$OUTC.refused" | sed 's/ on the GPU machine.*//' | sort | uniq -c
exit $rc
