#!/usr/bin/env python
"""Merge a Multimodal Pathway training checkpoint for deployment: load, fold, save, verify.

Every ``<layer>.aux_weight`` / ``<layer>.cross_modal_scale`` pair (this package's
``FusedCrossModalLinear`` or the paper's ``CrossModalReparamLinear``) is folded into
``<layer>.weight`` = W + λ·W'. The result is a plain checkpoint of the original architecture.
With ``--model`` (a timm name) the script also verifies it: the merged weights load into the plain
model with ``strict=True``, its outputs match the pathway model's, and both are timed.
(``m2pt merge IN OUT`` does the load-fold-save part from the command line.)

Examples:
  # ft.pth from finetune_timm_with_pathways.py's pipeline check: verify with the model flags it was trained with
  python python/merge_for_deployment.py ft.pth deploy.safetensors --model vit_tiny_patch16_224 \\
      --img-size 32 --patch-size 8 --depth 2
  python python/merge_for_deployment.py ft.pth deploy.pth            # no verification, timm not needed
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _example_common as common  # noqa: E402


def _timed(model, x, repeats):
    import torch
    with torch.no_grad():
        for _ in range(2):
            model(x)
        ts = []
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("checkpoint", help="training checkpoint with pathways (.pth/.pt/.bin/.safetensors)")
    p.add_argument("output", help="merged checkpoint to write (.safetensors or .pth)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.add_argument("--model", default=None, help="timm model name to verify against (optional; needs timm)")
    p.add_argument("--num-classes", type=common.nonnegative_int, default=None,
                   help="the model's head size (default: from the checkpoint; 0: no head)")
    p.add_argument("--img-size", type=common.positive_int, default=None)
    p.add_argument("--patch-size", type=common.positive_int, default=None)
    p.add_argument("--depth", type=common.positive_int, default=None)
    p.add_argument("--batch-size", type=common.positive_int, default=8, help="batch of random inputs for the check")
    p.add_argument("--repeats", type=common.positive_int, default=10, help="timed forward passes per model")
    p.add_argument("--device", default=None, help="device for the check (default: cuda if available)")
    args = p.parse_args(argv)

    import torch

    from m2pt_kernels.pathways import (PathwayConfig, add_pathways, is_pathway_state_dict, load_checkpoint,
                                       merge_state_dict, save_checkpoint)

    if common.same_file(args.checkpoint, args.output):  # also a symlink or hard link to it: never overwritten
        sys.exit(f"error: OUTPUT {args.output!r} is the checkpoint itself (the same file); "
                 "write the merged weights elsewhere")
    common.check_checkpoint_path(args.output, "OUTPUT")
    if os.path.exists(args.output) and not args.force:
        sys.exit(f"error: {args.output} exists (pass --force to overwrite)")
    if args.model is not None:
        try:
            import timm
        except ImportError:
            sys.exit("error: --model needs timm (pip install timm); without --model the merge itself needs no timm")
        if not timm.is_model(args.model):
            sys.exit(f"error: --model {args.model!r} is not a timm model name (see timm.list_models())")
        if args.device is not None:
            common.check_device(args.device)
    try:
        sd = load_checkpoint(args.checkpoint)
    except Exception as exc:
        sys.exit(f"error: cannot read {args.checkpoint}: {common.one_line(exc)}")
    if not is_pathway_state_dict(sd):
        sys.exit(f"error: {args.checkpoint} has no pathways (no *.aux_weight / *.cross_modal_scale keys): nothing to merge")
    layers = [k[: -len(".cross_modal_scale")] for k in sd if k.endswith(".cross_modal_scale")]
    try:
        merged = merge_state_dict(sd)
    except ValueError as exc:  # a pathway whose tensors don't fit together (shapes, λ size, ...)
        sys.exit(f"error: cannot merge {args.checkpoint}: {common.one_line(exc)}")
    common.write_checkpoint(lambda: save_checkpoint(merged, args.output), args.output, "OUTPUT")
    scales = torch.stack([sd[f"{n}.cross_modal_scale"].float().mean() for n in layers])
    print(f"merged {len(layers)} pathway layers (λ mean {scales.mean():+.4f}, |λ| max {scales.abs().max():.4f}); "
          f"{len(sd)} -> {len(merged)} tensors; wrote {args.output}")
    if args.model is None:
        print("not verified (pass --model NAME to load the result into the timm architecture and compare outputs)")
        return 0

    kwargs = {k: getattr(args, k) for k in ("img_size", "patch_size", "depth") if getattr(args, k) is not None}
    head = next((k for k in ("head.weight", "fc.weight", "classifier.weight") if k in merged), None)
    kwargs["num_classes"] = args.num_classes if args.num_classes is not None else (merged[head].shape[0] if head else 0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    try:
        plain = timm.create_model(args.model, pretrained=False, **kwargs)
    except Exception as exc:  # options the architecture refuses (sizes, ...)
        sys.exit(f"error: timm.create_model({args.model!r}, {kwargs}) failed: {common.one_line(exc, 300)}; "
                 f"the merged checkpoint was written, unverified")
    try:
        plain.load_state_dict(merged, strict=True)
    except RuntimeError as exc:
        sys.exit(f"error: the merged weights do not load into {args.model}({kwargs}) with strict=True: "
                 f"{common.one_line(exc, 400)}")
    # the unmerged model: the same architecture with pathways on exactly the checkpoint's layers
    with_pathways = timm.create_model(args.model, pretrained=False, **kwargs)
    aux_sd = {f"{n}.weight": sd[f"{n}.aux_weight"] for n in layers}
    per_channel = any(sd[f"{n}.cross_modal_scale"].numel() > 1 for n in layers)
    try:
        add_pathways(with_pathways, aux_sd, PathwayConfig(target_modules=layers, exclude_modules=(),
                                                          per_channel_scale=per_channel))
        missing, unexpected = with_pathways.load_state_dict(sd, strict=False)
    except (ValueError, TypeError, RuntimeError) as exc:
        sys.exit(f"error: the training checkpoint does not fit {args.model}({kwargs}) with pathways: "
                 f"{common.one_line(exc, 400)}")
    if missing or unexpected:
        sys.exit(f"error: the training checkpoint does not match {args.model}: missing {missing[:5]}, "
                 f"unexpected {unexpected[:5]}")
    plain.to(device).eval()
    with_pathways.to(device).eval()
    size = plain.patch_embed.img_size if hasattr(plain, "patch_embed") else (224, 224)
    x = torch.randn(args.batch_size, 3, *size, device=device)
    with torch.no_grad():
        a, b = plain(x), with_pathways(x)
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    t_plain, t_path = _timed(plain, x, args.repeats), _timed(with_pathways, x, args.repeats)
    print(f"verified: strict load into {args.model} ok; max |merged - pathways| = {diff:.3g} "
          f"(outputs up to {scale:.3g}); forward of {args.batch_size} on {device}: merged {t_plain * 1e3:.2f} ms, "
          f"with pathways {t_path * 1e3:.2f} ms")
    tol = 1e-4 if a.dtype == torch.float32 else 2e-2
    if diff > tol * max(1.0, scale):
        print(f"error: outputs differ by {diff:.3g} (> {tol:g} x {max(1.0, scale):.3g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
