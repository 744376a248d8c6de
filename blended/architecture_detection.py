"""Reading a guided-diffusion UNet's architecture from its weights or from the original's create_model kwargs.

Users download checkpoints without any config, so the architecture is recovered from the state dict's key
names and tensor shapes. Shapes fix everything except three things:

* the attention head split (``num_heads`` / ``num_head_channels``): default 64 channels per head, which is
  what every released OpenAI checkpoint uses;
* the qkv channel order (``use_new_attention_order``): default legacy, as in the released checkpoints;
* ``image_size``, the resolution the model was trained at (the network runs at any multiple of
  ``2 ** (levels - 1)``). It is inferred by :func:`infer_image_size`; the ``image_size`` override wins.

OpenAI's class-conditional 64x64 and 128x128 checkpoints differ from those defaults (a cosine schedule and the
new qkv order; four heads of any width). Their shapes are unlike any other release's, so they are recognised by
them (:data:`RELEASED_BY_SHAPE`) and given their published flags.

A ``config.json`` beside a checkpoint (the original's create_model kwargs) is read with
:func:`unet_config_from_original_kwargs`; the loader in :mod:`blended.checkpoint` decides precedence.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from .errors import BlendedInputError, CheckpointError
from .unet import GuidedDiffusionUNet, UNetConfig

__all__ = [
    "OVERRIDABLE_FIELDS",
    "ORIGINAL_DEFAULTS",
    "ORIGINAL_KWARGS",
    "apply_overrides",
    "check_guided_diffusion_family",
    "detect_unet_config",
    "expected_shapes",
    "infer_image_size",
    "layout_mismatches",
    "predicts_noise",
    "released_checkpoint",
    "unet_config_from_original_kwargs",
]

logger = logging.getLogger(__name__)

NUM_IMAGENET_CLASSES = 1000

# The original's per-image-size channel_mult when the flag is "" (guided_diffusion/script_util.py).
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# model_and_diffusion_defaults() of the original: what a config.json leaves out means these.
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
}

# Every create_model_and_diffusion keyword of the original (the model's above, the diffusion's below, and
# in_channels, which this loader also reads): a config.json key that is none of them is not one of its settings.
ORIGINAL_KWARGS = frozenset(ORIGINAL_DEFAULTS) | {
    "in_channels", "use_checkpoint", "use_fp16", "diffusion_steps", "noise_schedule", "timestep_respacing",
    "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas",
}

# What shapes cannot tell, so what a caller may set; shape-derived fields are fixed by the weights.
OVERRIDABLE_FIELDS = (
    "image_size",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_new_attention_order",
    "dropout",
)

_REQUIRED_KEYS = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")
_WANTED = (
    "Blended Diffusion needs OpenAI's guided-diffusion checkpoint 256x256_diffusion_uncond.pt "
    "(or 256x256_diffusion.pt / 512x512_diffusion.pt) from https://github.com/openai/guided-diffusion; "
    "put it in the guided-diffusion models folder"
)


def unet_config_from_original_kwargs(kwargs: Mapping[str, Any]) -> UNetConfig:
    """Turn the original ``create_model_and_diffusion`` kwargs (e.g. a config.json) into a :class:`UNetConfig`.

    Missing keys take the original's ``model_and_diffusion_defaults()``; ``channel_mult`` "" takes the
    original's per-image-size default; ``attention_resolutions`` are image resolutions and become downsample
    rates ``image_size // res``. Keys that only concern the diffusion process are ignored.
    """
    args = {**ORIGINAL_DEFAULTS, **dict(kwargs)}
    try:
        image_size = int(args["image_size"])
        channel_mult = _parse_channel_mult(args["channel_mult"], image_size)
        attention_ds = tuple(image_size // int(res) for res in _split_numbers(args["attention_resolutions"]))
        in_channels = int(args.get("in_channels", 3))
        return UNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=int(args["num_channels"]),
            out_channels=in_channels * (2 if _flag(args, "learn_sigma") else 1),
            num_res_blocks=int(args["num_res_blocks"]),
            attention_resolutions=attention_ds,
            channel_mult=channel_mult,
            num_classes=NUM_IMAGENET_CLASSES if _flag(args, "class_cond") else None,
            use_scale_shift_norm=_flag(args, "use_scale_shift_norm"),
            resblock_updown=_flag(args, "resblock_updown"),
            num_heads=int(args["num_heads"]),
            num_head_channels=int(args["num_head_channels"]),
            num_heads_upsample=int(args["num_heads_upsample"]),
            use_new_attention_order=_flag(args, "use_new_attention_order"),
            dropout=float(args["dropout"]),
        )
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise BlendedInputError(
            f"guided-diffusion model settings are invalid ({exc}); use the keyword arguments of the original "
            "create_model_and_diffusion, e.g. image_size 256, num_channels 256, attention_resolutions \"32,16,8\""
        ) from exc


_TRUE = ("true", "yes", "t", "y", "1")
_FALSE = ("false", "no", "f", "n", "0")


def _flag(args: Mapping[str, Any], name: str) -> bool:
    """A yes/no setting: a JSON boolean, 0/1, or a word the original's command line takes ("true", "False"...).
    Python's bool() would make the string "false" true: a wrong attention order still loads, silently."""
    value = args[name]
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, not {value!r}")


def predicts_noise(kwargs: Mapping[str, Any]) -> bool:
    """Whether a model of these settings predicts the noise (guided-diffusion's default, every OpenAI release), the
    only kind the sampler reads; ``predict_xstart`` models predict the clean image instead."""
    return "predict_xstart" not in kwargs or not _flag(kwargs, "predict_xstart")


def _split_numbers(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [part for part in re.split(r"[,\s]+", str(value)) if part]


def _parse_channel_mult(value: Any, image_size: int) -> tuple[float, ...]:
    parts = _split_numbers(value)
    if parts:
        return tuple(float(p) for p in parts)
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise ValueError(
            f"channel_mult \"\" has no default for image_size {image_size} (only {sorted(DEFAULT_CHANNEL_MULT)})"
        )
    return DEFAULT_CHANNEL_MULT[image_size]


def check_guided_diffusion_family(state_dict: Mapping[str, Any], source: Any = None) -> None:
    """Refuse, with a message that names the right file, weights of another model family."""
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(source, f"the file holds no model weights. {_WANTED}.")
    keys = [str(k) for k in state_dict]

    def any_key(pred) -> bool:
        return any(pred(k) for k in keys)

    if any_key(lambda k: k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                                       "conditioner.embedders"))):
        raise CheckpointError(
            source, f"this looks like a Stable Diffusion checkpoint; {_WANTED}. Load Stable Diffusion models "
            "with ComfyUI's own checkpoint loader instead."
        )
    if any_key(lambda k: "transformer_blocks" in k or k.startswith(("down_blocks.", "conv_in.", "double_blocks."))):
        raise CheckpointError(
            source, f"this looks like a latent-diffusion (Stable Diffusion, SDXL, Flux or diffusers) UNet; {_WANTED}."
        )
    if any_key(lambda k: k.startswith(("visual.", "token_embedding.", "text_model.", "vision_model."))) or (
        "logit_scale" in keys
    ):
        raise CheckpointError(
            source, f"this looks like a CLIP model, not a diffusion model; load it with the CLIP loader. {_WANTED}."
        )
    if any_key(lambda k: k.startswith(("encoder.down.", "decoder.up.", "encoder.conv_in."))):
        raise CheckpointError(source, f"this looks like a VAE, not a diffusion model; {_WANTED}.")
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if missing:
        sample = ", ".join(keys[:4])
        hint = ""
        if all(k.startswith("module.") for k in keys):
            hint = " (every key starts with 'module.': re-save the inner model's state_dict)"
        raise CheckpointError(
            source, f"this is not a guided-diffusion UNet: key {missing[0]!r} is missing (found keys like "
            f"{sample}){hint}. {_WANTED}."
        )


def detect_unet_config(
    state_dict: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, source: Any = None
) -> UNetConfig:
    """Recover the architecture from a state dict (values only need ``.shape``: meta tensors work).

    ``overrides`` sets what shapes cannot tell (see :data:`OVERRIDABLE_FIELDS`). The result is checked by
    building the network on the meta device and comparing every key and shape, so a config is only returned
    for weights that will load strictly. ``source`` (usually the file path) is named in errors.
    """
    check_guided_diffusion_family(state_dict, source)
    shapes = {str(k): tuple(v.shape) for k, v in state_dict.items()}
    try:
        config = _config_from_shapes(shapes)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(
            source, f"the guided-diffusion layout is not one this loader understands ({exc}). {_WANTED}."
        ) from exc
    logger.debug("architecture detected from the weights of %s: %s", source or "a state dict", config)
    released = released_checkpoint(config)
    if released is not None:
        logger.debug("%s has the shapes of OpenAI's %s: using its flags %s", source or "the state dict",
                    released.name, dict(released.fields))
        config = dataclasses.replace(config, **released.fields)
    config = apply_overrides(config, overrides)
    missing, unexpected, mismatched = layout_mismatches(config, shapes)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            source, "the weights do not form a guided-diffusion UNet this loader can build "
            f"({describe_mismatches(missing, unexpected, mismatched)}). {_WANTED}."
        )
    return config


@dataclasses.dataclass(frozen=True)
class ReleasedCheckpoint:
    """What OpenAI's flags for one released checkpoint set beyond its shapes."""

    name: str
    fields: Mapping[str, Any]      # UNetConfig fields
    noise_schedule: str


# (model_channels, num_res_blocks, channel_mult, num_classes) -> the flags of the guided-diffusion README.
RELEASED_BY_SHAPE = {
    (192, 3, (1.0, 2.0, 3.0, 4.0), NUM_IMAGENET_CLASSES): ReleasedCheckpoint(
        "64x64_diffusion.pt", {"use_new_attention_order": True, "num_head_channels": 64, "num_heads": 4},
        "cosine"),
    (256, 2, (1.0, 1.0, 2.0, 3.0, 4.0), NUM_IMAGENET_CLASSES): ReleasedCheckpoint(
        "128x128_diffusion.pt", {"use_new_attention_order": False, "num_head_channels": -1, "num_heads": 4},
        "linear"),
}


def released_checkpoint(config: UNetConfig) -> ReleasedCheckpoint | None:
    """The released checkpoint whose shapes ``config`` has, where its flags differ from the defaults."""
    key = (config.model_channels, config.num_res_blocks, tuple(float(m) for m in config.channel_mult),
           config.num_classes)
    return RELEASED_BY_SHAPE.get(key)


def _block_layers(shapes: Mapping[str, tuple], stack: str) -> dict[int, dict[int, set[str]]]:
    """``{block: {layer: {param names}}}`` of ``input_blocks`` / ``output_blocks``."""
    pattern = re.compile(rf"^{stack}\.(\d+)\.(\d+)\.(.+)$")
    blocks: dict[int, dict[int, set[str]]] = {}
    for key in shapes:
        match = pattern.match(key)
        if match:
            block, layer, rest = int(match[1]), int(match[2]), match[3]
            blocks.setdefault(block, {}).setdefault(layer, set()).add(rest)
    return blocks


def _is_attention(params: set[str]) -> bool:
    return "qkv.weight" in params


def _config_from_shapes(shapes: Mapping[str, tuple]) -> UNetConfig:
    model_channels = shapes["time_embed.0.weight"][1]
    in_channels = shapes["input_blocks.0.0.weight"][1]
    out_channels = shapes["out.2.weight"][0]
    num_classes = shapes["label_emb.weight"][0] if "label_emb.weight" in shapes else None

    output_blocks = _block_layers(shapes, "output_blocks")
    if sorted(output_blocks) != list(range(len(output_blocks))) or not output_blocks:
        raise ValueError("output_blocks are not numbered 0..N-1")
    # The last block of every level but the finest ends with an upsampler: that gives blocks per level.
    up_blocks = [
        i for i, layers in sorted(output_blocks.items())
        if any(j >= 1 and not _is_attention(params) for j, params in layers.items())
    ]
    per_level = up_blocks[0] + 1 if up_blocks else len(output_blocks)
    levels = len(output_blocks) // per_level
    if len(output_blocks) % per_level or up_blocks != [per_level * (k + 1) - 1 for k in range(levels - 1)]:
        raise ValueError("the upsampling blocks are not spaced evenly between levels")
    num_res_blocks = per_level - 1

    channel_mult = []
    attention_ds = set()
    for level in range(levels):
        block = (levels - 1 - level) * per_level  # first output block of this level
        width = shapes[f"output_blocks.{block}.0.out_layers.3.weight"][0]
        channel_mult.append(width / model_channels)
        if 1 in output_blocks[block] and _is_attention(output_blocks[block][1]):
            attention_ds.add(2**level)

    first_res = "output_blocks.0.0"
    emb_rows = shapes[f"{first_res}.emb_layers.1.weight"][0]
    use_scale_shift_norm = emb_rows == 2 * shapes[f"{first_res}.out_layers.3.weight"][0]

    resblock_updown = True
    if up_blocks:
        up_params = output_blocks[up_blocks[0]][max(output_blocks[up_blocks[0]])]
        resblock_updown = "in_layers.0.weight" in up_params

    config = UNetConfig(
        image_size=0,
        in_channels=in_channels,
        model_channels=model_channels,
        out_channels=out_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention_ds),
        channel_mult=tuple(channel_mult),
        num_classes=num_classes,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
    )
    return dataclasses.replace(config, image_size=infer_image_size(config))


def infer_image_size(config: UNetConfig) -> int:
    """Best guess of the training resolution, which shapes cannot show.

    Rules, first match wins (each holds for every model OpenAI released and for the original's defaults):

    1. with attention: its finest level sits at 32x32 when there are three or more attention levels (the
       released "32,16,8") and at 16x16 otherwise (the original's defaults "16" and "16,8"), so
       ``image_size = min(ds) * (32 or 16)``;
    2. a channel_mult equal to the original's default for a size (e.g. 1,1,2,2,4,4 -> 256) gives that size;
    3. otherwise the deepest feature map is taken to be 8x8: ``8 * 2 ** (levels - 1)``.
    """
    if config.attention_resolutions:
        finest_res = 32 if len(config.attention_resolutions) >= 3 else 16
        return min(config.attention_resolutions) * finest_res
    for size, mult in DEFAULT_CHANNEL_MULT.items():
        if tuple(config.channel_mult) == mult:
            return size
    return 8 * config.downsample_factor


def apply_overrides(config: UNetConfig, overrides: Mapping[str, Any] | None) -> UNetConfig:
    """Apply user settings for what shapes cannot tell; anything else is refused rather than ignored."""
    if not overrides:
        return config
    unknown = sorted(set(overrides) - set(OVERRIDABLE_FIELDS))
    if unknown:
        raise BlendedInputError(
            f"cannot override {', '.join(unknown)}: the weights fix it. Only {', '.join(OVERRIDABLE_FIELDS)} "
            "can be set."
        )
    casts = {"use_new_attention_order": bool, "dropout": float}
    try:
        values = {k: casts.get(k, int)(v) for k, v in overrides.items()}
    except (TypeError, ValueError) as exc:
        raise BlendedInputError(f"invalid model override {dict(overrides)!r}: {exc}") from exc
    return dataclasses.replace(config, **values)


def expected_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key (in order) and shape the network for ``config`` has; built on the meta device."""
    try:
        with torch.device("meta"):
            model = GuidedDiffusionUNet(config)
    except ValueError as exc:
        raise BlendedInputError(f"the model settings do not fit the weights ({exc}): set the Load Guided Diffusion "
                                "node's head_channels to 0 (auto) or to a divisor of the model's channels, e.g. "
                                "64, and check the settings of a config.json beside the checkpoint") from exc
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def layout_mismatches(
    config: UNetConfig, shapes: Mapping[str, tuple]
) -> tuple[list[str], list[str], list[str]]:
    """Keys missing from, unexpected in, and of the wrong shape in ``shapes`` for ``config``'s network."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = [
        f"{k} {list(shapes[k])} vs {list(expected[k])}"
        for k in expected
        if k in shapes and tuple(shapes[k]) != expected[k]
    ]
    return missing, unexpected, mismatched


def describe_mismatches(missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = 4) -> str:
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", mismatched)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)
