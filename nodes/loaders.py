"""Loader nodes: the guided-diffusion UNet and the guidance CLIP, each from its own model folder."""

from __future__ import annotations

import logging
import os

import torch

from ..blended.checkpoint import SAFETENSORS_SUFFIXES, load_guided_diffusion
from ..blended.clip_model import load_guidance_clip
from . import comfy_bridge as bridge
from .model_folders import (
    CLIP_GUIDANCE_FOLDER,
    GUIDED_DIFFUSION_FOLDER,
    checkpoint_stamp,
    missing_model_message,
    model_file_list,
    model_file_path,
)

log = logging.getLogger(__name__)
CATEGORY = "BlendedDiffusion/loaders"


class LoadGuidedDiffusionModel:
    DESCRIPTION = ("Loads an OpenAI guided-diffusion UNet (256x256_diffusion_uncond.pt, the model Blended "
                   "Diffusion uses; or the class-conditional 256x256_diffusion.pt / 512x512_diffusion.pt) from "
                   "models/guided_diffusion. The architecture is read from the weights; a config.json beside "
                   "the file wins over detection, the widgets below win over both. The weights stay as released "
                   "(float32); precision and the other speed options are the Speed node's, per run.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDED_DIFFUSION_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The diffusion UNet, managed by ComfyUI's model memory manager.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (model_file_list(GUIDED_DIFFUSION_FOLDER), {
                    "tooltip": "Checkpoint in models/guided_diffusion (.pt state dict or .safetensors)."}),
                "attention_order": (["auto", "legacy", "new"], {
                    "default": "auto",
                    "tooltip": "Layout of the attention qkv weights. OpenAI's released checkpoints use "
                               "'legacy' (auto picks config.json's value, else a recognised OpenAI release's, "
                               "else legacy)."}),
                "head_channels": ("INT", {
                    "default": 0, "min": 0, "max": 1024, "step": 1,
                    "tooltip": "Channels per attention head; 0 = auto (config.json, else a recognised OpenAI "
                               "release's, else 64 as the 256x256 checkpoint)."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        # In place of ComfyUI's "value not in list": a missing checkpoint is refused at queue time with where it
        # goes and how to fetch it.
        return missing_model_message(GUIDED_DIFFUSION_FOLDER, model_name) or True

    @classmethod
    def IS_CHANGED(cls, model_name, **_):
        """The checkpoint's and its config.json's sizes and times, so a config added or edited beside the file
        (which wins over detection) is read on the next queue instead of after a restart."""
        return checkpoint_stamp(GUIDED_DIFFUSION_FOLDER, model_name)

    def load(self, model_name, attention_order="auto", head_channels=0):
        path = model_file_path(GUIDED_DIFFUSION_FOLDER, model_name)
        overrides = {}
        if attention_order != "auto":
            overrides["use_new_attention_order"] = attention_order == "new"
        if head_channels:
            overrides["num_head_channels"] = int(head_channels)
        state_dict = bridge.load_state_dict(path)
        with torch.inference_mode(False):
            unet, config = load_guided_diffusion(path=path, state_dict=state_dict, overrides=overrides or None)
        del state_dict
        log.info("Blended Diffusion: loaded %s (%d px, %s schedule)", model_name, config.image_size,
                 unet.noise_schedule.name)
        return (bridge.GuidedDiffusionModel(bridge.make_patcher(unet), unet, os.path.basename(model_name)),)


ACTIVATIONS = ["quick_gelu", "gelu"]


class LoadGuidanceCLIP:
    DESCRIPTION = ("Loads the CLIP model that guides and ranks edits (the original uses ViT-B/16) from "
                   "models/clip_guidance: open_clip checkpoints (.safetensors/.bin) or OpenAI's ViT-B-16.pt. "
                   "The architecture is read from the weights; nothing is downloaded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDANCE_CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("CLIP for guidance and ranking, managed by ComfyUI's model memory manager.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_name": (model_file_list(CLIP_GUIDANCE_FOLDER), {
                    "tooltip": "CLIP weights in models/clip_guidance: ViT-B-16.safetensors (open_clip's ViT-B-16 "
                               "OpenAI weights; scripts/download_models.py fetches it)."}),
                "dtype": (bridge.DTYPE_CHOICES, {
                    "default": "auto",
                    "tooltip": "Precision of CLIP's convolution, linear and attention weights. auto = float16 "
                               "where ComfyUI uses it (as the original), else bfloat16 where ComfyUI uses that, "
                               "float32 on CPU. As in OpenAI's loader, "
                               "LayerNorms and embeddings stay float32; embeddings are compared in float32."}),
            },
            # Optional, so prompts saved before it existed still run (with OpenAI's activation, as then).
            "optional": {
                "activation": (ACTIVATIONS, {
                    "default": "quick_gelu",
                    "tooltip": "The MLP activation the CLIP was trained with, which its weights cannot show. "
                               "quick_gelu: OpenAI's weights (the original's ViT-B/16), and open_clip models "
                               "named '-quickgelu' (e.g. MetaCLIP, DFN). gelu: the other open_clip models (e.g. "
                               "LAION, DataComp). The wrong one still loads, but scores and steers worse."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name):
        return missing_model_message(CLIP_GUIDANCE_FOLDER, clip_name) or True

    @classmethod
    def IS_CHANGED(cls, clip_name, **_):
        """The file's size and time, as for the UNet: a CLIP replaced under the same name (a download finished
        or redone) is read on the next queue instead of after a restart."""
        return checkpoint_stamp(CLIP_GUIDANCE_FOLDER, clip_name)

    def load(self, clip_name, dtype="auto", activation="quick_gelu"):
        path = model_file_path(CLIP_GUIDANCE_FOLDER, clip_name)
        device = bridge.mm.get_torch_device()
        compute_dtype = bridge.resolve_dtype(dtype, device)
        with torch.inference_mode(False):
            quick_gelu = activation == "quick_gelu"
            if path.lower().endswith(SAFETENSORS_SUFFIXES):
                clip = load_guidance_clip(path=path, state_dict=bridge.load_state_dict(path), quick_gelu=quick_gelu)
            else:
                # .pt may be OpenAI's TorchScript archive, which the library reads itself, safely (as it reads a
                # file whose name does not say what it holds, by its content).
                clip = load_guidance_clip(path=path, quick_gelu=quick_gelu)
            if compute_dtype != torch.float32:
                # OpenAI's scheme: conv/linear/attention weights in low precision, norms and embeddings float32.
                clip.to(dtype=compute_dtype)
        return (bridge.GuidanceClipModel(bridge.make_patcher(clip.model), clip, os.path.basename(clip_name)),)
