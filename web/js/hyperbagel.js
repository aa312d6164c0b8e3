// hyperbagel frontend extension: shows the VQA answer + decoding stats on the node, and a speed badge
// (schedule, NFE, network passes, seconds) on the sampler and editor. Reads the `text` and `bagel_stats`
// entries the nodes return in their UI payload; nothing here is needed for the nodes to work.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const VQA = "HyperBagelSpeculativeVQA";
const IMAGE_NODES = new Set(["HyperBagelFewStepSampler", "HyperBagelCFGFreeEditor"]);
const ANSWER_WIDGET = "bagel_answer";

function fmt(v, digits = 2) {
  if (typeof v !== "number" || !isFinite(v)) return String(v);
  return Number.isInteger(v) ? String(v) : v.toFixed(digits);
}

export function vqaBadge(s) {
  if (!s) return "";
  const parts = [];
  if (s.drafter) parts.push(s.drafter === "none" ? "plain decoding" : s.drafter);
  if (s.tau != null) parts.push(`τ ${fmt(s.tau)}`);
  if (s.acceptance_rate != null) parts.push(`accept ${fmt(100 * s.acceptance_rate, 0)}%`);
  const tps = s.tokens_per_s ?? s.tokens_per_second;
  if (tps != null) parts.push(`${fmt(tps, 1)} tok/s`);
  return parts.join(" · ");
}

export function imageBadge(s) {
  if (!s) return "";
  const parts = [];
  if (s.nfe != null) parts.push(`${s.nfe} NFE`);
  if (s.passes != null) parts.push(`${s.passes} passes`);
  if (s.cfg) parts.push(s.cfg);
  if (s.seconds != null) parts.push(`${fmt(s.seconds, 1)} s`);
  return parts.join(" · ");
}

function answerWidget(node) {
  let w = node.widgets?.find((x) => x.name === ANSWER_WIDGET);
  if (!w) {
    w = ComfyWidgets.STRING(node, ANSWER_WIDGET, ["STRING", { multiline: true }], app).widget;
    w.serialize = false; // never stored in widgets_values (keeps saved workflows positional)
    w.options = { ...(w.options || {}), serialize: false }; // never sent to the server
    if (w.inputEl) {
      w.inputEl.readOnly = true;
      w.inputEl.style.opacity = 0.85;
      w.inputEl.placeholder = "The answer appears here after a run.";
    }
  }
  return w;
}

function drawBadge(node, ctx) {
  const text = node.hyperbagelBadge;
  if (!text || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = "11px sans-serif";
  const pad = 5;
  const w = ctx.measureText(text).width + 2 * pad;
  const h = 16;
  const x = Math.max(0, node.size[0] - w - 4);
  const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const y = -title - h - 4;
  ctx.fillStyle = "#2d6a4f";
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, h, 6);
  else ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.fillStyle = "#fff";
  ctx.textBaseline = "middle";
  ctx.fillText(text, x + pad, y + h / 2 + 0.5);
  ctx.restore();
}

app.registerExtension({
  name: "hyperbagel.ui",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (name !== VQA && !IMAGE_NODES.has(name)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const stats = message?.bagel_stats?.[0];
      if (name === VQA) {
        const answer = message?.text?.[0] ?? "";
        const line = stats?.summary ? `\n\n— ${stats.summary}` : "";
        answerWidget(this).value = answer + line;
        this.hyperbagelBadge = vqaBadge(stats);
      } else {
        this.hyperbagelBadge = imageBadge(stats);
        if (stats?.warning) this.hyperbagelBadge += " · ⚠";
      }
      this.setDirtyCanvas?.(true, true);
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      drawBadge(this, ctx);
      return r;
    };

    if (name === VQA) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        answerWidget(this);
        return r;
      };
    }
  },
});
