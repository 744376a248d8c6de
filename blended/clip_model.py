"""The CLIP model that guides and ranks edits, built from local weight files only.

The original loads OpenAI's ViT-B/16 through the ``clip`` package, which downloads it. Here the user points
at a file they already have; the architecture is read off the weights (open_clip's builder for the OpenAI
layout), so any OpenAI-style CLIP (ViT or ResNet, any size) works and nothing is fetched at run time.

Accepted files:
- plain state dicts in the OpenAI layout (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)``,
  or ``.safetensors``); open_clip's checkpoints of OpenAI-architecture models use the same key names,
  possibly wrapped as ``{"state_dict": ...}`` and/or prefixed with ``module.``;
- OpenAI's own TorchScript archives (``ViT-B-16.pt``): their tensors are read with torch's weights-only
  unpickler, with every TorchScript class replaced by an inert placeholder, so no code in the archive runs.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickletools
import zipfile
from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from . import clip_vision
from .errors import BlendedInputError, CheckpointError

log = logging.getLogger(__name__)

# CLIP's training normalisation (OpenAI's preprocess), applied to images in [0,1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = 77
TEXT_CACHE_SIZE = 64

# Keys every OpenAI-layout CLIP has; checked before building so a wrong file gets a clear message instead of
# a KeyError from deep inside the builder.
_REQUIRED_KEYS = ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight")
_VISION_KEYS = ("visual.proj", "visual.attnpool.positional_embedding")
# Non-parameter tensors TorchScript archives carry as attributes; the built model makes its own.
_SCRIPT_ONLY_SUFFIXES = ("attn_mask",)
_EXPECTED = ("an OpenAI-layout CLIP state dict (e.g. OpenAI's ViT-B-16.pt, or open_clip's "
             "'ViT-B-16' openai weights as open_clip_pytorch_model.bin / .safetensors)")


# --------------------------------------------------------------------------------------------- file reading
# Plain state dicts go through blended.checkpoint.read_state_dict (shared with the UNet loader: format
# sniffing, text/HTML/LFS-pointer refusals, weights-only torch.load). Only TorchScript archives, which it
# refuses, are handled here.

def _is_torchscript_archive(archive: zipfile.ZipFile) -> bool:
    names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names)


def _first_line(exc: Exception) -> str:
    """torch's unpickling errors run to many lines of advice that does not apply here; keep the gist."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _read_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from .checkpoint import read_state_dict

    path = os.fspath(path)
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                if _is_torchscript_archive(archive):
                    return _read_torchscript_tensors(path, archive)
        except zipfile.BadZipFile as exc:
            raise CheckpointError(path, f"the zip archive is damaged ({exc}); download the file again.") from exc
    return read_state_dict(path)


class _ScriptObject:
    """Inert stand-in for a TorchScript class: it only records the attribute dict it is given."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickletools.pickle.UnpicklingError("unexpected TorchScript object state")
        self.attributes = state


def _read_torchscript_tensors(path: str, archive: zipfile.ZipFile) -> dict:
    """Named tensors of a TorchScript archive, without running any of its code.

    ``data.pkl`` describes the module tree as ``__torch__.*`` objects whose state dicts hold parameters. We
    list those class names with pickletools (no execution), allow exactly those names in torch's weights-only
    unpickler, mapped to :class:`_ScriptObject`, and serve tensor storages from the archive ourselves.
    """
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(path, "this TorchScript archive has no single data.pkl; it is damaged or not a "
                                    "CLIP model. Use open_clip's .safetensors weights instead.")
    prefix = pickles[0][: -len("data.pkl")]
    try:
        from torch._weights_only_unpickler import Unpickler
    except ImportError as exc:  # private torch module: refuse rather than fall back to unsafe unpickling
        raise CheckpointError(path, "this torch version cannot read TorchScript archives safely; convert the "
                                    "file to a state dict (.safetensors), e.g. use open_clip's ViT-B-16 "
                                    "openai .safetensors weights.") from exc
    data = archive.read(pickles[0])
    try:
        script_classes = {f"{mod_name.split(' ')[0]}.{mod_name.split(' ')[1]}"
                          for op, mod_name, _ in pickletools.genops(data)
                          if op.name == "GLOBAL" and mod_name.startswith("__torch__.")}
    except Exception as exc:
        raise CheckpointError(path, f"damaged TorchScript archive ({exc}); re-download it.") from exc

    storages: dict = {}

    class _ArchiveUnpickler(Unpickler):
        def persistent_load(self, pid):
            _, storage_type, key, _location, _numel = pid
            if key not in storages:
                raw = bytearray(archive.read(f"{prefix}data/{key}"))
                untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
                storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype,
                                                           _internal=True)
            return storages[key]

    allowed = [(_ScriptObject, name) for name in sorted(script_classes)]
    try:
        with torch.serialization.safe_globals(allowed):
            root = _ArchiveUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except Exception as exc:
        raise CheckpointError(path, f"cannot read this TorchScript archive safely ({_first_line(exc)}). "
                                    "Convert it to a .safetensors state dict or use open_clip's weights.") from exc
    tensors: dict[str, torch.Tensor] = {}
    _collect_script_tensors(root, "", tensors)
    return tensors


def _collect_script_tensors(obj, prefix: str, out: dict) -> None:
    if not isinstance(obj, _ScriptObject):
        return
    for name, value in getattr(obj, "attributes", {}).items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            if not name.endswith(_SCRIPT_ONLY_SUFFIXES):
                out[key] = value
        elif isinstance(value, _ScriptObject):
            _collect_script_tensors(value, key + ".", out)


# ------------------------------------------------------------------------------------------ state dict checks

def _unwrap_state_dict(raw, path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside the common checkpoint wrappers."""
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise CheckpointError(path, f"holds a {type(raw).__name__}, not a state dict. Expected {_EXPECTED}.")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _check_is_clip(sd: Mapping[str, torch.Tensor], path) -> None:
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in sd):
        raise CheckpointError(path, "this is a guided-diffusion UNet, not CLIP. Load it with the guided-diffusion "
                                    f"model loader, and give the CLIP loader {_EXPECTED}.")
    missing = [k for k in _REQUIRED_KEYS if k not in sd]
    if not any(k in sd for k in _VISION_KEYS):
        missing.append("visual.proj (ViT) or visual.attnpool.* (ResNet)")
    if missing:
        hint = ""
        if any(k.startswith(("text.", "vision_model.", "text_model.")) for k in sd):
            hint = (" It looks like a Hugging Face (transformers) CLIP, as ComfyUI's models/clip and "
                    "models/clip_vision files are, or an open_clip model with its own text tower; neither can guide "
                    "here. Use open_clip's OpenAI-layout weights of the model instead (for the original's ViT-B/16, "
                    "scripts/download_models.py fetches ViT-B-16.safetensors into models/clip_guidance).")
        raise CheckpointError(path, f"not an OpenAI-layout CLIP: missing {', '.join(missing)}.{hint} "
                                    f"Expected {_EXPECTED}.")


def _build_open_clip(sd: dict[str, torch.Tensor], path, quick_gelu: bool) -> nn.Module:
    from open_clip.model import build_model_from_openai_state_dict

    floating = {k: v for k, v in sd.items() if v.is_floating_point()}
    try:
        # The builder loads into fp16 parameters (OpenAI's layout); fp32 and bf16 files are reloaded below at full
        # precision so nothing is rounded (bf16's range is fp32's: through fp16, small weights lose digits and
        # large ones become infinite). cast_dtype=float16 gives LayerNorms that compute in float32 whatever
        # their input, as OpenAI's do, so the low-precision scheme of ``set_precision`` can keep them in float32.
        model = build_model_from_openai_state_dict(dict(sd), quick_gelu=quick_gelu, cast_dtype=torch.float16)
        model = model.float()
        if any(v.dtype != torch.float16 for v in floating.values()):
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()
                                   if k not in ("input_resolution", "context_length", "vocab_size")})
    except (KeyError, RuntimeError, AssertionError, ValueError, IndexError) as exc:
        raise CheckpointError(path, f"the weights do not form a consistent CLIP model ({exc}). "
                                    f"Expected {_EXPECTED}; the file may be incomplete.") from exc
    model.eval()
    model.requires_grad_(False)
    return model


_LOW_PRECISION_PARAMETERS = ("text_projection", "proj")
_ATTENTION_TENSORS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                      "bias_k", "bias_v")


def set_precision(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Put ``model`` in ``dtype`` the way OpenAI's CLIP loader does (``convert_weights``), in place.

    Low precision (float16/bfloat16) goes only to the convolution, linear and attention weights and the
    text/image projections; LayerNorms, embeddings, class and positional embeddings and the logit scale stay
    float32 (OpenAI ships and runs ViT-B/16 this way on the GPU). ``torch.float32`` makes everything float32.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise BlendedInputError(f"CLIP runs in float32, float16 or bfloat16, not {dtype}.")
    model.float()
    if dtype == torch.float32:
        return model
    for module in model.modules():
        tensors = []
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            tensors += [module.weight, module.bias]
        if isinstance(module, nn.MultiheadAttention):
            tensors += [getattr(module, name, None) for name in _ATTENTION_TENSORS]
        tensors += [getattr(module, name, None) for name in _LOW_PRECISION_PARAMETERS
                    if isinstance(getattr(module, name, None), nn.Parameter)]
        for tensor in tensors:
            if tensor is not None:
                tensor.data = tensor.data.to(dtype)
    return model


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype images enter the vision tower in: its first convolution's (OpenAI's ``CLIP.dtype``)."""
    conv = getattr(getattr(model, "visual", None), "conv1", None)
    if isinstance(conv, nn.Conv2d):
        return conv.weight.dtype
    return next(model.parameters()).dtype


def _image_size_of(model: nn.Module) -> int:
    size = getattr(model.visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size)


# ------------------------------------------------------------------------------------------------ tokenizer

@functools.lru_cache(maxsize=1)
def _bpe_tokenizer():
    """open_clip's BPE tokenizer; its vocabulary ships inside the open_clip package (no network)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CONTEXT_LENGTH)


# ------------------------------------------------------------------------------------------------ the model

class GuidanceCLIP:
    """A frozen CLIP plus what guidance needs around it: tokenizer, normalisation, text-embedding cache.

    ``model`` is the bare ``nn.Module`` so that a host (ComfyUI's ModelPatcher) can move it between devices;
    every method therefore follows the model's current device rather than remembering one.
    """

    def __init__(self, model: nn.Module, image_size: int, context_length: int = CONTEXT_LENGTH):
        self.model = model
        self.image_size = int(image_size)
        self.context_length = int(context_length)
        self.mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self._text_cache: OrderedDict = OrderedDict()
        # mean and std per (device, dtype) of the images: a host that moves only ``model`` (ComfyUI's model
        # manager) must not cost two host-to-device copies in every guided step.
        self._normalisation: dict = {}
        self._vision_supported = None  # (vision tower, whether blended.clip_vision runs it), checked once
        # The image tower replayed from CUDA graphs, set on a run's clone only (fast_paths, cuda_graphs option).
        self.graphed_tower = None
        # "triton": the vision blocks' LayerNorms and QuickGELU by blended.triton_clip (the triton_clip option).
        self.kernels: str | None = None

    # -- placement
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the convolution and linear weights (norms may stay float32)."""
        return _compute_dtype(self.model)

    def to(self, device=None, dtype=None) -> "GuidanceCLIP":
        """Move to ``device``; ``dtype`` converts with OpenAI's scheme (see :func:`set_precision`)."""
        if dtype is not None:
            set_precision(self.model, dtype)
        self.model.to(device=device)
        self.mean = self.mean.to(device=device)
        self.std = self.std.to(device=device)
        return self

    # -- text
    def tokenize(self, prompts: list[str], truncate: bool = True) -> torch.Tensor:
        """[N, context_length] BPE tokens; over-long prompts are cut (with a warning) or refused."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokenizer = _bpe_tokenizer()
        for prompt in prompts:
            count = len(tokenizer.encode(prompt)) + 2  # + start and end markers
            if count > self.context_length:
                shown = repr(prompt[:60]) + ("..." if len(prompt) > 60 else "")
                if not truncate:
                    raise BlendedInputError(
                        f"the prompt {shown} has {count} tokens but CLIP's limit is "
                        f"{self.context_length} (including start/end markers): shorten it, split it into weighted "
                        "parts with '|' (each part has its own limit), or turn CLIP Guidance's "
                        "truncate_long_prompts on to cut it")
                log.warning("Blended Diffusion: the prompt %s has %d tokens and CLIP reads only the first %d; "
                            "the rest is ignored. Shorten it, or split it into weighted parts with '|' (each part "
                            "has its own limit).", shown, count, self.context_length)
        return tokenizer(list(prompts), context_length=self.context_length)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device)).float()

    def text_embedding(self, prompt: str) -> torch.Tensor:
        """[1,D] float32 embedding of one prompt, cached (LRU) because every step of an edit reuses it.

        Computed and copied outside inference mode, so the result is an ordinary tensor that may enter an
        autograd graph even when the caller runs under ComfyUI's ``torch.inference_mode()``.
        """
        key = (prompt, str(self.device), str(self.dtype))
        with torch.inference_mode(False), torch.no_grad():
            cached = self._text_cache.get(key)
            if cached is None:
                cached = self.encode_text(self.tokenize([prompt])).detach().clone()
                self._text_cache[key] = cached
                while len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
            else:
                self._text_cache.move_to_end(key)
            return cached.clone()

    # -- images
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> CLIP's input normalisation."""
        key = (images.device, images.dtype)
        constants = self._normalisation.get(key)
        if constants is None:
            # Made outside inference mode: the division saves ``std`` for the backward of a guided step.
            with torch.inference_mode(False):
                constants = (self.mean.to(device=images.device, dtype=images.dtype),
                             self.std.to(device=images.device, dtype=images.dtype))
            self._normalisation[key] = constants
        mean, std = constants
        return (images - mean) / std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised [N,3,S,S] images -> [N,D] float32 embeddings (differentiable w.r.t. the images).

        OpenAI-layout ViTs run through :mod:`blended.clip_vision` (the same modules and weights, attention
        without the copies of ``nn.MultiheadAttention``); other towers through open_clip's ``encode_image``.
        """
        images = images.to(device=self.device, dtype=self.dtype)
        tower = self.graphed_tower if self.graphed_tower is not None else self.image_tower()
        return tower(images).float()

    def image_tower(self):
        """The function from prepared images to embeddings (in the tower's dtype) that :meth:`encode_image` runs."""
        visual = self.model.visual
        checked = getattr(self, "_vision_supported", None)
        if checked is None or checked[0] is not visual:
            checked = self._vision_supported = (visual, clip_vision.supports(visual))
        if checked[1]:
            return functools.partial(clip_vision.encode_image, visual,
                                     kernels=getattr(self, "kernels", None))
        return self.model.encode_image


def load_guidance_clip(path: str | os.PathLike | None = None, state_dict: Mapping | None = None, *,
                       quick_gelu: bool = True) -> GuidanceCLIP:
    """Build a frozen float32 CPU CLIP from a local file or an in-memory state dict (or both: see below).

    Builds in the caller's grad/inference context: a ComfyUI node must call this inside
    ``torch.inference_mode(False)`` so the weights can take part in autograd later. ``quick_gelu`` must be
    True for OpenAI-trained weights (the original's); False only for open_clip models trained with GELU
    (e.g. LAION weights), which the weights alone cannot reveal.
    """
    if path is None and state_dict is None:
        raise BlendedInputError("give a CLIP weight file path or a state dict.")
    # With both, the state dict is what the caller already read (e.g. with ComfyUI's loader); the path only
    # names the file in messages.
    raw = state_dict if state_dict is not None else _read_weight_file(path)
    sd = _unwrap_state_dict(raw, path)
    _check_is_clip(sd, path)
    from .checkpoint import check_finite

    check_finite(sd, path)
    model = _build_open_clip(sd, path, quick_gelu)
    clip = GuidanceCLIP(model, _image_size_of(model), int(sd["positional_embedding"].shape[0]))
    log.info("Blended Diffusion: loaded CLIP (%d px, embedding %d) from %s", clip.image_size,
             int(sd["text_projection"].shape[1]), path if path is not None else "a state dict")
    return clip
