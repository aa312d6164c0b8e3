"""The ComfyUI V3 entry point: registers the model folders and lists the nodes."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import paths
from .apply import BagelApplyDistilledExpert, BagelApplyDraftHead
from .edit import BagelCFGFreeEditor
from .generate import BagelFewStepSampler
from .loaders import BagelModelLoader, BagelVAELoader
from .understand import BagelSpeculativeVQA

NODES = [BagelModelLoader, BagelApplyDraftHead, BagelApplyDistilledExpert, BagelVAELoader, BagelSpeculativeVQA,
         BagelFewStepSampler, BagelCFGFreeEditor]


class HyperBagelExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> HyperBagelExtension:
    paths.register_folders()
    return HyperBagelExtension()
