"""ComfyUI V3 nodes for hyperbagel: thin adapters over ``hyperbagel_core``.

``adapters`` is pure (no ComfyUI import); the node modules import ``comfy_api`` and are loaded by the pack's
root ``__init__`` only inside ComfyUI.
"""
