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
WIDGETS = {
    "HyperBagelModelLoader": ["checkpoint", "dtype", "attention", "draft_head", "distilled_expert", "memory",
                              "weight_dtype"],
    "HyperBagelSpeculativeVQA": ["question", "drafter", "k", "max_new_tokens", "temperature", "seed", "+control",
                                 "think", "batch_mode"],
    "HyperBagelFewStepSampler": ["prompt", "width", "height", "schedule", "steps", "solver", "custom_timesteps",
                                 "shift", "text_guidance", "cfg_interval_start", "seed", "+control", "batch_size",
                                 "think"],
    "HyperBagelCFGFreeEditor": ["instruction", "schedule", "steps", "solver", "custom_timesteps", "shift",
                                "text_guidance", "image_guidance", "seed", "+control", "original_size", "think"],
    "LoadImage": ["image", "+upload"],
    "SaveImage": ["filename_prefix"],
    "ImageScale": ["upscale_method", "width", "height", "crop"],
    "MarkdownNote": ["text"],
}
SOCKETS_IN = {
    "HyperBagelSpeculativeVQA": [("model", "BAGEL_MODEL"), ("image", "IMAGE")],
    "HyperBagelFewStepSampler": [("model", "BAGEL_MODEL")],
    "HyperBagelCFGFreeEditor": [("model", "BAGEL_MODEL"), ("image", "IMAGE")],
    "SaveImage": [("images", "IMAGE")],
    "ImageScale": [("image", "IMAGE")],
}
SOCKETS_OUT = {
    "HyperBagelModelLoader": [("model", "BAGEL_MODEL")],
    "HyperBagelSpeculativeVQA": [("answer", "STRING"), ("stats", "STRING")],
    "HyperBagelFewStepSampler": [("image", "IMAGE"), ("latent", "LATENT"), ("thinking", "STRING")],
    "HyperBagelCFGFreeEditor": [("image", "IMAGE"), ("latent", "LATENT")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "ImageScale": [("IMAGE", "IMAGE")],
}
TYPES = {"prompt": "STRING"}
PACK = {"cnr_id": "hyperbagel", "ver": "0.1.0"}

LOADER = dict(checkpoint="BAGEL-7B-MoT", dtype="auto", attention="sdpa", draft_head="none",
              distilled_expert="none", memory="auto", weight_dtype="default")
SAMPLER = dict(prompt="A photo of a red fox in fresh snow, golden hour, shallow depth of field.", width=1024,
               height=1024, schedule="hyper-6nfe", steps=8, solver="unipc", custom_timesteps="1.0, 0.75, 0.5, 0.25",
               shift=3.0, text_guidance=4.0, cfg_interval_start=0.4, seed=42, batch_size=1, think=False)
EDITOR = dict(instruction="Turn it into a watercolor painting.", schedule="hyper-6nfe", steps=8, solver="unipc",
              custom_timesteps="1.0, 0.75, 0.5, 0.25", shift=3.0, text_guidance=4.0, image_guidance=2.0, seed=42,
              original_size=True, think=False)
VQA = dict(question="Describe this image in detail.", drafter="prompt_lookup", k=0, max_new_tokens=512,
           temperature=0.0, seed=0, think=False, batch_mode="one answer per image")


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, pos, values, size=(340, 260), title=None, converted=()):
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
            "id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1, "mode": 0,
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


NOTE_DISTILLED = ("**Hyper-Bagel few-step**\n\nPut the BAGEL-7B-MoT folder in `models/bagel/` and a distilled "
                  "expert (`.safetensors`) in `models/bagel/distilled/`, then pick it in the loader. Without one, "
                  "choose schedule `training-free` (stock BAGEL, ~8 steps).")


def text_to_image_6nfe():
    g = Graph()
    g.add("MarkdownNote", (40, 420), {"text": NOTE_DISTILLED}, size=(340, 180))
    m = g.add("HyperBagelModelLoader", (40, 80), dict(LOADER, distilled_expert="hyper-bagel-6nfe.safetensors"),
              size=(340, 200))
    s = g.add("HyperBagelFewStepSampler", (420, 80), SAMPLER, size=(360, 520))
    out = g.add("SaveImage", (820, 80), {"filename_prefix": "hyperbagel/t2i_6nfe"}, size=(520, 560))
    g.link(m, 0, s, "model")
    g.link(s, 0, out, "images")
    g.dump("hyperbagel_text_to_image_6nfe")


def edit_cfg_free():
    g = Graph()
    g.add("MarkdownNote", (40, 420), {"text": NOTE_DISTILLED}, size=(340, 180))
    m = g.add("HyperBagelModelLoader", (40, 80), dict(LOADER, distilled_expert="hyper-bagel-6nfe.safetensors"),
              size=(340, 200))
    img = g.add("LoadImage", (40, 640), {"image": "example.png"}, size=(340, 320))
    e = g.add("HyperBagelCFGFreeEditor", (420, 80), EDITOR, size=(360, 480))
    out = g.add("SaveImage", (820, 80), {"filename_prefix": "hyperbagel/edit"}, size=(520, 560))
    g.link(m, 0, e, "model")
    g.link(img, 0, e, "image")
    g.link(e, 0, out, "images")
    g.dump("hyperbagel_edit_cfg_free")


def speculative_vqa():
    g = Graph()
    m = g.add("HyperBagelModelLoader", (40, 80), LOADER, size=(340, 200))
    img = g.add("LoadImage", (40, 320), {"image": "example.png"}, size=(340, 320))
    q = g.add("HyperBagelSpeculativeVQA", (420, 80), VQA, size=(420, 560))
    g.link(m, 0, q, "model")
    g.link(img, 0, q, "image")
    g.dump("hyperbagel_speculative_vqa")


def chain_vqa_to_image():
    g = Graph()
    m = g.add("HyperBagelModelLoader", (40, 80), LOADER, size=(340, 200))
    img = g.add("LoadImage", (40, 320), {"image": "example.png"}, size=(340, 320))
    q = g.add("HyperBagelSpeculativeVQA", (420, 80), dict(
        VQA, question="Write a one-sentence prompt for an image generator that recreates this picture as an oil "
                      "painting. Reply with the prompt only.", max_new_tokens=96), size=(400, 560))
    s = g.add("HyperBagelFewStepSampler", (860, 80), dict(SAMPLER, schedule="training-free", prompt=""),
              size=(360, 520), converted=("prompt",))
    sc = g.add("ImageScale", (1260, 80), {"upscale_method": "lanczos", "width": 1536, "height": 1536,
                                            "crop": "disabled"}, size=(300, 160))
    out = g.add("SaveImage", (1600, 80), {"filename_prefix": "hyperbagel/chain"}, size=(520, 560))
    g.link(m, 0, q, "model")
    g.link(img, 0, q, "image")
    g.link(m, 0, s, "model")
    g.link(q, 0, s, "prompt")
    g.link(s, 0, sc, "image")
    g.link(sc, 0, out, "images")
    g.dump("hyperbagel_chain_vqa_to_image")


if __name__ == "__main__":
    text_to_image_6nfe()
    edit_cfg_free()
    speculative_vqa()
    chain_vqa_to_image()
