"""A compact Vision Transformer whose block names match timm's, with a pluggable tokenizer.

Module names (as timm's ``VisionTransformer``): ``cls_token``, ``blocks.{i}.norm1``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``,
``blocks.{i}.mlp.fc2``, ``norm``, ``head``; the modality-specific part lives under ``tokenizer``
(which adds its own position embedding). Two models of different modalities with the same block
configuration therefore share every block name, which is what ``m2pt_kernels.pathways.add_pathways``
pairs: an auxiliary point-cloud model can feed pathways into an image model.

The blocks call their linears as modules (``self.qkv(x)``), so after ``add_pathways`` they run
``FusedCrossModalLinear`` and after ``merge_pathways`` they are plain ``nn.Linear`` again.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..layers import check_size
from .tokenizers import (AudioPatchEmbed, ImagePatchEmbed, PointCloudEmbed, Tokenizer,
                         VideoTubeletEmbed)

__all__ = [
    "Attention",
    "Mlp",
    "Block",
    "VisionTransformer",
    "ViT",
    "vit_for_images",
    "vit_for_audio",
    "vit_for_video",
    "vit_for_point_clouds",
]


def _heads(dim, num_heads, owner: str) -> tuple[int, int]:
    """``(dim, num_heads)`` checked: positive ints, ``num_heads`` dividing ``dim``."""
    dim, num_heads = check_size(owner, "embed_dim", dim, 1), check_size(owner, "num_heads", num_heads, 1)
    if dim % num_heads:
        raise ValueError(f"{owner}: embed_dim={dim} is not divisible by num_heads={num_heads}; use a num_heads "
                         "that divides embed_dim (each head gets embed_dim / num_heads channels)")
    return dim, num_heads


def _mlp_hidden(dim: int, mlp_ratio, owner: str) -> int:
    """The MLP width ``int(dim * mlp_ratio)`` (as timm) for a finite ``mlp_ratio`` > 0 giving ≥ 1 unit."""
    if not isinstance(mlp_ratio, numbers.Real) or isinstance(mlp_ratio, bool):
        raise TypeError(f"{owner}: mlp_ratio must be a real number (the MLP width over embed_dim, e.g. 4.0), "
                        f"got {type(mlp_ratio).__name__} {mlp_ratio!r}")
    if not (math.isfinite(mlp_ratio) and mlp_ratio > 0):
        raise ValueError(f"{owner}: mlp_ratio must be a positive finite number (the MLP width over embed_dim, "
                         f"e.g. 4.0), got {mlp_ratio!r}")
    hidden = int(dim * mlp_ratio)
    if hidden < 1:
        raise ValueError(f"{owner}: mlp_ratio={mlp_ratio!r} gives an MLP of int({dim} * {mlp_ratio!r}) = 0 units; "
                         f"use mlp_ratio ≥ 1/{dim}")
    return hidden


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        dim, num_heads = _heads(dim, num_heads, "Attention")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        dim, hidden = check_size("Mlp", "dim", dim, 1), check_size("Mlp", "hidden", hidden, 1)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        dim, num_heads = _heads(dim, num_heads, "Block")
        hidden = _mlp_hidden(dim, mlp_ratio, "Block")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """tokenizer + cls token + ``depth`` pre-norm blocks + final norm + linear head on the cls token.

    ``num_classes=0``: no head (``nn.Identity``), the model returns the cls token's features
    ``[B, embed_dim]``. The sizes are checked before anything is built: ``embed_dim``, ``depth``,
    ``num_heads`` positive ints with ``num_heads`` dividing ``embed_dim``, ``num_classes`` an int ≥ 0,
    ``mlp_ratio`` a positive finite number (MLP width ``int(embed_dim * mlp_ratio)``, at least 1)."""

    def __init__(self, tokenizer: Tokenizer, embed_dim: int, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_classes: int = 1000, qkv_bias: bool = True):
        super().__init__()
        embed_dim = check_size("VisionTransformer", "embed_dim", embed_dim, 1)
        tok_dim = getattr(tokenizer, "embed_dim", None)
        if tok_dim != embed_dim:
            raise ValueError(
                f"VisionTransformer: tokenizer {type(tokenizer).__name__} produces embed_dim={tok_dim}, "
                f"the blocks expect embed_dim={embed_dim}; build the tokenizer with embed_dim={embed_dim}"
            )
        num_heads = _heads(embed_dim, num_heads, "VisionTransformer")[1]
        depth = check_size("VisionTransformer", "depth", depth, 1)
        _mlp_hidden(embed_dim, mlp_ratio, "VisionTransformer")
        num_classes = check_size("VisionTransformer", "num_classes", num_classes)
        self.embed_dim, self.depth, self.num_heads, self.mlp_ratio = embed_dim, depth, num_heads, mlp_ratio
        self.num_classes = num_classes
        self.tokenizer = tokenizer
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("tokenizer"):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def modality(self) -> str:
        return getattr(self.tokenizer, "modality", "generic")

    def forward_features(self, x: Tensor) -> Tensor:
        tokens = self.tokenizer(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)[:, 0])


ViT = VisionTransformer


def vit_for_images(img_size=224, patch_size=16, in_chans=3, embed_dim=192, depth=12, num_heads=3,
                   mlp_ratio=4.0, num_classes=1000) -> VisionTransformer:
    """An image ViT (defaults: ViT-Tiny/16 at 224)."""
    tok = ImagePatchEmbed(img_size, patch_size, in_chans, embed_dim)
    return VisionTransformer(tok, embed_dim, depth, num_heads, mlp_ratio, num_classes)


def vit_for_audio(n_freq=128, n_time=1024, patch_size=16, stride=10, embed_dim=192, depth=12, num_heads=3,
                  mlp_ratio=4.0, num_classes=527) -> VisionTransformer:
    """An AST-style audio ViT on ``[B, 1, n_freq, n_time]`` spectrograms."""
    tok = AudioPatchEmbed(n_freq, n_time, patch_size, stride, embed_dim)
    return VisionTransformer(tok, embed_dim, depth, num_heads, mlp_ratio, num_classes)


def vit_for_video(num_frames=16, img_size=224, patch_size=16, tubelet_size=2, in_chans=3, embed_dim=192,
                  depth=12, num_heads=3, mlp_ratio=4.0, num_classes=400) -> VisionTransformer:
    """A video ViT on ``[B, C, T, H, W]`` clips, tubelet-tokenized."""
    tok = VideoTubeletEmbed(num_frames, img_size, patch_size, tubelet_size, in_chans, embed_dim)
    return VisionTransformer(tok, embed_dim, depth, num_heads, mlp_ratio, num_classes)


def vit_for_point_clouds(num_groups=64, group_size=32, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0,
                         num_classes=40, hidden=128, fps_start="farthest") -> VisionTransformer:
    """A Point-MAE-style point-cloud transformer on ``[B, P, 3]`` clouds."""
    tok = PointCloudEmbed(num_groups, group_size, embed_dim, hidden, fps_start)
    return VisionTransformer(tok, embed_dim, depth, num_heads, mlp_ratio, num_classes)
