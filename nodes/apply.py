"""Apply nodes: add a draft head or a distilled expert to a loaded model (MODEL in, MODEL out, no reload)."""
from __future__ import annotations

from comfy_api.latest import io

from . import paths, runtime
from .loaders import BagelModelType


class BagelApplyDraftHead(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperBagelApplyDraftHead",
            display_name="BAGEL Apply Draft Head (Hyper-Bagel)",
            category="BAGEL/loaders",
            description="Adds a speculative-decoding draft head (models/bagel/draft_heads) to the model for the "
                        "VQA node's 'draft_head' drafter. Answers are identical with or without it (up to "
                        "rare bf16 near-ties), only faster. "
                        "The base model is shared, not reloaded; the input model is left unchanged.",
            inputs=[
                BagelModelType.Input("model", tooltip="From 'BAGEL Model Loader (Hyper-Bagel)'."),
                io.Combo.Input("draft_head", options=paths.draft_head_choices(),
                               tooltip="A draft-head file made for this checkpoint (docs/draft_head.md)."),
            ],
            outputs=[BagelModelType.Output(display_name="model", tooltip="The model with the draft head.")],
        )

    @classmethod
    def execute(cls, model, draft_head) -> io.NodeOutput:
        return io.NodeOutput(runtime.apply_draft_head(model, paths.resolve_file("bagel_draft_heads", draft_head)))


class BagelApplyDistilledExpert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperBagelApplyDistilledExpert",
            display_name="BAGEL Apply Distilled Expert (Hyper-Bagel)",
            category="BAGEL/loaders",
            description="Adds a distilled generation expert (models/bagel/distilled) to the model: the sampler and "
                        "editor then take one network pass per step (guidance scales are model inputs) on every "
                        "schedule, and schedule 'auto' uses the expert's own grid (e.g. 6 steps). Bypass this node "
                        "to run stock BAGEL. The base model is shared, not reloaded; the input model is unchanged.",
            inputs=[
                BagelModelType.Input("model", tooltip="From 'BAGEL Model Loader (Hyper-Bagel)'."),
                io.Combo.Input("distilled_expert", options=paths.distilled_choices(),
                               tooltip="A distilled-expert file made for this checkpoint (docs/distilled_expert.md), "
                                       "e.g. by this pack's trainer."),
            ],
            outputs=[BagelModelType.Output(display_name="model", tooltip="The model with the distilled expert.")],
        )

    @classmethod
    def execute(cls, model, distilled_expert) -> io.NodeOutput:
        path = paths.resolve_file("bagel_distilled", distilled_expert)
        return io.NodeOutput(runtime.apply_distilled_expert(model, path))
