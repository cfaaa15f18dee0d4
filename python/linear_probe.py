#!/usr/bin/env python
"""Linear probing with Multimodal Pathways: only every pathway's λ and the classifier head train.

The target (e.g. a pretrained image ViT) and the auxiliary weights W' stay frozen; the question
asked is how much of each auxiliary layer the target wants (λ per layer, or per channel with
``--per-channel-scale``). The fused kernels then compute only dλ, db and dx: dW is never written.

Examples:
  python python/linear_probe.py --synthetic --img-size 32 --patch-size 8 --depth 2 --steps 20
  python python/linear_probe.py --data-dir /data/imagenet --num-classes 1000 --model vit_base_patch16_224 \\
      --pretrained --aux-checkpoint audio_ast_vitb.pth --out probe.safetensors
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _example_common as common  # noqa: E402


def _frozen_tensors(model):
    """Every tensor that must not change: parameters that don't require grad, and the saved
    buffers of the pathway layers (the frozen W', ``<layer>.aux_weight``)."""
    from m2pt_kernels import FusedCrossModalLinear

    params = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {}
    for name, m in model.named_modules():
        if isinstance(m, FusedCrossModalLinear):
            own = {k for k, _ in m.named_parameters()}
            buffers.update({f"{name}.{k}": t for k, t in m.state_dict(keep_vars=True).items() if k not in own})
    return params, buffers


def main(argv=None) -> int:
    p = common.parser(__doc__)
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_aux_args(p, aux_trainable_choice=False)  # W' is always frozen here
    common.add_train_args(p, lr=1e-3, steps=200)
    p.add_argument("--head", default="head", help="name of the classifier module that also trains (default head)")
    args = p.parse_args(argv)
    common.check_train_args(args)

    import torch

    from m2pt_kernels.pathways import PathwayConfig, add_pathways, mark_only_scales_trainable

    torch.manual_seed(args.seed)
    model = common.create_timm_model(args)
    batches, val = common.make_loaders(args, model)
    config = PathwayConfig(aux_trainable=False, per_channel_scale=args.per_channel_scale,
                           exclude_modules=(args.head,))
    try:
        add_pathways(model, common.aux_source(args, model), config)
        mark_only_scales_trainable(model, modules_to_save=(args.head,))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_scales = sum(n.endswith("cross_modal_scale") for n in trainable)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model}: training {n_scales} λ tensors + {args.head} ({n_train:,} parameters); everything else frozen")
    params, buffers = _frozen_tensors(model)
    before = {n: t.detach().clone() for n, t in {**params, **buffers}.items()}
    acc = common.train(model, batches, val, args)
    params_after, buffers_after = _frozen_tensors(model)
    after = {**params_after, **buffers_after}
    changed = [n for n in before if n not in after or not torch.equal(after[n].detach().cpu(), before[n].cpu())]
    if changed:
        sys.exit(f"error: frozen tensors changed during training: {changed[:5]}")
    print(f"frozen tensors unchanged ({len(params)} parameters, {len(buffers)} W' buffers)")
    scales = common.print_scales(model)
    common.save(model, args, {"args": vars(args), "val_acc": acc, "scales": scales})
    return 0


if __name__ == "__main__":
    sys.exit(main())
