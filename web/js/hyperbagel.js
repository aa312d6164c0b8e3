// hyperbagel frontend extension. On the VQA node: a read-only box with the answer and decoding stats. On the
// sampler and editor: a read-only box with the settings used, any warning and the thinking text, and the
// widgets the chosen schedule (or cache) ignores hidden. On all three: a badge under the node (the frontend
// draws its own node badges in and above the title bar). Reads the `text` and `bagel_stats` entries of the nodes' UI
// payload; nothing here is needed for the nodes to work.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const VQA = "HyperBagelSpeculativeVQA";
const IMAGE_NODES = new Set(["HyperBagelFewStepSampler", "HyperBagelCFGFreeEditor"]);
const ANSWER_WIDGET = "bagel_answer";
const INFO_WIDGET = "bagel_info";

// widget -> schedules that read it (nodes/adapters.py plan_schedule); other schedules ignore it
const USED_BY = {
  steps: ["auto", "training-free"],
  solver: ["auto", "training-free"],
  custom_timesteps: ["custom"],
  shift: ["auto", "training-free", "teacher-50", "custom"],
};
// the TaylorSeer settings, read only with cache = custom (nodes/adapters.py plan_cache)
const CACHE_SETTINGS = ["cache_warmup", "cache_interval", "cache_order"];

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
  if (s.predicted != null) parts.push(`${s.computed} computed / ${s.predicted} predicted`);
  if (s.cfg) parts.push(s.cfg);
  if (s.seconds != null) parts.push(`${fmt(s.seconds, 1)} s`);
  if (s.warning) parts.push("⚠ see the text box");
  return parts.join(" · ");
}

export function hiddenWidgets(schedule, cache = "off") {
  const hidden = Object.entries(USED_BY).filter(([, used]) => !used.includes(schedule)).map(([name]) => name);
  return cache === "custom" ? hidden : hidden.concat(CACHE_SETTINGS);
}

function textWidget(node, name, placeholder) {
  let w = node.widgets?.find((x) => x.name === name);
  if (!w) {
    w = ComfyWidgets.STRING(node, name, ["STRING", { multiline: true }], app).widget;
    w.serialize = false; // never stored in widgets_values (keeps saved workflows positional)
    w.options = { ...(w.options || {}), serialize: false }; // never sent to the server
    if (w.inputEl) {
      w.inputEl.readOnly = true;
      w.inputEl.style.opacity = 0.85;
      w.inputEl.placeholder = placeholder;
    }
  }
  return w;
}

// Hidden widgets: `hidden` stops drawing and input slots, a zero height closes the gap in the layout.
function setHidden(w, hidden) {
  if (hidden && !w.hyperbagelSize) {
    w.hyperbagelSize = { own: Object.prototype.hasOwnProperty.call(w, "computeSize"), fn: w.computeSize };
    w.computeSize = () => [0, -4];
  } else if (!hidden && w.hyperbagelSize) {
    if (w.hyperbagelSize.own) w.computeSize = w.hyperbagelSize.fn;
    else delete w.computeSize;
    delete w.hyperbagelSize;
  }
  w.hidden = hidden;
}

function applySchedule(node) {
  const schedule = node.widgets?.find((w) => w.name === "schedule")?.value;
  if (!schedule) return;
  const cache = node.widgets.find((w) => w.name === "cache")?.value;
  const hide = new Set(hiddenWidgets(schedule, cache));
  for (const w of node.widgets) {
    const managed = w.name in USED_BY || CACHE_SETTINGS.includes(w.name);
    if (managed && !!w.hidden !== hide.has(w.name)) setHidden(w, hide.has(w.name));
  }
  node.setDirtyCanvas?.(true, true);
}

function drawBadge(node, ctx) {
  const text = node.hyperbagelBadge;
  if (!text || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = "11px sans-serif";
  const pad = 5;
  const w = ctx.measureText(text).width + 2 * pad;
  const h = 16;
  const x = 0;
  const y = node.size[1] + 6; // under the node body, away from the title-bar badges
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
      const text = message?.text?.[0] ?? "";
      if (name === VQA) {
        const line = stats?.summary ? `\n\n— ${stats.summary}` : "";
        textWidget(this, ANSWER_WIDGET).value = text + line;
        this.hyperbagelBadge = vqaBadge(stats);
      } else {
        textWidget(this, INFO_WIDGET).value = text;
        this.hyperbagelBadge = imageBadge(stats);
      }
      this.setDirtyCanvas?.(true, true);
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      drawBadge(this, ctx);
      return r;
    };

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      if (name === VQA) {
        textWidget(this, ANSWER_WIDGET, "The answer appears here after a run.");
      } else {
        textWidget(this, INFO_WIDGET, "Settings used, warnings and BAGEL's thinking appear here after a run.");
        for (const w of this.widgets ?? []) {
          if (w.name !== "schedule" && w.name !== "cache") continue;
          const callback = w.callback;
          w.callback = (...args) => {
            const out = callback?.apply(w, args);
            applySchedule(this);
            return out;
          };
        }
        applySchedule(this);
      }
      return r;
    };

    if (IMAGE_NODES.has(name)) {
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const r = onConfigure?.apply(this, arguments);
        applySchedule(this); // a loaded workflow sets the schedule after onNodeCreated
        return r;
      };
    }
  },
});
