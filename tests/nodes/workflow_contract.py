"""Workflow contract: check UI-format workflows against node specs and convert them to API format.

Node specs are ``/object_info`` entries (``{"input": {"required": {...}, "optional": {...}}, "input_order":
..., "output": [...]}``), from a live ComfyUI, from ``core_object_info.json`` (checked in), or built from our
node schemas under the comfy stub (``stub_object_info``). Used by tests/nodes and tests/integration.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
VIRTUAL_NODES = {"Note": ["text"], "MarkdownNote": ["text"]}  # frontend-only, never sent to the server
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKFLOW_DIR = os.path.join(REPO, "workflows")
DYNAMIC_COMBOS = {("HyperBagelModelLoader", "checkpoint"), ("HyperBagelVAELoader", "checkpoint"),
                  ("HyperBagelApplyDraftHead", "draft_head"), ("HyperBagelApplyDistilledExpert", "distilled_expert"),
                  ("HyperBagelModelLoader", "attention"), ("LoadImage", "image")}
MUTED, BYPASSED = 2, 4  # LiteGraph node modes the frontend leaves out of the prompt


@dataclass
class InputSpec:
    name: str
    type: str
    widget: bool
    optional: bool
    options: list | None
    opts: dict

    @property
    def extras(self) -> list[str]:
        """Extra widget values the frontend stores after this widget."""
        out = []
        if self.opts.get("control_after_generate"):
            out.append("control")
        if any(k.endswith("_upload") and v for k, v in self.opts.items()):
            out.append("upload")
        return out


def node_inputs(info: dict) -> list[InputSpec]:
    specs = []
    for sect in ("required", "optional"):
        entries = info.get("input", {}).get(sect, {})
        order = info.get("input_order", {}).get(sect, list(entries))
        for name in order:
            spec = entries[name]
            t, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            options = None
            if isinstance(t, list):
                t, options = "COMBO", t
            elif t == "COMBO":
                options = opts.get("options")
            widget = t in WIDGET_TYPES and not opts.get("forceInput")
            specs.append(InputSpec(name, t, widget, sect == "optional", options, opts))
    return specs


def load_workflows() -> dict[str, dict]:
    out = {}
    for f in sorted(os.listdir(WORKFLOW_DIR)):
        if f.endswith(".json"):
            with open(os.path.join(WORKFLOW_DIR, f), encoding="utf-8") as fh:
                out[f] = json.load(fh)
    return out


def core_object_info() -> dict:
    with open(os.path.join(HERE, "core_object_info.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _check_value(node_type: str, spec: InputSpec, value, check_dynamic: bool) -> str | None:
    t, o = spec.type, spec.opts
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{spec.name}: INT expected, got {value!r}"
        if ("min" in o and value < o["min"]) or ("max" in o and value > o["max"]):
            return f"{spec.name}: {value} outside [{o.get('min')}, {o.get('max')}]"
        step = o.get("step")
        if step and step > 1 and (value - o.get("min", 0)) % step and node_type.startswith("HyperBagel"):
            return f"{spec.name}: {value} not on the step grid {step}"
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{spec.name}: FLOAT expected, got {value!r}"
        if ("min" in o and value < o["min"]) or ("max" in o and value > o["max"]):
            return f"{spec.name}: {value} outside [{o.get('min')}, {o.get('max')}]"
    elif t == "STRING":
        if not isinstance(value, str):
            return f"{spec.name}: STRING expected, got {value!r}"
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{spec.name}: BOOLEAN expected, got {value!r}"
    elif t == "COMBO":
        dynamic = (node_type, spec.name) in DYNAMIC_COMBOS
        if spec.options is not None and value not in spec.options and (check_dynamic or not dynamic):
            return f"{spec.name}: {value!r} not in {spec.options}"
        if not isinstance(value, str):
            return f"{spec.name}: combo value must be a string, got {value!r}"
    return None


def check_workflow(wf: dict, specs: dict, check_dynamic: bool = False) -> list[str]:
    """Every problem found in one UI-format workflow (empty list = valid)."""
    problems = []
    if wf.get("version") != 0.4:
        problems.append(f"version must be 0.4, got {wf.get('version')!r}")
    nodes = {n["id"]: n for n in wf.get("nodes", [])}
    for n in nodes.values():
        t = n.get("type")
        where = f"node {n['id']} ({t})"
        if t in VIRTUAL_NODES:
            continue
        if t not in specs:
            problems.append(f"{where}: unknown node type")
            continue
        inputs = node_inputs(specs[t])
        by_name = {i.name: i for i in inputs}
        values = list(n.get("widgets_values", []))
        expected = sum(1 + len(i.extras) for i in inputs if i.widget)
        if len(values) != expected:
            problems.append(f"{where}: {len(values)} widget values, expected {expected}")
        else:
            pos = 0
            for i in (i for i in inputs if i.widget):
                err = _check_value(t, i, values[pos], check_dynamic)
                if err:
                    problems.append(f"{where}: {err}")
                for extra in i.extras:
                    pos += 1
                    v = values[pos]
                    if extra == "control" and v not in CONTROL_VALUES:
                        problems.append(f"{where}: {i.name} control value {v!r} not in {sorted(CONTROL_VALUES)}")
                pos += 1
        linked = set()
        for inp in n.get("inputs", []):
            spec = by_name.get(inp["name"])
            if spec is None:
                problems.append(f"{where}: input {inp['name']!r} does not exist")
                continue
            if inp.get("type") != spec.type:
                problems.append(f"{where}: input {inp['name']!r} typed {inp.get('type')!r}, node says {spec.type!r}")
            if spec.widget and "widget" not in inp:
                problems.append(f"{where}: widget input {inp['name']!r} listed as a socket without 'widget'")
            if inp.get("link") is not None:
                linked.add(inp["name"])
        for i in inputs:
            if not i.widget and not i.optional and i.name not in linked:
                problems.append(f"{where}: required input {i.name!r} is not connected")
        outs = specs[t].get("output", [])
        for slot, out in enumerate(n.get("outputs", [])):
            if slot >= len(outs) or out.get("type") != outs[slot]:
                problems.append(f"{where}: output {slot} typed {out.get('type')!r}, node says "
                                f"{outs[slot] if slot < len(outs) else 'nothing'}")
    for link in wf.get("links", []):
        lid, src, sslot, dst, dslot, ltype = link
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid}: dangling")
            continue
        s, d = nodes[src], nodes[dst]
        souts = specs.get(s["type"], {}).get("output", [])
        dins = d.get("inputs", [])
        if sslot >= len(souts) or souts[sslot] != ltype:
            problems.append(f"link {lid}: source {s['type']}[{sslot}] is not {ltype}")
        if dslot >= len(dins) or dins[dslot].get("link") != lid:
            problems.append(f"link {lid}: target {d['type']} slot {dslot} does not point back to it")
            continue
        dspec = {i.name: i for i in node_inputs(specs.get(d["type"], {}))}.get(dins[dslot]["name"])
        if dspec is not None and dspec.type != ltype:
            problems.append(f"link {lid}: {ltype} into {d['type']}.{dspec.name} ({dspec.type})")
        if lid not in (s["outputs"][sslot].get("links") or []):
            problems.append(f"link {lid}: source output does not list it")
    return problems


def _source(nodes: dict, links: dict, link_id: int):
    """``(node id, slot)`` feeding a link, followed through bypassed nodes as the frontend does: a bypassed
    node passes on its first connected input of the output's type; None when nothing is connected there."""
    _, src, sslot, _, _, ltype = links[link_id]
    node = nodes[src]
    if node.get("mode", 0) != BYPASSED:
        return str(src), sslot
    for inp in node.get("inputs", []):
        if inp.get("type") == ltype and inp.get("link") is not None:
            return _source(nodes, links, inp["link"])
    return None


def ui_to_api(wf: dict, specs: dict) -> dict:
    """Convert a UI-format workflow to the API ``prompt`` format using the node specs' widget order."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf.get("links", [])}
    prompt = {}
    for n in nodes.values():
        if n["type"] in VIRTUAL_NODES or n.get("mode", 0) in (MUTED, BYPASSED):
            continue
        inputs = {}
        values = list(n.get("widgets_values", []))
        pos = 0
        for i in node_inputs(specs[n["type"]]):
            if not i.widget:
                continue
            inputs[i.name] = values[pos]
            pos += 1 + len(i.extras)
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                src = _source(nodes, links, inp["link"])
                if src is not None:
                    inputs[inp["name"]] = [src[0], src[1]]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", n["type"])}}
    return prompt


def stub_object_info(node_classes) -> dict:
    """``/object_info``-shaped entries for our nodes built under ``comfy_stub`` (no ComfyUI needed)."""
    out = {}
    for cls in node_classes:
        s = cls.define_schema()
        info = {"input": {"required": {}}, "input_order": {"required": []}, "output": [o.io_type for o in s.outputs],
                "output_name": [o.display_name for o in s.outputs], "name": s.node_id, "display_name": s.display_name,
                "category": s.category, "output_node": s.is_output_node}
        for i in s.inputs:
            sect = "optional" if i.optional else "required"
            opts = {k: v for k, v in i.extra.items() if v is not None}
            if "force_input" in opts:
                opts["forceInput"] = opts.pop("force_input")
            info["input"].setdefault(sect, {})[i.id] = [i.io_type, opts]
            info["input_order"].setdefault(sect, []).append(i.id)
        out[s.node_id] = info
    return out
