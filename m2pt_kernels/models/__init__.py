"""A compact ViT with timm's block names and tokenizers for the paper's four modalities.

>>> from m2pt_kernels.models import vit_for_images, vit_for_point_clouds
>>> target = vit_for_images(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
>>> aux = vit_for_point_clouds(num_groups=16, group_size=16, embed_dim=64, depth=4, num_heads=4, num_classes=6)

Both share ``blocks.{i}.attn.qkv`` ... ``blocks.{i}.mlp.fc2``, so
``m2pt_kernels.pathways.add_pathways(target, aux)`` pairs them layer by layer.
"""
from .tokenizers import (AudioPatchEmbed, ImagePatchEmbed, PointCloudEmbed, Tokenizer, VideoTubeletEmbed,
                         farthest_point_sample, group_points, knn_indices)
from .vit import (Attention, Block, Mlp, ViT, VisionTransformer, vit_for_audio, vit_for_images,
                  vit_for_point_clouds, vit_for_video)

__all__ = [
    "Attention",
    "AudioPatchEmbed",
    "Block",
    "ImagePatchEmbed",
    "Mlp",
    "PointCloudEmbed",
    "Tokenizer",
    "VideoTubeletEmbed",
    "ViT",
    "VisionTransformer",
    "farthest_point_sample",
    "group_points",
    "knn_indices",
    "vit_for_audio",
    "vit_for_images",
    "vit_for_point_clouds",
    "vit_for_video",
]
