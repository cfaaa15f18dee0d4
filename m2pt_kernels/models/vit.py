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

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

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


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: embed_dim={dim} is not divisible by num_heads={num_heads}")
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
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """tokenizer + cls token + ``depth`` pre-norm blocks + final norm + linear head on the cls token."""

    def __init__(self, tokenizer: Tokenizer, embed_dim: int, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_classes: int = 1000, qkv_bias: bool = True):
        super().__init__()
        tok_dim = getattr(tokenizer, "embed_dim", None)
        if tok_dim != embed_dim:
            raise ValueError(
                f"VisionTransformer: tokenizer {type(tokenizer).__name__} produces embed_dim={tok_dim}, "
                f"the blocks expect embed_dim={embed_dim}; build the tokenizer with embed_dim={embed_dim}"
            )
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
