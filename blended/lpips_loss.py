"""The optional LPIPS background-preservation loss of the original's local baseline.

LPIPS needs the ``lpips`` package and torchvision's VGG16 ImageNet weights; the original built it on every run
and downloaded VGG (528 MB) even when unused. Here it is built only when its weight is non-zero, and only from
files already on disk: nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import warnings

from .errors import BlendedInputError

VGG16_FILE = "vgg16-397923af.pth"


def vgg16_weights_path() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)


GUIDANCE_WAY_OUT = ("set CLIP Guidance's background_lpips_lambda to 0 (the L2 background loss needs nothing "
                    "extra)")


def check_lpips_available(way_out: str = GUIDANCE_WAY_OUT) -> None:
    """Refuse, saying what is missing, where LPIPS cannot be loaded: cheap, so a node can ask before any model
    is loaded. ``way_out``: how the node asking can do without LPIPS."""
    if importlib.util.find_spec("lpips") is None:
        raise BlendedInputError(f"LPIPS needs the 'lpips' package: `pip install lpips`, or {way_out}")
    weights = vgg16_weights_path()
    if not os.path.isfile(weights):
        raise BlendedInputError(f"LPIPS needs torchvision's VGG16 weights at {weights} ({VGG16_FILE}, 528 MB; "
                                f"nothing is downloaded at run time): put the file there, or {way_out}")


def load_lpips(way_out: str = GUIDANCE_WAY_OUT):
    """An LPIPS-VGG module (frozen, eval, on the CPU; the caller's own copy, to move where it likes) or a clear
    error saying what is missing."""
    check_lpips_available(way_out)
    return copy.deepcopy(_built_lpips())


@functools.lru_cache(maxsize=1)
def _built_lpips():
    """Built once a session: building reads the whole 528 MB VGG16 file to keep its 59 MB of features."""
    import lpips

    with warnings.catch_warnings():
        # lpips asks torchvision for VGG16 by its old `pretrained` flag; the user can do nothing about it.
        warnings.filterwarnings("ignore", message=r"(The parameter 'pretrained'|Arguments other than a weight enum)",
                                category=UserWarning)
        return lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
