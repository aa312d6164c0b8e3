"""Contract: every shipped workflow uses only existing node types (ours or core), its widget values match the
nodes' inputs in order and type, and its links connect matching types. Core specs come from the ComfyUI
checkout in $COMFYUI_DIR when it is set (its nodes.py must define them), else from core_object_info.json."""
import importlib
import json
import os
import re
import sys

import pytest

import comfy_stub
import workflow_contract as wc

WORKFLOWS = wc.load_workflows()


@pytest.fixture(scope="module")
def specs():
    comfy_stub.install()
    for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
        sys.modules.pop(name)
    ext = importlib.import_module("nodes.extension")
    ours = wc.stub_object_info(ext.NODES)
    comfy_stub.uninstall()
    core = wc.core_object_info()
    assert not set(ours) & set(core)
    return {**core, **ours}


def test_there_are_the_promised_workflows():
    assert set(WORKFLOWS) == {f"hyperbagel_{n}.json" for n in (
        "text_to_image", "edit", "speculative_vqa", "chain_vqa_to_image", "describe_then_edit", "low_memory",
        "decode_latent_core_vae")}


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_workflow_needs_only_the_stock_checkpoint_and_says_what_it_needs(name, specs):
    """As shipped, no node that reads a file other than the BAGEL folder runs (apply nodes are bypassed), the
    default schedule works on stock BAGEL, and a note names the files, where they go and the memory needed."""
    wf = WORKFLOWS[name]
    api = wc.ui_to_api(wf, specs)
    active = {v["class_type"] for v in api.values()}
    assert not active & {"HyperBagelApplyDraftHead", "HyperBagelApplyDistilledExpert"}
    for node in api.values():
        if node["class_type"] in ("HyperBagelFewStepSampler", "HyperBagelCFGFreeEditor"):
            assert node["inputs"]["schedule"] in ("auto", "training-free", "teacher-50")
        if node["class_type"] in ("HyperBagelModelLoader", "HyperBagelVAELoader"):
            assert node["inputs"]["checkpoint"] == "BAGEL-7B-MoT"
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1
    for needle in ("models/bagel/", "BAGEL-7B-MoT", "RAM", "GiB"):
        assert needle in notes[0], (name, needle)
    apply_nodes = [n for n in wf["nodes"] if n["type"].startswith("HyperBagelApply")]
    assert all(n["mode"] == wc.BYPASSED for n in apply_nodes)
    if apply_nodes:
        assert "Ctrl+B" in notes[0]


def test_bypassed_apply_node_passes_the_model_through(specs):
    wf = WORKFLOWS["hyperbagel_text_to_image.json"]
    api = wc.ui_to_api(wf, specs)
    loader = next(k for k, v in api.items() if v["class_type"] == "HyperBagelModelLoader")
    sampler = next(v for v in api.values() if v["class_type"] == "HyperBagelFewStepSampler")
    assert sampler["inputs"]["model"] == [loader, 0]
    un = json.loads(json.dumps(wf))
    expert = next(n for n in un["nodes"] if n["type"] == "HyperBagelApplyDistilledExpert")
    expert["mode"] = 0  # the documented switch
    api = wc.ui_to_api(un, specs)
    sampler = next(v for v in api.values() if v["class_type"] == "HyperBagelFewStepSampler")
    assert sampler["inputs"]["model"] == [str(expert["id"]), 0]
    assert api[str(expert["id"])]["inputs"]["model"] == [loader, 0]


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_matches_node_specs(name, specs):
    assert wc.check_workflow(WORKFLOWS[name], specs) == []


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_uses_only_our_nodes_and_core_nodes(name, specs):
    types = {n["type"] for n in WORKFLOWS[name]["nodes"]}
    ours = {t for t in types if t.startswith("HyperBagel")}
    assert ours, "a shipped workflow must use the pack"
    assert types - ours <= set(wc.core_object_info()) | set(wc.VIRTUAL_NODES)


def test_chain_feeds_the_answer_into_the_prompt(specs):
    wf = WORKFLOWS["hyperbagel_chain_vqa_to_image.json"]
    api = wc.ui_to_api(wf, specs)
    by_type = {v["class_type"]: (k, v) for k, v in api.items()}
    vqa_id, _ = by_type["HyperBagelSpeculativeVQA"]
    assert by_type["HyperBagelFewStepSampler"][1]["inputs"]["prompt"] == [vqa_id, 0]
    sampler_id = by_type["HyperBagelFewStepSampler"][0]
    assert by_type["ImageScale"][1]["inputs"]["image"] == [sampler_id, 0]
    assert by_type["SaveImage"][1]["inputs"]["images"] == [by_type["ImageScale"][0], 0]


def test_describe_then_edit_feeds_the_answer_into_the_instruction(specs):
    api = wc.ui_to_api(WORKFLOWS["hyperbagel_describe_then_edit.json"], specs)
    by_type = {v["class_type"]: (k, v) for k, v in api.items()}
    assert by_type["HyperBagelCFGFreeEditor"][1]["inputs"]["instruction"] == [by_type["HyperBagelSpeculativeVQA"][0], 0]
    assert by_type["HyperBagelCFGFreeEditor"][1]["inputs"]["image"] == by_type["HyperBagelSpeculativeVQA"][1]["inputs"]["image"]


def test_latent_is_decoded_by_core_vae_decode_with_the_bagel_vae(specs):
    api = wc.ui_to_api(WORKFLOWS["hyperbagel_decode_latent_core_vae.json"], specs)
    by_type = {v["class_type"]: (k, v) for k, v in api.items()}
    dec = by_type["VAEDecode"][1]["inputs"]
    assert dec["samples"] == [by_type["HyperBagelFewStepSampler"][0], 1]
    assert dec["vae"] == [by_type["HyperBagelVAELoader"][0], 0]


def test_ui_to_api_names_every_widget(specs):
    wf = WORKFLOWS["hyperbagel_text_to_image.json"]
    api = wc.ui_to_api(wf, specs)
    sampler = next(v for v in api.values() if v["class_type"] == "HyperBagelFewStepSampler")["inputs"]
    assert sampler["seed"] == 42 and sampler["batch_size"] == 1 and sampler["schedule"] == "auto"
    assert sampler["cfg_interval_end"] == 1.0 and sampler["cfg_renorm_type"] == "global" and sampler["think"] is False
    assert "MarkdownNote" not in {v["class_type"] for v in api.values()}


def test_checker_catches_drift(specs):
    wf = json.loads(json.dumps(WORKFLOWS["hyperbagel_text_to_image.json"]))
    sampler = next(n for n in wf["nodes"] if n["type"] == "HyperBagelFewStepSampler")
    sampler["widgets_values"][1], sampler["widgets_values"][3] = 1000, "hyper-9nfe"
    wf["links"][1][5] = "IMAGE"
    wf["nodes"].append({"id": 99, "type": "NoSuchNode", "inputs": [], "outputs": [], "widgets_values": []})
    problems = "\n".join(wc.check_workflow(wf, specs))
    for needle in ("not on the step grid", "hyper-9nfe", "link 2", "unknown node type"):
        assert needle in problems
    del sampler["widgets_values"][-1]
    assert any("widget values, expected" in p for p in wc.check_workflow(wf, specs))


def test_workflows_are_up_to_date_with_the_builder(tmp_path):
    """workflows/build.py regenerates exactly the committed files."""
    import runpy
    import shutil
    here = os.path.join(wc.REPO, "workflows")
    copy = tmp_path / "workflows"
    shutil.copytree(here, copy)
    mod = runpy.run_path(str(copy / "build.py"))
    for build in mod["BUILDERS"]:
        build()
    for f in os.listdir(here):
        if f.endswith(".json"):
            assert (copy / f).read_text() == open(os.path.join(here, f), encoding="utf-8").read(), f


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR not set")
def test_core_nodes_exist_in_the_comfyui_checkout():
    src = open(os.path.join(os.environ["COMFYUI_DIR"], "nodes.py"), encoding="utf-8").read()
    for name in wc.core_object_info():
        if name in ("PreviewAny",):
            continue
        assert re.search(rf"^class {name}\b", src, re.M), name


def test_every_node_has_a_help_page_and_the_web_extension_exists(specs):
    web = os.path.join(wc.REPO, "web")
    for node_id in (n for n in specs if n.startswith("HyperBagel")):
        page = os.path.join(web, "docs", f"{node_id}.md")
        assert os.path.isfile(page), page
        assert open(page, encoding="utf-8").read().startswith("# ")
    js = open(os.path.join(web, "js", "hyperbagel.js"), encoding="utf-8").read()
    assert "registerExtension" in js and "bagel_stats" in js
    root = open(os.path.join(wc.REPO, "__init__.py"), encoding="utf-8").read()
    assert 'WEB_DIRECTORY = "./web"' in root


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_workflow_has_a_template_thumbnail(name):
    """ComfyUI's template browser shows a custom node's template with ``<name>.jpg`` beside its json."""
    from PIL import Image
    thumb = os.path.join(wc.WORKFLOW_DIR, name.replace(".json", ".jpg"))
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.width >= 320


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_id_is_a_uuid(name):
    import uuid
    assert str(uuid.UUID(WORKFLOWS[name]["id"])) == WORKFLOWS[name]["id"]  # the frontend's schema requires it
