"""Node tests run without ComfyUI: the repo root goes on sys.path and ``comfy_stub`` stands in for ComfyUI."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)
