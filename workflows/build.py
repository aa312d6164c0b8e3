"""Regenerate the shipped UI-format (version 0.4) workflows: ``python workflows/build.py``.

Widget values are written by name here and laid out in the node definitions' order; the contract test
(tests/nodes/test_workflows.py) checks the result against the nodes' schemas and core's node specs.
"""
from __future__ import annotations

import json
import os
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))

# widget order of each node type as ComfyUI's frontend serialises it (control_after_generate / upload extras)
GUIDANCE = ["cfg_interval_start", "cfg_interval_end", "cfg_renorm_type", "cfg_renorm_min"]
CACHE = ["cache", "cache_warmup", "cache_interval", "cache_order"]
WIDGETS = {
    "HyperBagelModelLoader": ["checkpoint", "dtype", "attention", "memory", "weight_dtype", "compile", "max_memory"],
    "HyperBagelApplyDraftHead": ["draft_head"],
    "HyperBagelApplyDistilledExpert": ["distilled_expert"],
    "HyperBagelVAELoader": ["checkpoint"],
    "HyperBagelSpeculativeVQA": ["question", "drafter", "k", "max_new_tokens", "temperature", "seed", "think",
                                 "batch_mode"],
    "HyperBagelFewStepSampler": ["prompt", "width", "height", "schedule", "steps", "solver", "custom_timesteps",
                                 "shift", "text_guidance", *GUIDANCE, "seed", "+control", "batch_size", "think", *CACHE],
    "HyperBagelCFGFreeEditor": ["instruction", "schedule", "steps", "solver", "custom_timesteps", "shift",
                                "text_guidance", "image_guidance", *GUIDANCE, "seed", "+control", "original_size",
                                "think", *CACHE],
    "LoadImage": ["image", "+upload"],
    "SaveImage": ["filename_prefix"],
    "ImageScale": ["upscale_method", "width", "height", "crop"],
    "MarkdownNote": ["text"],
}
MODEL = "HYPERBAGEL_MODEL"
SOCKETS_IN = {
    "HyperBagelApplyDraftHead": [("model", MODEL)],
    "HyperBagelApplyDistilledExpert": [("model", MODEL)],
    "HyperBagelSpeculativeVQA": [("model", MODEL), ("image", "IMAGE")],
    "HyperBagelFewStepSampler": [("model", MODEL)],
    "HyperBagelCFGFreeEditor": [("model", MODEL), ("image", "IMAGE")],
    "SaveImage": [("images", "IMAGE")],
    "ImageScale": [("image", "IMAGE")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
}
SOCKETS_OUT = {
    "HyperBagelModelLoader": [("model", MODEL)],
    "HyperBagelApplyDraftHead": [("model", MODEL)],
    "HyperBagelApplyDistilledExpert": [("model", MODEL)],
    "HyperBagelVAELoader": [("vae", "VAE")],
    "HyperBagelSpeculativeVQA": [("answer", "STRING"), ("stats", "STRING")],
    "HyperBagelFewStepSampler": [("image", "IMAGE"), ("latent", "LATENT"), ("thinking", "STRING")],
    "HyperBagelCFGFreeEditor": [("image", "IMAGE"), ("latent", "LATENT"), ("thinking", "STRING")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "ImageScale": [("IMAGE", "IMAGE")],
    "VAEDecode": [("IMAGE", "IMAGE")],
}
TYPES = {"prompt": "STRING", "instruction": "STRING"}
PACK = {"cnr_id": "hyperbagel", "ver": "0.1.0"}
BYPASSED = 4  # LiteGraph node mode: bypass (inputs pass through to outputs of the same type)

NO_EXPERT = "(put a distilled expert in models/bagel/distilled)"
NO_HEAD = "(put a draft head in models/bagel/draft_heads)"
LOADER = dict(checkpoint="BAGEL-7B-MoT", dtype="auto", attention="sdpa", memory="auto", weight_dtype="default",
              compile="none", max_memory="")
GUIDE_T2I = dict(cfg_interval_start=0.4, cfg_interval_end=1.0, cfg_renorm_type="global", cfg_renorm_min=0.0)
GUIDE_EDIT = dict(cfg_interval_start=0.0, cfg_interval_end=1.0, cfg_renorm_type="text_channel", cfg_renorm_min=0.0)
NO_CACHE = dict(cache="off", cache_warmup=5, cache_interval=3, cache_order=6)
SAMPLER = dict(prompt="A photo of a red fox in fresh snow, golden hour, shallow depth of field.", width=1024,
               height=1024, schedule="auto", steps=8, solver="unipc", custom_timesteps="1.0, 0.75, 0.5, 0.25",
               shift=3.0, text_guidance=4.0, **GUIDE_T2I, seed=42, batch_size=1, think=False, **NO_CACHE)
EDITOR = dict(instruction="Turn it into a watercolor painting.", schedule="auto", steps=8, solver="unipc",
              custom_timesteps="1.0, 0.75, 0.5, 0.25", shift=3.0, text_guidance=4.0, image_guidance=2.0,
              **GUIDE_EDIT, seed=42, original_size=True, think=False, **NO_CACHE)
VQA = dict(question="Describe this image in detail.", drafter="prompt_lookup", k=0, max_new_tokens=512,
           temperature=0.0, seed=0, think=False, batch_mode="one answer per image")

class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, pos, values, size=(340, 260), title=None, converted=(), mode=0):
        nid = len(self.nodes) + 1
        widgets = []
        for name in WIDGETS.get(type_, []):
            if name == "+control":
                widgets.append("fixed")
            elif name == "+upload":
                widgets.append("image")
            else:
                widgets.append(values[name])
        node = {
            "id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1, "mode": mode,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in SOCKETS_IN.get(type_, [])],
            "outputs": [{"name": n, "type": t, "links": []} for n, t in SOCKETS_OUT.get(type_, [])],
            "properties": {"Node name for S&R": type_, **(PACK if type_.startswith("HyperBagel") else {})},
            "widgets_values": widgets,
        }
        for name in converted:  # a widget turned into an input socket (its value slot stays in widgets_values)
            node["inputs"].append({"name": name, "type": TYPES[name], "widget": {"name": name}, "link": None})
        if title:
            node["title"] = title
        self.nodes.append(node)
        return nid

    def link(self, src, src_slot, dst, dst_name):
        lid = len(self.links) + 1
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, inp in enumerate(d["inputs"]) if inp["name"] == dst_name)
        type_ = s["outputs"][src_slot]["type"]
        s["outputs"][src_slot]["links"].append(lid)
        d["inputs"][slot]["link"] = lid
        self.links.append([lid, src, src_slot, dst, slot, type_])

    def dump(self, name):
        wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"hyperbagel/{name}")), "revision": 0, "last_node_id": len(self.nodes),
              "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links, "groups": [],
              "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}
        with open(os.path.join(HERE, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(wf, f, indent=1)
            f.write("\n")


FILES = ("**Files:** only the stock `BAGEL-7B-MoT` folder in `ComfyUI/models/bagel/` (`huggingface-cli download "
         "ByteDance-Seed/BAGEL-7B-MoT --local-dir ComfyUI/models/bagel/BAGEL-7B-MoT`, 29 GB).")
MEMORY = ("**Memory:** the loader builds the model in CPU RAM first: 27.6 GiB of weights, so have about 32 GB of RAM "
          "(or a large page file). Whole runs measured on one GPU (docs/PERFORMANCE.md): weights + 5.0 GiB for a "
          "1024² image, + 6.7 GiB for a 1024² edit, + 1.4 GiB for an answer. With less VRAM ComfyUI loads what "
          "fits and streams the rest (slower); see the low-memory workflow.")
EXPERT_SWITCH = ("**Few-step (Hyper-Bagel):** select the bypassed *Apply Distilled Expert* node and press Ctrl+B, then "
                 "pick your expert file (`models/bagel/distilled/`, made with this pack's trainer, `docs/distilled_expert.md`; "
                 "no official file was published). Schedule `auto` then runs the expert's own grid (e.g. 6 passes, no "
                 "CFG). Bypassed, `auto` runs 8 training-free UniPC steps on stock BAGEL.")


def note(title, *parts):
    return {"text": "\n\n".join([f"## {title}", *parts])}


def loader_with_expert(g, x=40, y=80):
    """Loader -> Apply Distilled Expert (bypassed: stock BAGEL as shipped); returns the expert node's id."""
    m = g.add("HyperBagelModelLoader", (x, y), LOADER, size=(340, 160))
    d = g.add("HyperBagelApplyDistilledExpert", (x, y + 220), {"distilled_expert": NO_EXPERT}, size=(340, 80),
              mode=BYPASSED)
    g.link(m, 0, d, "model")
    return d


def text_to_image():
    g = Graph()
    g.add("MarkdownNote", (40, 440), note("BAGEL text to image", FILES, EXPERT_SWITCH, MEMORY), size=(340, 420))
    d = loader_with_expert(g)
    s = g.add("HyperBagelFewStepSampler", (420, 80), SAMPLER, size=(380, 790))
    out = g.add("SaveImage", (840, 80), {"filename_prefix": "hyperbagel/t2i"}, size=(520, 560))
    g.link(d, 0, s, "model")
    g.link(s, 0, out, "images")
    g.dump("hyperbagel_text_to_image")


def edit():
    g = Graph()
    g.add("MarkdownNote", (40, 820), note("BAGEL image editing", FILES + " Load your image in *Load Image*.",
                                          EXPERT_SWITCH, MEMORY), size=(340, 420))
    d = loader_with_expert(g)
    img = g.add("LoadImage", (40, 440), {"image": "example.png"}, size=(340, 320))
    e = g.add("HyperBagelCFGFreeEditor", (420, 80), EDITOR, size=(380, 790))
    out = g.add("SaveImage", (840, 80), {"filename_prefix": "hyperbagel/edit"}, size=(520, 560))
    g.link(d, 0, e, "model")
    g.link(img, 0, e, "image")
    g.link(e, 0, out, "images")
    g.dump("hyperbagel_edit")


def speculative_vqa():
    g = Graph()
    g.add("MarkdownNote", (40, 800), note(
        "BAGEL image question answering", FILES + " Load your image in *Load Image*.",
        "**Speculative decoding:** `prompt_lookup` needs no extra file. For `draft_head`, un-bypass *Apply Draft "
        "Head* (Ctrl+B) and pick a head from `models/bagel/draft_heads/` (made with this pack's trainer, "
        "`docs/draft_head.md`). Greedy answers are identical with every drafter (up to rare "
        "bf16 near-ties of the top two tokens).", MEMORY),
        size=(340, 420))
    m = g.add("HyperBagelModelLoader", (40, 80), LOADER, size=(340, 160))
    h = g.add("HyperBagelApplyDraftHead", (40, 300), {"draft_head": NO_HEAD}, size=(340, 80), mode=BYPASSED)
    img = g.add("LoadImage", (40, 440), {"image": "example.png"}, size=(340, 300))
    q = g.add("HyperBagelSpeculativeVQA", (420, 80), VQA, size=(440, 620))
    g.link(m, 0, h, "model")
    g.link(h, 0, q, "model")
    g.link(img, 0, q, "image")
    g.dump("hyperbagel_speculative_vqa")


def chain_vqa_to_image():
    g = Graph()
    g.add("MarkdownNote", (40, 680), note(
        "Describe an image, then draw it anew", FILES + " Load your image in *Load Image*.",
        "The answer of the VQA node is the sampler's prompt (its `prompt` widget is an input here).", MEMORY),
        size=(340, 420))
    m = g.add("HyperBagelModelLoader", (40, 80), LOADER, size=(340, 160))
    img = g.add("LoadImage", (40, 320), {"image": "example.png"}, size=(340, 320))
    q = g.add("HyperBagelSpeculativeVQA", (420, 80), dict(
        VQA, question="Write a one-sentence prompt for an image generator that recreates this picture as an oil "
                      "painting. Reply with the prompt only.", max_new_tokens=96), size=(400, 560))
    s = g.add("HyperBagelFewStepSampler", (860, 80), dict(SAMPLER, prompt=""), size=(380, 790),
              converted=("prompt",))
    sc = g.add("ImageScale", (1280, 80), {"upscale_method": "lanczos", "width": 1536, "height": 1536,
                                            "crop": "disabled"}, size=(300, 160))
    out = g.add("SaveImage", (1620, 80), {"filename_prefix": "hyperbagel/chain"}, size=(520, 560))
    g.link(m, 0, q, "model")
    g.link(img, 0, q, "image")
    g.link(m, 0, s, "model")
    g.link(q, 0, s, "prompt")
    g.link(s, 0, sc, "image")
    g.link(sc, 0, out, "images")
    g.dump("hyperbagel_chain_vqa_to_image")


def describe_then_edit():
    g = Graph()
    g.add("MarkdownNote", (40, 680), note(
        "Describe, then edit", FILES + " Load your image in *Load Image*.",
        "BAGEL looks at the image and writes the edit instruction (shown on the VQA node); the editor applies it "
        "to the same image. Change the question to steer the edit, or type an instruction yourself by "
        "disconnecting the editor's `instruction` input.", MEMORY), size=(340, 420))
    m = g.add("HyperBagelModelLoader", (40, 80), LOADER, size=(340, 160))
    img = g.add("LoadImage", (40, 320), {"image": "example.png"}, size=(340, 320))
    q = g.add("HyperBagelSpeculativeVQA", (420, 80), dict(
        VQA, question="Look at this image and write one short instruction for an image editor that turns it into a "
                      "winter scene while keeping its composition. Reply with the instruction only.",
        max_new_tokens=64), size=(400, 560))
    e = g.add("HyperBagelCFGFreeEditor", (860, 80), dict(EDITOR, instruction=""), size=(380, 790),
              converted=("instruction",))
    out = g.add("SaveImage", (1280, 80), {"filename_prefix": "hyperbagel/describe_edit"}, size=(520, 560))
    g.link(m, 0, q, "model")
    g.link(img, 0, q, "image")
    g.link(m, 0, e, "model")
    g.link(img, 0, e, "image")
    g.link(q, 0, e, "instruction")
    g.link(e, 0, out, "images")
    g.dump("hyperbagel_describe_then_edit")


def low_memory():
    g = Graph()
    g.add("MarkdownNote", (40, 300), note(
        "BAGEL with little VRAM", FILES,
        "**What makes it lighter:** memory `offload_after_run` moves the weights back to CPU RAM after each run "
        "(VRAM is free for other models between runs); while running, ComfyUI loads what fits and streams the rest "
        "(slow on small GPUs: every step reads the streamed weights over PCIe). 768² needs less working memory than "
        "1024² (the estimate grows with the pixel count). **weight_dtype `auto`** stores the linear layers in fp8/int8 "
        "(about 16 GB) or nf4 (about 8.7 GB) when bf16 does not fit the free VRAM, quantized while loading; the log "
        "and the node badge say what it picked and why (docs/quantization.md). RAM: the weights stay in CPU RAM in "
        "the mode picked (27.6 GiB in bf16, so have about 32 GB; less when quantized).", EXPERT_SWITCH.replace("bypassed *Apply Distilled Expert* node", "loader, add "
                                                           "*BAGEL Apply Distilled Expert* after it")),
        size=(340, 460))
    m = g.add("HyperBagelModelLoader", (40, 80), dict(LOADER, memory="offload_after_run", weight_dtype="auto"), size=(340, 160))
    s = g.add("HyperBagelFewStepSampler", (420, 80), dict(SAMPLER, width=768, height=768), size=(380, 790))
    out = g.add("SaveImage", (840, 80), {"filename_prefix": "hyperbagel/low_memory"}, size=(520, 560))
    g.link(m, 0, s, "model")
    g.link(s, 0, out, "images")
    g.dump("hyperbagel_low_memory")


def decode_latent_core_vae():
    g = Graph()
    g.add("MarkdownNote", (40, 520), note(
        "Decode BAGEL's LATENT with core nodes", FILES,
        "The sampler's `latent` output is a raw FLUX-autoencoder latent, the convention of core *VAE Decode*. "
        "*BAGEL VAE Loader* gives core nodes the FLUX autoencoder inside the BAGEL folder (`ae.safetensors`): "
        "core *Load VAE* only lists `models/vae`. Both images below come out the same up to VAE dtype rounding; "
        "use the latent with any core latent node (upscale, composite) before decoding.", MEMORY),
        size=(340, 460))
    m = g.add("HyperBagelModelLoader", (40, 80), LOADER, size=(340, 160))
    v = g.add("HyperBagelVAELoader", (40, 320), {"checkpoint": "BAGEL-7B-MoT"}, size=(340, 90))
    s = g.add("HyperBagelFewStepSampler", (420, 80), SAMPLER, size=(380, 790))
    dec = g.add("VAEDecode", (840, 80), {}, size=(220, 60))
    out = g.add("SaveImage", (1100, 80), {"filename_prefix": "hyperbagel/core_vae_decode"}, size=(480, 520))
    ref = g.add("SaveImage", (1100, 640), {"filename_prefix": "hyperbagel/bagel_decode"}, size=(480, 520))
    g.link(m, 0, s, "model")
    g.link(s, 1, dec, "samples")
    g.link(v, 0, dec, "vae")
    g.link(dec, 0, out, "images")
    g.link(s, 0, ref, "images")
    g.dump("hyperbagel_decode_latent_core_vae")


BUILDERS = [text_to_image, edit, speculative_vqa, chain_vqa_to_image, describe_then_edit, low_memory,
            decode_latent_core_vae]


if __name__ == "__main__":
    for build in BUILDERS:
        build()
