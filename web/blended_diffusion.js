// Opens workflows saved with earlier widget layouts of the pack's nodes.
//
// The frontend restores a node's widgets by position. When a release removes widgets (the speed options moved
// from the Sampler and the loader to the Speed node), the saved values after them would land on the wrong
// widgets. An old layout is recognised by its length and by a value only it could hold at one position; its
// values are then re-read by name, and widgets added since then take their declared defaults. Values of removed
// widgets are dropped with a note in the console and, where the frontend has toasts, on screen (set them on a
// Speed node). Every Sampler layout the pack shipped is listed; widgets appended at the end need nothing here
// (the frontend keeps their defaults).
//
// CLIP Rank's `mode` menu took the slot of the former `normalized` switch: a saved true/false is shown as the
// mode the server runs for it (nodes/rank.py), not as a value the menu does not offer.
import { app } from "../../scripts/app.js";

// The Sampler's widgets up to the grow/feather pair, the same in every layout.
const SAMPLER_FIRST = ["seed", "control_after_generate", "num_results", "respacing", "skip_timesteps", "method",
                       "mode", "enforce_background", "invert_mask", "batch_size", "region", "context", "grow_mask",
                       "feather"];
const RESAMPLING = ["resample_count", "resample_jump_length", "soft_mask", "colour_match"];
const SPEED_WIDGETS = ["precision", "channels_last", "compile"];
const PRECISIONS = ["model dtype", "bf16 autocast", "fp16 autocast"];
const BACKGROUND_STEPS = ["current", "previous"];
const SPEED_DEFAULTS = { reuse_guided_forward: false, precision: "model dtype", channels_last: false, compile: false };

const OLD_LAYOUTS = {
  BlendedDiffusion_Sampler: [
    { // the first release: no speed widgets yet, no resampling, soft mask or colour match
      names: [...SAMPLER_FIRST, "background_noise_step", "reuse_guided_forward", "capture_every", "ddim_eta",
              "preview"],
      marker: { index: 14, values: BACKGROUND_STEPS },
      removedDefaults: { reuse_guided_forward: false },
    },
    { // the speed widgets on the Sampler
      names: [...SAMPLER_FIRST, "background_noise_step", "reuse_guided_forward", "capture_every", "ddim_eta",
              ...SPEED_WIDGETS, "preview"],
      marker: { index: 18, values: PRECISIONS },
      removedDefaults: SPEED_DEFAULTS,
    },
    { // the speed widgets gone, no resampling, soft mask or colour match yet
      names: [...SAMPLER_FIRST, "background_noise_step", "capture_every", "ddim_eta", "preview"],
      marker: { index: 14, values: BACKGROUND_STEPS },
      removedDefaults: {},
    },
    { // resampling, soft mask and colour match added while the speed widgets were still there
      names: [...SAMPLER_FIRST, ...RESAMPLING, "background_noise_step", "reuse_guided_forward", "capture_every",
              "ddim_eta", ...SPEED_WIDGETS, "preview"],
      marker: { index: 22, values: PRECISIONS },
      removedDefaults: SPEED_DEFAULTS,
    },
  ],
  BlendedDiffusion_LoadGuidedDiffusion: [{
    names: ["model_name", "dtype", "attention_order", "head_channels", "gradient_checkpointing"],
    marker: { index: 1, values: ["auto", "float32", "float16", "bfloat16"] },
    removedDefaults: { dtype: "auto", gradient_checkpointing: false },
  }],
};

// What a removed widget's value is on the Speed node, where the name or the value differs: the loader's dtype
// set the precision of the UNet's convolutions with its norms in float32, the Speed node's "torso" precisions.
const SPEED_EQUIVALENTS = {
  dtype: { float32: 'precision "fp32"', float16: 'precision "fp16 torso"', bfloat16: 'precision "bf16 torso"' },
};

// A saved CLIP Rank `normalized` switch -> the mode it meant, as the server reads it.
const RANK_LEGACY_MODES = { true: "guidance view", false: "original" };

function legacyRankMode(value) {
  if (typeof value === "boolean") return RANK_LEGACY_MODES[value];
  if (typeof value === "string") {
    const word = value.trim().toLowerCase();
    if (word === "true" || word === "false") return RANK_LEGACY_MODES[word];
  }
  return undefined;
}

// Says on screen too, where the frontend offers toasts; never fails where it does not.
function notify(detail) {
  console.warn(`[Blended Diffusion] ${detail}`);
  try {
    app.extensionManager?.toast?.add?.({ severity: "warn", summary: "Blended Diffusion: settings dropped", detail,
                                        life: 15000 });
  } catch (error) {
    console.warn("[Blended Diffusion] could not show a notice:", error);
  }
}

// The declared default of a widget input: its "default" option, or a combo's first choice.
function declaredDefault(nodeData, name) {
  const spec = nodeData.input?.required?.[name] ?? nodeData.input?.optional?.[name];
  if (!spec) return undefined;
  const [type, options] = spec;
  if (options && "default" in options) return options.default;
  return Array.isArray(type) ? type[0] : undefined;
}

function matchingLayout(layouts, values) {
  if (!Array.isArray(values)) return null;
  return layouts.find((l) => l.names.length === values.length && l.marker.values.includes(values[l.marker.index]))
    ?? null;
}

app.registerExtension({
  name: "BlendedDiffusion.OldWidgetLayouts",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "BlendedDiffusion_CLIPRank") {
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        const mode = this.widgets?.find((w) => w.name === "mode");
        const mapped = mode && legacyRankMode(mode.value);
        if (mapped) mode.value = mapped;
        return result;
      };
      return;
    }
    const layouts = OLD_LAYOUTS[nodeData.name];
    if (!layouts) return;
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      const layout = matchingLayout(layouts, info?.widgets_values);
      if (layout && this.widgets) {
        // Widgets added since that layout got a saved value by position: give them their defaults instead.
        this.widgets.forEach((w) => {
          if (layout.names.includes(w.name)) return;
          const value = declaredDefault(nodeData, w.name);
          if (value !== undefined) w.value = value;
        });
        const dropped = [];
        layout.names.forEach((name, i) => {
          const widget = this.widgets.find((w) => w.name === name);
          const value = info.widgets_values[i];
          if (widget) widget.value = value;
          else if (name in layout.removedDefaults && layout.removedDefaults[name] !== value) {
            const equivalent = SPEED_EQUIVALENTS[name]?.[value];
            dropped.push(equivalent ? `${name}=${value} (${equivalent} there)` : `${name}=${value}`);
          }
        });
        if (dropped.length) {
          // A node inside a subgraph has its id there: say which subgraph, or a top-level node could share it.
          const where = this.graph?.isRootGraph === false ? ` in subgraph "${this.graph.name}"` : "";
          notify(`${this.title ?? nodeData.name} (node ${this.id}${where}) was saved with settings that moved to the ` +
                 `Speed node and are dropped here: ${dropped.join(", ")}. Set them on a Speed node connected to ` +
                 "the Sampler's 'speed' input to keep them.");
        }
      }
      return result;
    };
  },
});
