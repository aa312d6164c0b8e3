"""hyperbagel: ComfyUI nodes for BAGEL-7B-MoT with the Hyper-Bagel accelerations.

Light on purpose: no torch work, no downloads, no installs at import. The node modules are imported only
when ComfyUI's V3 API is present; a real import error inside them is raised, never swallowed.
"""
import importlib.util
import sys

WEB_DIRECTORY = "./web"


def _inside_comfyui() -> bool:
    if "comfy_api" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("comfy_api") is not None
    except ValueError:
        return False


if _inside_comfyui():
    from .nodes.extension import comfy_entrypoint  # noqa: F401
