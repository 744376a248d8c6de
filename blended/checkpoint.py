"""Safe loading of OpenAI guided-diffusion checkpoints into :class:`~blended.unet.GuidedDiffusionUNet`.

Supported checkpoints (OpenAI's guided-diffusion release, https://github.com/openai/guided-diffusion,
"Download pre-trained models"; the same files are mirrored on the Hugging Face Hub):

* ``256x256_diffusion_uncond.pt``: the unconditional 256x256 ImageNet model Blended Diffusion uses (default);
* ``256x256_diffusion.pt``: the class-conditional 256x256 ImageNet model;
* ``512x512_diffusion.pt``: the class-conditional 512x512 ImageNet model;
* other models of the same family (ADM UNets saved as plain state dicts), e.g. OpenAI's 64x64/128x128 and
  LSUN models, whose architecture is detected from the weights.

Files may be ``.pt``/``.pth``/``.ckpt`` (a plain state dict, read with ``torch.load(weights_only=True)``:
Python objects are never unpickled, so a malicious file cannot run code) or ``.safetensors``. Tensors are
loaded as float32; :meth:`GuidedDiffusionUNet.to_compute_dtype` lowers precision afterwards.

The architecture comes from, in rising precedence: the weights' shapes (:mod:`blended.architecture_detection`), a
``config.json`` (or ``<checkpoint name>.config.json``) beside the file holding the original's
``create_model_and_diffusion`` keyword arguments, and the ``overrides`` argument. Overrides cover only what
the shapes cannot tell:

* ``image_size``: the resolution the model was trained at (256 or 512 for the released files); it is the
  natural working size, not a limit;
* ``num_head_channels``: channels per attention head (default 64, as released); ``-1`` means use
  ``num_heads`` instead;
* ``num_heads``: the head count when ``num_head_channels`` is -1 (default 4);
* ``num_heads_upsample``: the head count in the decoder when ``num_head_channels`` is -1 (-1: ``num_heads``);
* ``use_new_attention_order``: False (default, the released files) for the legacy qkv layout, True for
  models trained with ``QKVAttention``;
* ``dropout``: only matters in training; kept for completeness.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .architecture_detection import (
    ORIGINAL_KWARGS,
    apply_overrides,
    check_guided_diffusion_family,
    describe_mismatches,
    detect_unet_config,
    layout_mismatches,
    predicts_noise,
    released_checkpoint,
    unet_config_from_original_kwargs,
)
from .diffusion import NoiseSchedule
from .errors import BlendedInputError, CheckpointError
from .unet import GuidedDiffusionUNet, UNetConfig

__all__ = ["SAFETENSORS_SUFFIXES", "check_finite", "find_config_file", "load_guided_diffusion", "read_state_dict"]

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # ".sft": the short name ComfyUI also reads as safetensors
CONFIG_FILE_NAME = "config.json"
_SNIFF_BYTES = 512
_REDOWNLOAD = "Download it again (the file is damaged or incomplete)"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a plain state dict from ``.safetensors`` or a PyTorch file, refusing anything else.

    The format is chosen by content rather than extension, so a misnamed file still loads. Every failure
    becomes a :class:`CheckpointError` naming the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found; check the name and that it is in the models folder")
    head = _read_head(path)
    if not head:
        raise CheckpointError(path, f"the file is empty. {_REDOWNLOAD}.")
    refuse_text(path, head)
    if _looks_like_safetensors(head) or (path.suffix.lower() in SAFETENSORS_SUFFIXES and not _looks_like_torch(head)):
        loaded: Any = _read_safetensors(path)
    else:
        loaded = _read_torch(path)
    return as_state_dict(path, loaded)


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(_SNIFF_BYTES)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc}); check its permissions") from exc


def refuse_text(path: Path, head: bytes) -> None:
    """Refuse a file whose first bytes are a Git LFS pointer, a web page or other text instead of weights
    (shared with the model download script)."""
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            path, "this is a Git LFS pointer, not the weights; fetch the real file (git lfs pull) or download it "
            "directly"
        )
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        raise CheckpointError(path, "this is a web page, not model weights: the download saved an HTML page. "
                                    "Download the checkpoint file itself.")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return
    if _looks_like_safetensors(head):
        return
    if all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        raise CheckpointError(path, "this is a text file, not model weights. Download the checkpoint file itself.")


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON header.
    return len(head) >= 9 and head[8:9] == b"{"


def _looks_like_torch(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types and OSError/ValueError variants
        raise CheckpointError(path, f"cannot be read as safetensors ({exc}). {_REDOWNLOAD}.") from exc


def _read_torch(path: Path) -> Any:
    try:
        # An open file, not the path: torch >= 2.10 hands a path ending in .safetensors to safetensors whatever the
        # file holds, so a .pt renamed .safetensors would fail with safetensors' "header too large".
        with path.open("rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "weights_only" in message.lower() or "weights only" in message.lower():
            raise CheckpointError(
                path, "refused: the file contains Python objects, not just tensors; only plain state dicts are "
                "loaded. Use the official checkpoint, or re-save its state_dict with torch.save/safetensors."
            ) from exc
        raise CheckpointError(path, f"not a PyTorch checkpoint ({message}). {_REDOWNLOAD}.") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as exc:
        raise CheckpointError(path, f"cannot be read as a PyTorch checkpoint ({exc}). {_REDOWNLOAD}.") from exc


def as_state_dict(path: str | os.PathLike, loaded: Any) -> dict[str, torch.Tensor]:
    """``loaded`` (a file's contents, however read) as a plain state dict of named tensors, or a
    :class:`CheckpointError` saying what the file holds instead."""
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(path, f"holds a {type(loaded).__name__}, not a state dict of named tensors")
    if set(loaded) == {"state", "param_groups"}:
        raise CheckpointError(
            path, "this is an optimizer's state, not model weights (training saves it beside the model, as "
            "guided-diffusion's opt<step>.pt). Load the model file instead: model<step>.pt, or ema_<rate>_<step>.pt "
            "for the EMA weights.")
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            path, f"is not a plain state dict: {', '.join(not_tensors[:4])} hold(s) no tensor. Save "
            "model.state_dict() alone."
        )
    return {str(k): v for k, v in loaded.items()}


def find_config_file(path: str | os.PathLike | None) -> Path | None:
    """The config beside a checkpoint: ``<name>.config.json`` first (one per file), then ``config.json``."""
    if path is None:
        return None
    path = Path(path)
    for candidate in (path.with_name(path.stem + ".config.json"), path.with_name(CONFIG_FILE_NAME)):
        if candidate.is_file():
            return candidate
    return None


def _config_from_file(config_path: Path) -> tuple[UNetConfig, NoiseSchedule] | None:
    try:
        # From bytes, so that JSON's own encoding detection reads what Windows editors save: UTF-8 with a BOM
        # (Notepad) and UTF-16 (PowerShell's redirection).
        kwargs = json.loads(config_path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(config_path, f"cannot be read as JSON ({exc}); fix or remove it") from exc
    if not isinstance(kwargs, dict) or "num_channels" not in kwargs:
        # Probably some other model's config sharing the folder: detection from the weights still works.
        logger.warning("Blended Diffusion: ignoring %s: it holds no guided-diffusion create_model arguments",
                       config_path)
        return None
    _check_setting_names(config_path, kwargs)
    try:
        if not predicts_noise(kwargs):
            raise BlendedInputError(
                "predict_xstart is true: this model predicts the clean image, and the sampler reads a model's "
                "output as the noise (as OpenAI's released models are trained), so its edits would be wrong. Use a "
                "model trained to predict the noise (guided-diffusion's default), or set predict_xstart to false "
                "if the config.json is wrong about it.")
        return unet_config_from_original_kwargs(kwargs), NoiseSchedule.from_original_kwargs(kwargs)
    except (BlendedInputError, ValueError) as exc:
        raise CheckpointError(config_path, str(exc)) from exc


def _check_setting_names(config_path: Path, kwargs: Mapping[str, Any]) -> None:
    """Refuse a misspelt setting (it would be ignored, and its default silently used: a wrong head split or
    schedule still loads); name the other unknown ones in the log, as settings of some other script."""
    unknown = [str(key) for key in kwargs if key not in ORIGINAL_KWARGS]
    by_lower = {name.lower(): name for name in ORIGINAL_KWARGS}
    for key in unknown:
        near = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.85)
        if near:
            raise CheckpointError(
                config_path, f"unknown setting {key!r}: did you mean {by_lower[near[0]]!r}? As written it would be "
                "ignored and its default used. Fix its name, or remove the config.json to read the architecture "
                "from the weights.")
    if unknown:
        logger.warning("Blended Diffusion: %s: ignoring %s, which %s not guided-diffusion model settings",
                       config_path, ", ".join(repr(k) for k in unknown), "is" if len(unknown) == 1 else "are")


def check_finite(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike | None) -> None:
    """Refuse weights holding NaN or infinity: they load without complaint but turn every image black.

    One ``isfinite`` reduction per tensor, at load only.
    """
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                path, f"the weights are damaged: {name} contains NaN or infinite values, so every image would "
                f"come out black. {_REDOWNLOAD}; if it was converted or fine-tuned, redo that from the original.")


def load_guided_diffusion(
    path: str | os.PathLike | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[GuidedDiffusionUNet, UNetConfig]:
    """Build a float32, eval-mode, frozen UNet on the CPU and load the weights strictly.

    ``state_dict`` lets a caller that already read the file (ComfyUI's ``load_torch_file``) skip reading;
    ``path`` is then used for messages and for finding a config.json.
    """
    if state_dict is None:
        if path is None:
            raise BlendedInputError("load_guided_diffusion needs a checkpoint path or a state dict")
        state_dict = read_state_dict(path)
    check_guided_diffusion_family(state_dict, path)

    config_path = find_config_file(path)
    from_file = _config_from_file(config_path) if config_path is not None else None
    config, schedule = from_file if from_file is not None else (None, NoiseSchedule())
    if config is None:
        config = detect_unet_config(state_dict, overrides, source=path)
        released = released_checkpoint(config)
        if released is not None:
            schedule = NoiseSchedule(released.noise_schedule)
    else:
        logger.debug("using the architecture in %s", config_path)
        config = apply_overrides(config, overrides)

    shapes = {str(k): tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected, mismatched = layout_mismatches(config, shapes)
    if missing or unexpected or mismatched:
        # A config.json beside the file that was ignored (another model's) did not make this architecture.
        from_config = from_file is not None
        where = f" (architecture from {config_path})" if from_config else ""
        advice = "Use an unmodified guided-diffusion checkpoint"
        if from_config:
            advice += ", or fix/remove the config.json beside it"
        if from_config and config_path.name == CONFIG_FILE_NAME and path is not None:
            # A folder's config.json applies to every checkpoint in it; one named after a file, to that file only.
            advice += (f"; a config.json written for another checkpoint in this folder can be renamed to "
                       f"<that checkpoint's name>.config.json (e.g. {Path(path).stem}.config.json for this one) so "
                       "that it applies to that file only")
        raise CheckpointError(
            path, f"the weights do not match the model{where}: {describe_mismatches(missing, unexpected, mismatched)}. "
            f"{advice}."
        )
    check_finite(state_dict, path)

    # Guidance differentiates through the model, so its weights must be ordinary tensors even when the caller
    # (ComfyUI) runs under inference mode and handed us inference tensors: build outside it and clone those.
    with torch.inference_mode(False):
        with torch.device("meta"):
            model = GuidedDiffusionUNet(config)
        # assign=True adopts the loaded tensors instead of copying them into randomly initialised ones.
        tensors = {}
        for k, v in state_dict.items():
            v = v.detach().to(device="cpu", dtype=torch.float32)
            tensors[k] = v.clone() if v.is_inference() else v
        try:
            model.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(path, f"the weights could not be loaded: {exc}") from exc
        model.eval().requires_grad_(False)
    # The schedule the weights were trained with (config.json's noise_schedule; linear without one), for the
    # sampler to build its diffusion from.
    model.noise_schedule = schedule
    logger.debug("loaded guided-diffusion UNet from %s: %s, %s schedule", path or "a state dict", config,
                schedule.name)
    return model, config
