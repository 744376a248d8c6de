// Opens workflows saved with earlier widget layouts of the pack's nodes.
//
// The frontend restores a node's widgets by position. When a release removes widgets (the speed options moved
// from the Sampler and the loader to the Speed node), the saved values after them would land on the wrong
// widgets. An old layout is recognised by its length and by a value only it could hold; its values are then
// re-read by name, and widgets added since then take their declared defaults. Values of removed widgets are dropped with a console note (set them on a Speed node).
import { app } from "../../scripts/app.js";

const OLD_LAYOUTS = {
  BlendedDiffusion_Sampler: [{
    names: ["seed", "control_after_generate", "num_results", "respacing", "skip_timesteps", "method", "mode",
            "enforce_background", "invert_mask", "batch_size", "region", "context", "grow_mask", "feather",
            "background_noise_step", "reuse_guided_forward", "capture_every", "ddim_eta", "precision",
            "channels_last", "compile", "preview"],
    marker: { index: 18, values: ["model dtype", "bf16 autocast", "fp16 autocast"] },
    removedDefaults: { reuse_guided_forward: false, precision: "model dtype", channels_last: false, compile: false },
  }],
  BlendedDiffusion_LoadGuidedDiffusion: [{
    names: ["model_name", "dtype", "attention_order", "head_channels", "gradient_checkpointing"],
    marker: { index: 1, values: ["auto", "float32", "float16", "bfloat16"] },
    removedDefaults: { dtype: "auto", gradient_checkpointing: false },
  }],
};

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
          else if (name in layout.removedDefaults && layout.removedDefaults[name] !== value) dropped.push(`${name}=${value}`);
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
