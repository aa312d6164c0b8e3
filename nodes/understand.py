"""BAGEL Speculative VQA: optional IMAGE + question -> answer STRING, shown on the node with decoding stats."""
from __future__ import annotations

import time

from comfy_api.latest import io

from . import adapters as A
from . import runtime
from .loaders import BagelModelType

DRAFTERS = ["prompt_lookup", "draft_head", "none"]
BATCH_MODES = ["one answer per image", "all images in one question"]
STAT_KEYS = ("drafter", "new_tokens", "rounds", "tau", "acceptance_rate", "tokens_per_s", "seconds")


class BagelSpeculativeVQA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperBagelSpeculativeVQA",
            display_name="BAGEL Speculative VQA (Hyper-Bagel)",
            category="BAGEL/understanding",
            description="Answers a question about an image (or plain text) with speculative decoding: a drafter "
                        "proposes k tokens, BAGEL verifies them in one pass. Greedy answers are identical to plain "
                        "decoding (BAGEL decides every token; in bf16 a near-tie of the top two tokens can rarely "
                        "swap), only faster. The answer and decoding stats are shown on the node.",
            inputs=[
                BagelModelType.Input("model", tooltip="From 'BAGEL Model Loader (Hyper-Bagel)' or an apply node."),
                io.String.Input("question", multiline=True, default="Describe this image in detail.",
                                tooltip="The question or instruction."),
                io.Combo.Input("drafter", options=DRAFTERS, default="prompt_lookup",
                               tooltip="prompt_lookup: copies n-grams from the prompt/answer, no extra weights. "
                                       "draft_head: the Hyper-Bagel draft head added by 'BAGEL Apply Draft Head'. "
                                       "none: plain token-by-token decoding."),
                io.Int.Input("k", default=0, min=0, max=16,
                             tooltip="Longest draft chain per round; 0 = the default 10. Either way the length adapts each "
                                     "round to the measured acceptance rate. Ignored by drafter 'none'."),
                io.Int.Input("max_new_tokens", default=512, min=1, max=8192,
                             tooltip="Upper bound on the answer length in tokens."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0 = greedy (deterministic). Above 0 samples with speculative sampling, "
                                       "which keeps the model's distribution exactly."),
                io.Int.Input("seed", default=0, min=0, max=A.MAX_SEED, control_after_generate=False,
                             tooltip="Sampling seed, used only when temperature > 0 (image i of a batch uses seed + i). "
                                     "Fixed by default, so a greedy answer is cached and not re-run every queue."),
                io.Boolean.Input("think", default=False,
                                 tooltip="Let BAGEL reason in <think>...</think> before answering; the reasoning is "
                                         "part of the answer text."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional image(s). Without one, BAGEL answers as a text model."),
                io.Combo.Input("batch_mode", options=BATCH_MODES, default=BATCH_MODES[0], optional=True,
                               tooltip="With several images: ask once per image (answers joined with "
                                       "[image i] headers) or ask one question about all of them together."),
            ],
            outputs=[io.String.Output(display_name="answer", tooltip="The answer text."),
                     io.String.Output(display_name="stats", tooltip="Decoding statistics as one line of text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, question, drafter, k, max_new_tokens, temperature, seed, think,
                image=None, batch_mode=BATCH_MODES[0]) -> io.NodeOutput:
        bagel = runtime.check_model(model)
        A.check_text(question, "question")
        if drafter not in DRAFTERS:
            raise A.NodeInputError(f"unknown drafter {drafter!r}; choose one of {', '.join(DRAFTERS)}.")
        if drafter == "draft_head" and not bagel.draft_head:
            raise A.NodeInputError("drafter 'draft_head' needs a draft head: put 'BAGEL Apply Draft Head' between the "
                                   "loader and this node (files in models/bagel/draft_heads), or use 'prompt_lookup'.")
        pils = A.image_to_pils(image) if image is not None else []
        groups = [[p] for p in pils] if batch_mode == BATCH_MODES[0] and pils else [pils]
        seeds = A.batch_seeds(seed, len(groups))
        progress = runtime.make_progress(len(groups), max_new_tokens)
        width, height = max((p.size for p in pils), key=lambda s: s[0] * s[1], default=(1024, 1024))
        pipe = bagel.prepare("answer", height=height, width=width, num_images=max(len(g) for g in groups),
                             max_new_tokens=max_new_tokens, think=think)
        answers, stats = [], []
        try:
            for i, group in enumerate(groups):
                progress.start_item(i)
                t0 = time.perf_counter()
                img = None if not group else group[0] if len(group) == 1 else group
                res = runtime.call_core(
                    pipe.answer, image=img, question=question,
                    max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 0.3,
                    seed=seeds[i], think=think, drafter=drafter, num_draft_tokens=k or None,
                    callback=progress.callback)
                answers.append(res.text)
                s = dict(getattr(res, "stats", None) or {})
                s.setdefault("drafter", drafter)
                s.setdefault("new_tokens", len(getattr(res, "token_ids", []) or []))
                s.setdefault("seconds", time.perf_counter() - t0)
                stats.append(s)
        finally:
            bagel.release()
        answer = A.join_answers(answers)
        merged = A.merge_stats(stats)
        line = A.format_stats(merged, STAT_KEYS)
        ui = {"text": [answer], "bagel_stats": [dict(A.jsonable_stats(merged), kind="vqa", summary=line)]}
        return io.NodeOutput(answer, line, ui=ui)
