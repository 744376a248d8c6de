// Opens workflows saved with earlier widget layouts of the pack's nodes.
//
// The frontend restores a node's widgets by position. When a release removes widgets (the speed options moved
// from the Sampler and the loader to the Speed node), the saved values after them would land on the wrong
// widgets. An old layout is recognised by its length and by a value only it could hold at one position; its
// values are then re-read by name, and widgets added since then take their declared defaults. Values of removed
// widgets are dropped with a console note (set them on a Speed node). Every Sampler layout the pack shipped is
// listed; widgets appended at the end need nothing here (the frontend keeps their defaults).
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

// What a removed widget is called on the Speed node, where it differs.
const SPEED_NAMES = { dtype: "precision" };

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
            dropped.push(name in SPEED_NAMES ? `${name}=${value} (its ${SPEED_NAMES[name]})` : `${name}=${value}`);
          }
        });
        if (dropped.length) {
          console.warn(`[Blended Diffusion] node ${this.id}: ${dropped.join(", ")} moved to the Speed node; ` +
                       "connect one to the Sampler's 'speed' input to keep them.");
        }
      }
      return result;
    };
  },
});
