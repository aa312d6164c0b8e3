"""The web extension in a real browser: ComfyUI's frontend + headless Chromium driven by playwright-core.

Optional: runs when COMFYUI_DIR is set, a Chromium binary exists (CHROMIUM, default /usr/bin/chromium) and
``node`` can import ``playwright-core`` (PLAYWRIGHT_DIR = a folder whose node_modules has it); skipped
otherwise. Loads the shipped VQA and text-to-image workflows, runs them from the UI and checks that our
extension loaded, the answer box and the speed badges are filled, and that the answer box is neither saved
in ``widgets_values`` nor sent to the server. Runs every shipped workflow (tiny checkpoint, small sizes) from the UI
and checks that our extension loaded, that the VQA answer box and the badges are filled, that a sampler warning
is visible as text on the node, that the widgets the schedule ignores are hidden, and that our text boxes are
neither saved in ``widgets_values`` nor sent to the server. Screenshots go to $HYPERBAGEL_SCREENSHOTS when set
(``workflows/<name>.jpg``, the template browser's thumbnails, are made from them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PW_DIR = os.environ.get("PLAYWRIGHT_DIR", "")
pytestmark = pytest.mark.skipif(
    not (os.environ.get("COMFYUI_DIR") and os.path.exists(CHROMIUM) and shutil.which("node")
         and os.path.isdir(os.path.join(PW_DIR, "node_modules", "playwright-core"))),
    reason="needs COMFYUI_DIR, Chromium and PLAYWRIGHT_DIR with playwright-core")

SCRIPT = r"""
import { chromium } from "playwright-core";
const [url, chromiumPath, shots, workflowsJson] = process.argv.slice(2);
const workflows = JSON.parse(workflowsJson);
const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
const logs = [];
page.on("console", (m) => logs.push(m.text()));
await page.goto(url);
await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 90000 });
await page.waitForTimeout(2000);
// a fresh user directory opens the "Get Started" template dialog: mark the tutorial done and close it
await page.evaluate(async () => {
  try { await window.app.extensionManager.setting.set("Comfy.TutorialCompleted", true); } catch (e) {}
});
await page.keyboard.press("Escape");
const results = {};
for (const [name, wf] of Object.entries(workflows)) {
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, wf);
  await page.waitForTimeout(500);
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  // done when every VQA/sampler/editor node got its result (onExecuted sets the badge), or when the queue
  // has been empty for 10 s (then the checks below report what is missing)
  let idleSince = 0;
  for (const t0 = Date.now(); Date.now() - t0 < 180000; ) {
    const state = await page.evaluate(async () => {
      const ours = window.app.graph._nodes.filter((n) =>
        /^HyperBagel(SpeculativeVQA|FewStepSampler|CFGFreeEditor)$/.test(n.type) && n.mode === 0);
      const q = await (await fetch("/queue")).json();
      return { done: ours.every((n) => n.hyperbagelBadge), idle: !q.queue_running.length && !q.queue_pending.length };
    });
    if (state.done && state.idle) break;  // ours reported and the rest (core nodes) finished too
    idleSince = state.idle ? idleSince || Date.now() : 0;
    if (idleSince && Date.now() - idleSince > 10000) break;
    await page.waitForTimeout(500);
  }
  await page.waitForTimeout(300);
  if (shots) await page.screenshot({ path: `${shots}/${name}.png` });
  results[name] = await page.evaluate(async () => {
    const IMAGE = /^HyperBagel(FewStepSampler|CFGFreeEditor)$/;
    const ser = window.app.graph.serialize();
    const prompt = await window.app.graphToPrompt();
    const nodes = window.app.graph._nodes.filter((n) => String(n.type).startsWith("HyperBagel"));
    const widget = (type, name) => nodes.find((n) => n.type === type)?.widgets?.find((w) => w.name === name);
    const hidden = (n) => n.widgets.filter((w) => w.hidden).map((w) => w.name).sort();
    const out = {
      badges: Object.fromEntries(nodes.map((n) => [n.type, n.hyperbagelBadge || ""])),
      answer: widget("HyperBagelSpeculativeVQA", "bagel_answer")?.value ?? null,
      info: widget("HyperBagelFewStepSampler", "bagel_info")?.value ?? widget("HyperBagelCFGFreeEditor", "bagel_info")?.value ?? null,
      hidden: Object.fromEntries(nodes.filter((n) => IMAGE.test(n.type)).map((n) => [n.type, hidden(n)])),
      widgets_values: Object.fromEntries(ser.nodes.map((n) => [n.type, n.widgets_values])),
      prompt_inputs: Object.fromEntries(Object.values(prompt.output).map((n) => [n.class_type, Object.keys(n.inputs)])),
    };
    // the schedule widget's callback (what a click in the UI calls) re-applies the rule
    const sampler = nodes.find((n) => IMAGE.test(n.type));
    if (sampler) {
      const w = sampler.widgets.find((x) => x.name === "schedule");
      w.value = "custom";
      w.callback?.(w.value);
      out.hidden_custom = hidden(sampler);
    }
    return out;
  });
}
console.log("RESULT " + JSON.stringify({ results, logs }));
await browser.close();
"""


def _patched(name: str, object_info: dict, overrides: dict) -> dict:
    """A shipped UI workflow with widget values replaced by name (positions from the live node specs)."""
    import comfy_server as t

    wf = t.wc.load_workflows()[name]
    for n in wf["nodes"]:
        values = {**t.OVERRIDES.get(n["type"], {}), **overrides.get(n["type"], {})}
        if n["type"] not in object_info or not values:
            continue
        pos = 0
        for spec in t.wc.node_inputs(object_info[n["type"]]):
            if not spec.widget:
                continue
            if spec.name in values:
                n["widgets_values"][pos] = values[spec.name]
            pos += 1 + len(spec.extras)
    return wf


def test_extension_renders_answer_badges_warnings_and_hides_inert_widgets(server, object_info, tmp_path):
    import comfy_server as t

    # every workflow as shipped, then text to image asking for a Hyper-Bagel grid without an expert: the node
    # must say so in text
    wfs = {name.removesuffix(".json"): _patched(name, object_info, {}) for name in sorted(t.wc.load_workflows())}
    wfs["warning_text_to_image"] = _patched("hyperbagel_text_to_image.json", object_info,
                                            {"HyperBagelFewStepSampler": {"schedule": "hyper-6nfe"}})
    script = tmp_path / "ui.mjs"
    script.write_text(SCRIPT)
    shots = os.environ.get("HYPERBAGEL_SCREENSHOTS", "")
    env = dict(os.environ, NODE_PATH=os.path.join(PW_DIR, "node_modules"))
    # ESM ignores NODE_PATH: run from a folder that resolves playwright-core
    shutil.copy(script, os.path.join(PW_DIR, "_hyperbagel_ui_test.mjs"))
    try:
        out = subprocess.run(["node", os.path.join(PW_DIR, "_hyperbagel_ui_test.mjs"), server.url, CHROMIUM, shots,
                              json.dumps(wfs)], capture_output=True, text=True, timeout=900, env=env)
    finally:
        os.remove(os.path.join(PW_DIR, "_hyperbagel_ui_test.mjs"))
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads(line[len("RESULT "):])
    assert not [ln for ln in data["logs"] if "Error loading extension" in ln and "hyperbagel" in ln], data["logs"]
    res = data["results"]
    vqa = res["hyperbagel_speculative_vqa"]
    assert vqa["answer"] and "drafter:" in vqa["answer"], (data["logs"], server.read_log()[-3000:])
    assert "tok/s" in vqa["badges"]["HyperBagelSpeculativeVQA"]
    assert len(vqa["widgets_values"]["HyperBagelSpeculativeVQA"]) == 8  # the answer box is not saved
    assert "bagel_answer" not in vqa["prompt_inputs"]["HyperBagelSpeculativeVQA"]  # nor sent to the server
    t2i = res.pop("warning_text_to_image")
    badge = t2i["badges"]["HyperBagelFewStepSampler"]
    assert "NFE" in badge and "passes" in badge and "⚠" in badge
    assert "no distilled expert applied" in t2i["info"]  # the warning, as text on the sampler node
    assert "hyper-6nfe" in t2i["info"] and "seconds" in t2i["info"]
    assert t2i["hidden"]["HyperBagelFewStepSampler"] == ["custom_timesteps", "shift", "solver", "steps"]
    assert t2i["hidden_custom"] == ["solver", "steps"]
    assert len(t2i["widgets_values"]["HyperBagelFewStepSampler"]) == 17  # the info box is not saved
    assert "bagel_info" not in t2i["prompt_inputs"]["HyperBagelFewStepSampler"]  # nor sent to the server
    for name, r in res.items():
        for node_type, hidden in r["hidden"].items():
            assert hidden == ["custom_timesteps"], (name, node_type, hidden)  # schedule auto
        assert r["info"] is None or "expert" not in r["info"], (name, r["info"])
        assert all(r["badges"][n] for n in r["badges"] if not n.startswith(("HyperBagelApply", "HyperBagelModel",
                                                                              "HyperBagelVAE"))), (name, r["badges"])
