"""The optional LPIPS background-preservation loss of the original's local baseline.

LPIPS needs the ``lpips`` package and torchvision's VGG16 ImageNet weights; the original built it on every run
and downloaded VGG (528 MB) even when unused. Here it is built only when its weight is non-zero, and only from
files already on disk: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os

from .errors import BlendedInputError

VGG16_FILE = "vgg16-397923af.pth"


def vgg16_weights_path() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)


def check_lpips_available() -> None:
    """Refuse, saying what is missing, where LPIPS cannot be loaded: cheap, so a node can ask before any model
    is loaded."""
    if importlib.util.find_spec("lpips") is None:
        raise BlendedInputError("the LPIPS background loss needs the 'lpips' package: `pip install lpips`, or set "
                                "CLIP Guidance's background_lpips_lambda to 0 (the L2 background loss needs nothing "
                                "extra)")
    weights = vgg16_weights_path()
    if not os.path.isfile(weights):
        raise BlendedInputError(f"the LPIPS background loss needs torchvision's VGG16 weights at {weights} "
                                f"({VGG16_FILE}, 528 MB; nothing is downloaded at run time): put the file there, "
                                "or set CLIP Guidance's background_lpips_lambda to 0")


def load_lpips():
    """An LPIPS-VGG module (frozen, eval) or a clear error saying what is missing."""
    check_lpips_available()
    import lpips

    return lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
