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
    names = set(WORKFLOWS)
    assert {"hyperbagel_text_to_image_6nfe.json", "hyperbagel_edit_cfg_free.json",
            "hyperbagel_speculative_vqa.json", "hyperbagel_chain_vqa_to_image.json"} <= names


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


def test_ui_to_api_names_every_widget(specs):
    wf = WORKFLOWS["hyperbagel_text_to_image_6nfe.json"]
    api = wc.ui_to_api(wf, specs)
    sampler = next(v for v in api.values() if v["class_type"] == "HyperBagelFewStepSampler")["inputs"]
    assert sampler["seed"] == 42 and sampler["batch_size"] == 1 and sampler["schedule"] == "hyper-6nfe"
    assert "MarkdownNote" not in {v["class_type"] for v in api.values()}


def test_checker_catches_drift(specs):
    wf = json.loads(json.dumps(WORKFLOWS["hyperbagel_text_to_image_6nfe.json"]))
    sampler = next(n for n in wf["nodes"] if n["type"] == "HyperBagelFewStepSampler")
    sampler["widgets_values"][1], sampler["widgets_values"][3] = 1000, "hyper-9nfe"
    wf["links"][0][5] = "IMAGE"
    wf["nodes"].append({"id": 99, "type": "NoSuchNode", "inputs": [], "outputs": [], "widgets_values": []})
    problems = "\n".join(wc.check_workflow(wf, specs))
    for needle in ("not on the step grid", "hyper-9nfe", "link 1", "unknown node type"):
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
    for fn in ("text_to_image_6nfe", "edit_cfg_free", "speculative_vqa", "chain_vqa_to_image"):
        mod[fn]()
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
def test_workflow_id_is_a_uuid(name):
    import uuid
    assert str(uuid.UUID(WORKFLOWS[name]["id"])) == WORKFLOWS[name]["id"]  # the frontend's schema requires it
