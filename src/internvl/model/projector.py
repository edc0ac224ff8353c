"""From ViT patch features to LLM tokens: pixel shuffle merges each r x r block of patches into one token, then
the `mlp1` projector maps it to the LLM's width. Shapes and key names are the official InternVL ones."""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """Merge each r x r block of a patch grid into one token, r = 1 / scale_factor: [N, W, H, C] ->
    [N, W/r, H/r, C*r*r].

    Token (i, j) holds the block's patches (r*i + p, r*j + q) in row-major (p, q) order, channels concatenated.
    `ps_version="v1"` is the original InternVL's variant, which returns that grid transposed ([N, H/r, W/r, ...]);
    checkpoints trained with it need it, so it is kept as is, without the official per-call warning.
    """
    if ps_version not in ("v1", "v2"):
        raise ValueError(f"ps_version must be 'v1' or 'v2', got {ps_version!r}")
    n, w, h, c = x.shape
    r = round(1 / scale_factor)
    if w % r or h % r:
        raise ValueError(f"a {w} x {h} grid does not split into {r} x {r} blocks (scale_factor={scale_factor})")
    x = x.reshape(n, w // r, r, h // r, r, c)  # [N, W/r, p, H/r, q, C]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [N, W/r, H/r, p, q, C]
    x = x.reshape(n, w // r, h // r, r * r * c)  # [N, W/r, H/r, C*r*r]
    if ps_version == "v1":
        x = x.transpose(1, 2)  # [N, H/r, W/r, C*r*r]
    return x.contiguous()


def build_mlp1(vit_hidden_size: int, llm_hidden_size: int, downsample_ratio: float = 0.5) -> nn.Sequential:
    """The official `mlp1` projector: LayerNorm, Linear, GELU, Linear, from pixel-shuffled ViT features
    (width vit_hidden_size / downsample_ratio^2) to the LLM width. Its keys are `0.*`, `1.*` and `3.*`."""
    width = vit_hidden_size * int(1 / downsample_ratio) ** 2
    return nn.Sequential(
        nn.LayerNorm(width),
        nn.Linear(width, llm_hidden_size),
        nn.GELU(),
        nn.Linear(llm_hidden_size, llm_hidden_size),
    )


def num_image_tokens(image_size: int, patch_size: int, downsample_ratio: float = 0.5) -> int:
    """LLM tokens per image tile: (image_size / patch_size)^2 patches, shrunk by downsample_ratio^2
    (256 for 448-pixel tiles, patch 14, ratio 0.5)."""
    return int((image_size // patch_size) ** 2 * downsample_ratio**2)
