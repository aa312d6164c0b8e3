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

OPEN = r"""
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
"""

SCRIPT = OPEN + r"""
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


def _run_browser(script: str, server, workflows: dict) -> dict:
    """Run a playwright script (``OPEN`` + steps) against ``server``; what it printed after ``RESULT ``."""
    shots = os.environ.get("HYPERBAGEL_SCREENSHOTS", "")
    env = dict(os.environ, NODE_PATH=os.path.join(PW_DIR, "node_modules"))
    # ESM ignores NODE_PATH: run from a folder that resolves playwright-core
    path = os.path.join(PW_DIR, f"_hyperbagel_ui_test_{os.getpid()}.mjs")
    with open(path, "w") as f:
        f.write(script)
    try:
        out = subprocess.run(["node", path, server.url, CHROMIUM, shots, json.dumps(workflows)], capture_output=True,
                             text=True, timeout=900, env=env)
    finally:
        os.remove(path)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(line[len("RESULT "):])


def test_extension_renders_answer_badges_warnings_and_hides_inert_widgets(server, object_info):
    import comfy_server as t

    # every workflow as shipped, then text to image asking for a Hyper-Bagel grid without an expert: the node
    # must say so in text
    wfs = {name.removesuffix(".json"): _patched(name, object_info, {}) for name in sorted(t.wc.load_workflows())}
    wfs["warning_text_to_image"] = _patched("hyperbagel_text_to_image.json", object_info,
                                            {"HyperBagelFewStepSampler": {"schedule": "hyper-6nfe"}})
    data = _run_browser(SCRIPT, server, wfs)
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


PREVIEW_SCRIPT = OPEN + r"""
// ComfyUI's frontend shows a node's latest preview frame (b_preview_with_metadata) as the node's image while it runs
await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflows.preview);
await page.waitForTimeout(500);
const id = await page.evaluate(() => {
  window.__hbPreviews = [];
  window.comfyAPI.api.api.addEventListener("b_preview_with_metadata",
    (e) => window.__hbPreviews.push(String(e.detail.displayNodeId)));
  return String(window.app.graph._nodes.find((n) => n.type === "HyperBagelFewStepSampler").id);
});
await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
const state = async () => page.evaluate(async (id) => {
  const node = window.app.graph.getNodeById(Number(id));
  const q = await (await fetch("/queue")).json();
  const img = node.imgs?.[0];
  return { previews: window.__hbPreviews.filter((x) => x === id).length, running: q.queue_running.length > 0,
           shown: (window.app.nodePreviewImages[id] || []).length,
           img: img ? [img.naturalWidth, img.naturalHeight] : null,
           badge: node.hyperbagelBadge || "" };
}, id);
let mid = null;
for (const t0 = Date.now(); Date.now() - t0 < 180000; ) {
  const s = await state();
  if (s.previews >= 4 && s.running && s.img) {
    await page.waitForTimeout(150);
    if (shots) await page.screenshot({ path: `${shots}/preview_mid_run.png` });
    mid = { before: s, after: await state() };  // the run still going after the screenshot: it shows mid-run
    break;
  }
  if (!s.running && s.badge) break;
  await page.waitForTimeout(100);
}
let end = await state();
for (const t0 = Date.now(); Date.now() - t0 < 180000 && (end.running || !end.badge); ) {
  await page.waitForTimeout(300);
  end = await state();
}
console.log("RESULT " + JSON.stringify({ mid, end, logs }));
await browser.close();
"""


def test_sampler_shows_a_preview_mid_run(preview_server, object_info):
    """Previews on: the sampler node shows the preview image while it denoises (``preview_mid_run.png`` in
    $HYPERBAGEL_SCREENSHOTS, taken with the run still going), and the run finishes."""
    steps = 16  # ~0.5 s per step at 192² on 2 cores: time to see it mid-run, a short test
    wf = _patched("hyperbagel_text_to_image.json", object_info, {"HyperBagelFewStepSampler": {
        "schedule": "training-free", "solver": "euler", "steps": steps, "width": 192, "height": 192}})
    data = _run_browser(PREVIEW_SCRIPT, preview_server, {"preview": wf})
    mid, end = data["mid"], data["end"]
    assert mid, (data["end"], data["logs"][-20:], preview_server.read_log()[-3000:])
    # mid-run: the queue still runs, frames arrived and the node holds one as its image (the latent's 24², upscaled
    # by the server to --preview-size)
    before, after = mid["before"], mid["after"]
    assert 4 <= before["previews"] < steps and before["shown"] == 1 and before["img"] == [512, 512], mid
    assert after["running"] and after["img"] == [512, 512], mid
    assert not end["running"] and end["previews"] == steps and "NFE" in end["badge"], end
