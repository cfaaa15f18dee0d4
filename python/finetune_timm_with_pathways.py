#!/usr/bin/env python
"""Fine-tune a timm ViT with Multimodal Pathways from an auxiliary checkpoint (the paper's
main_finetune, in miniature).

Every block linear of the target (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) becomes
``FusedCrossModalLinear``: y = x·(W + λ·W')ᵀ + b, with W' the same layer of the auxiliary model
(another modality: point clouds, audio, video) and λ learned from 0. After training, fold the
pathways away with ``m2pt merge`` or ``python/merge_for_deployment.py``.

Examples:
  # a pipeline check, no data and no checkpoints needed (tiny model, CPU friendly)
  python python/finetune_timm_with_pathways.py --synthetic --img-size 32 --patch-size 8 --depth 2 --steps 20 \\
      --out ft.pth

  # ImageNet-style folder, a pretrained target and a point-cloud auxiliary whose blocks use timm names
  python python/finetune_timm_with_pathways.py --data-dir /data/imagenet --num-classes 1000 \\
      --model vit_base_patch16_224 --pretrained --aux-checkpoint pointmae_vitb.pth --out ft.pth --amp
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _example_common as common  # noqa: E402


def main(argv=None) -> int:
    p = common.parser(__doc__)
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_aux_args(p)
    common.add_train_args(p, lr=5e-4, steps=200)
    args = p.parse_args(argv)
    common.check_train_args(args)

    import torch

    from m2pt_kernels.layers import FusedCrossModalLinear
    from m2pt_kernels.pathways import PathwayConfig, add_pathways

    torch.manual_seed(args.seed)
    model = common.create_timm_model(args)
    batches, val = common.make_loaders(args, model)
    config = PathwayConfig(aux_trainable=not args.freeze_aux, per_channel_scale=args.per_channel_scale)
    try:
        add_pathways(model, common.aux_source(args, model), config)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        sys.exit(f"error: add_pathways: {exc}")
    n_layers = sum(isinstance(m, FusedCrossModalLinear) for m in model.modules())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model}: {n_layers} pathway layers, {n_train:,} trainable parameters, device {args.device}")
    acc = common.train(model, batches, val, args)
    scales = common.print_scales(model)
    common.save(model, args, {"args": vars(args), "val_acc": acc, "scales": scales})
    return 0


if __name__ == "__main__":
    sys.exit(main())
