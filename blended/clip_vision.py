"""CLIP's vision tower run for guidance: open_clip's ViT weights and modules, with attention written for speed.

Every guided step sends all views of all results through the vision tower and back (8 views per result).
open_clip's blocks attend through ``nn.MultiheadAttention``, whose general-purpose path, when gradients are on,
copies q, k and v out of the packed projection, selects them one by one (each selection's backward fills a
zero tensor of the packed size and copies into it) and copies the heads back together: about a third of the
tower's ops, and of a 256x256 guided step's, at batch 1 (4,646 aten ops for ViT-B/16's forward and backward).
Here q, k and v are views of the packed projection in the layout ``scaled_dot_product_attention`` reads
directly, as in the UNet's attention; everything else (patch embedding, LayerNorms in their own precision, the
MLP, LayerScale, checkpointing) is the model's own modules, so the weights, dtypes and results are the same.

Only the layout OpenAI's ViTs have is taken (class-token pooling, no attentional pooler, plain residual blocks);
any other tower (ResNet CLIPs, open_clip's custom blocks) runs through open_clip's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cuda_graphs import CHECKPOINT_ARGS
from .devices import runs_triton_kernels

__all__ = ["supports", "encode_image"]


def supports(visual: nn.Module) -> bool:
    """Whether :func:`encode_image` reproduces ``visual``'s forward (an OpenAI-layout open_clip ViT)."""
    if type(visual).__name__ != "VisionTransformer" or getattr(visual, "output_tokens", False):
        return False
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        return False
    if getattr(visual, "global_average_pool", False):  # open_clip 2.x's spelling of average pooling
        return False
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not all(_plain_block(block) for block in blocks):
        return False
    return all(hasattr(visual, name) for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre",
                                                   "ln_post", "proj"))


def _plain_block(block: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
        return False
    return (attn._qkv_same_embed_dim and attn.in_proj_bias is not None and attn.bias_k is None
            and attn.bias_v is None and not attn.add_zero_attn and attn.dropout == 0.0
            and all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")))


def encode_image(visual: nn.Module, images: torch.Tensor, kernels: str | None = None) -> torch.Tensor:
    """[N,3,S,S] normalised images (in the tower's dtype) -> [N,D] image embeddings, as ``visual(images)``.

    ``kernels="triton"`` runs the blocks' LayerNorms and QuickGELU by :mod:`blended.triton_clip` (on CUDA, or
    under Triton's interpreter; elsewhere, and for other norms and activations, the blocks' own modules run).
    """
    x = visual.conv1(images)  # [N, width, grid, grid]
    x = x.flatten(2).transpose(1, 2)  # [N, grid * grid, width]
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x) if hasattr(visual, "patch_dropout") else x
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    if getattr(visual.transformer, "grad_checkpointing", False) and torch.is_grad_enabled():
        for block in blocks:
            x = checkpoint(_block, block, x, kernels, **CHECKPOINT_ARGS)
    else:
        x = _blocks(blocks, x, kernels)
    # Class-token pooling; a LayerNorm acts per token, so normalising only the pooled token is the same.
    pooled = visual.ln_post(x[:, 0])
    return pooled @ visual.proj if visual.proj is not None else pooled


def _block(block: nn.Module, x: torch.Tensor, kernels: str | None = None) -> torch.Tensor:
    x = x + block.ls_1(_self_attention(block.attn, _layer_norm(block.ln_1, x, kernels)))
    return x + block.ls_2(_mlp(block.mlp, _layer_norm(block.ln_2, x, kernels), kernels))


def _blocks(blocks: nn.Module, x: torch.Tensor, kernels: str | None = None) -> torch.Tensor:
    """:func:`_block` over all blocks, each residual sum taken together with the LayerNorm that reads it next (the
    block's second norm, the next block's first), so that the Triton kernels make both in one pass each way
    (:func:`_residual_layer_norm`). Checkpointed blocks keep :func:`_block`'s boundaries."""
    blocks = list(blocks)
    if not blocks:
        return x
    # Each branch's output goes straight into the sum: held in a variable, it would live on into the next
    # branch's peak (the MLP's hidden activations).
    h = _layer_norm(blocks[0].ln_1, x, kernels)
    for block, following in zip(blocks, [*blocks[1:], None], strict=True):
        x, h = _residual_layer_norm(block.ln_2, x, block.ls_1(_self_attention(block.attn, h)), kernels)
        next_norm = following.ln_1 if following is not None else None
        x, h = _residual_layer_norm(next_norm, x, block.ls_2(_mlp(block.mlp, h, kernels)), kernels)
    return x


def _triton(kernels: str | None, x: torch.Tensor) -> bool:
    return kernels == "triton" and runs_triton_kernels(x)


def _layer_norm(norm: nn.Module, x: torch.Tensor, kernels: str | None) -> torch.Tensor:
    if _triton(kernels, x) and _is_affine_layer_norm(norm, x):
        from .triton_clip import layer_norm  # imported only here: Triton is needed only on this path

        return layer_norm(x, norm.weight, norm.bias, norm.eps)
    return norm(x)


def _residual_layer_norm(norm: nn.Module | None, x: torch.Tensor, delta: torch.Tensor,
                         kernels: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x + delta, norm(x + delta))``; ``(x + delta, None)`` where no norm follows (the last block)."""
    if norm is None:
        return x + delta, None
    if _triton(kernels, x) and _is_affine_layer_norm(norm, x) and x.dtype == delta.dtype:
        from .triton_clip import residual_layer_norm

        return residual_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)
    x = x + delta
    return x, norm(x)


def _mlp(mlp: nn.Module, x: torch.Tensor, kernels: str | None) -> torch.Tensor:
    if _triton(kernels, x) and _is_quick_gelu(getattr(mlp, "gelu", None)):
        from .triton_clip import quick_gelu

        return mlp.c_proj(quick_gelu(mlp.c_fc(x)))
    return mlp(x)


def _is_affine_layer_norm(norm: nn.Module, x: torch.Tensor) -> bool:
    """A LayerNorm over the last dimension with weight and bias: open_clip's float32 one (OpenAI's) or its
    plain one; the kernels compute in float32 either way, as both do inside."""
    return (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1 and norm.weight is not None
            and norm.bias is not None and norm.normalized_shape[0] == x.shape[-1])


def _is_quick_gelu(module: nn.Module | None) -> bool:
    """open_clip's QuickGELU (OpenAI's activation), whatever module it is defined in."""
    return module is not None and type(module).__name__ == "QuickGELU" and not list(module.parameters())


def _self_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``attn(x, x, x, need_weights=False)[0]`` for batch-first [N, L, D] tokens, without copies before SDPA."""
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [N, L, 3D], rows [q | k | v], heads inside each
    # Unbound along the packed dimension itself, so that the backward stacks the three gradients straight into
    # the projection's layout; unbound after a permute, the stacked gradient needed one more copy to get there.
    q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, length, 3, heads, width // heads).unbind(2))
    attended = F.scaled_dot_product_attention(q, k, v)  # [N, H, L, D/H]
    attended = attended.transpose(1, 2).reshape(batch, length, width)
    return F.linear(attended, attn.out_proj.weight, attn.out_proj.bias)
