"""The web extension in a real browser: ComfyUI's frontend + headless Chromium driven by playwright-core.

Optional: runs when COMFYUI_DIR is set, a Chromium binary exists (CHROMIUM, default /usr/bin/chromium) and
``node`` can import ``playwright-core`` (PLAYWRIGHT_DIR = a folder whose node_modules has it); skipped
otherwise. Loads the shipped VQA and text-to-image workflows, runs them from the UI and checks that our
extension loaded, the answer box and the speed badges are filled, and that the answer box is neither saved
in ``widgets_values`` nor sent to the server. Screenshots go to $HYPERBAGEL_SCREENSHOTS when set.
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
        /^HyperBagel(SpeculativeVQA|FewStepSampler|CFGFreeEditor)$/.test(n.type));
      const q = await (await fetch("/queue")).json();
      return { done: ours.every((n) => n.hyperbagelBadge), idle: !q.queue_running.length && !q.queue_pending.length };
    });
    if (state.done) break;
    idleSince = state.idle ? idleSince || Date.now() : 0;
    if (idleSince && Date.now() - idleSince > 10000) break;
    await page.waitForTimeout(500);
  }
  await page.waitForTimeout(300);
  if (shots) await page.screenshot({ path: `${shots}/${name}.png` });
  results[name] = await page.evaluate(async () => {
    const ser = window.app.graph.serialize();
    const prompt = await window.app.graphToPrompt();
    const nodes = window.app.graph._nodes.filter((n) => String(n.type).startsWith("HyperBagel"));
    return {
      badges: Object.fromEntries(nodes.map((n) => [n.type, n.hyperbagelBadge || ""])),
      answer: nodes.find((n) => n.type === "HyperBagelSpeculativeVQA")?.widgets
        ?.find((w) => w.name === "bagel_answer")?.value ?? null,
      widgets_values: Object.fromEntries(ser.nodes.map((n) => [n.type, n.widgets_values])),
      prompt_inputs: Object.fromEntries(Object.values(prompt.output).map((n) => [n.class_type, Object.keys(n.inputs)])),
    };
  });
}
console.log("RESULT " + JSON.stringify({ results, logs }));
await browser.close();
"""


def test_extension_renders_answer_and_badges(server, object_info, tmp_path):
    import comfy_server as t

    wfs = {}
    for name, patch in (("hyperbagel_speculative_vqa.json", {"HyperBagelSpeculativeVQA": {3: 24}}),
                        ("hyperbagel_text_to_image_6nfe.json", {"HyperBagelFewStepSampler": {1: 64, 2: 64}})):
        wf = t.wc.load_workflows()[name]
        for n in wf["nodes"]:
            if n["type"] == "HyperBagelModelLoader":
                n["widgets_values"][0] = "tiny"
            for i, v in patch.get(n["type"], {}).items():
                n["widgets_values"][i] = v
        wfs[name.removesuffix(".json")] = wf
    script = tmp_path / "ui.mjs"
    script.write_text(SCRIPT)
    shots = os.environ.get("HYPERBAGEL_SCREENSHOTS", "")
    env = dict(os.environ, NODE_PATH=os.path.join(PW_DIR, "node_modules"))
    # ESM ignores NODE_PATH: run from a folder that resolves playwright-core
    shutil.copy(script, os.path.join(PW_DIR, "_hyperbagel_ui_test.mjs"))
    try:
        out = subprocess.run(["node", os.path.join(PW_DIR, "_hyperbagel_ui_test.mjs"), server.url, CHROMIUM, shots,
                              json.dumps(wfs)], capture_output=True, text=True, timeout=300, env=env)
    finally:
        os.remove(os.path.join(PW_DIR, "_hyperbagel_ui_test.mjs"))
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads(line[len("RESULT "):])
    assert not [ln for ln in data["logs"] if "Error loading extension" in ln and "hyperbagel" in ln], data["logs"]
    vqa = data["results"]["hyperbagel_speculative_vqa"]
    assert vqa["answer"] and "drafter:" in vqa["answer"], (data["logs"], server.read_log()[-3000:])
    assert "tok/s" in vqa["badges"]["HyperBagelSpeculativeVQA"]
    assert len(vqa["widgets_values"]["HyperBagelSpeculativeVQA"]) == 9  # the answer box is not saved
    assert "bagel_answer" not in vqa["prompt_inputs"]["HyperBagelSpeculativeVQA"]  # nor sent to the server
    t2i = data["results"]["hyperbagel_text_to_image_6nfe"]
    assert "NFE" in t2i["badges"]["HyperBagelFewStepSampler"] and "passes" in t2i["badges"]["HyperBagelFewStepSampler"]
