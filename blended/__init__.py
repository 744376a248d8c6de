"""Blended Diffusion (Avrahami, Lischinski, Fried, CVPR 2022) as a pure PyTorch library.

Nothing here imports ComfyUI: the node adapters in ``nodes/`` are thin wrappers over this package, so the
algorithm can be tested and benchmarked on its own. Submodules are imported lazily by their users to keep
import time low.
"""
