"""Turn captured intermediate predictions into one IMAGE batch for previewing the denoising process.

The original saves ``pred_xstart`` of every step as a video frame; in ComfyUI the natural container is an
IMAGE batch, which preview, save and video nodes all accept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import BlendedInputError
from .image_io import from_model_range


def frames_to_image_batch(frames: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack T captured ``[B,3,S,S]`` frames in [-1,1] into a ComfyUI IMAGE ``[B*T,S,S,3]`` in 0..1.

    Order is sample-major: all T frames of sample 0 in time order, then all of sample 1, and so on (index
    ``b * T + t``). Each sample's frames are thus contiguous, so a video or image-grid node shows one sample's
    denoising as an uninterrupted sequence. Values are clamped, since pred_xstart is not clamped while sampling.
    """
    if len(frames) == 0:
        raise BlendedInputError(
            "no intermediate frames were captured; set capture_every to a value between 1 and the number of "
            "steps"
        )
    first_shape = tuple(frames[0].shape)
    if len(first_shape) != 4:
        raise ValueError(f"frames must be [B,C,H,W], got shape {first_shape}")
    for index, frame in enumerate(frames):
        if tuple(frame.shape) != first_shape:
            raise ValueError(f"frame {index} has shape {tuple(frame.shape)}, expected {first_shape} like frame 0")
    batch, channels, height, width = first_shape
    # Filled one frame at a time: many results' frames are large, and stacking, converting and reordering them
    # whole would hold three copies at once.
    images = torch.empty(batch, len(frames), height, width, channels)
    for step, frame in enumerate(frames):
        images[:, step] = from_model_range(frame.detach().to(torch.float32)).movedim(1, -1)
    return images.reshape(batch * len(frames), height, width, channels)
