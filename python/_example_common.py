"""Shared pieces of the example scripts: the timm model, the data, the auxiliary weights, a train loop.

Only public APIs of m2pt_kernels are used here, as a user's script would.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F


def require_timm():
    try:
        import timm
    except ImportError:
        sys.exit("error: this example needs timm (pip install timm); "
                 "m2pt_kernels itself works without it, see m2pt_kernels.models for a timm-free ViT")
    return timm


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose description is the script docstring's first paragraph, the rest its epilog."""
    first, *rest = doc.split("\n\n")
    return argparse.ArgumentParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(rest))


def one_line(exc: BaseException, limit=None) -> str:
    """An exception's message on one line (whitespace runs folded), cut to ``limit`` characters."""
    return " ".join(str(exc).split())[:limit]


def _number(kind, s: str, ok, what: str):
    """``kind(s)`` if it parses and ``ok`` holds, else argparse's one-line error naming the option."""
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if not (ok(v) and (kind is int or math.isfinite(v))):
        raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
    return v


def positive_int(s: str) -> int:
    """argparse ``type=``: an integer >= 1 (sizes, steps, batch sizes, counts)."""
    return _number(int, s, lambda v: v >= 1, "a positive integer")


def nonnegative_int(s: str) -> int:
    """argparse ``type=``: an integer >= 0."""
    return _number(int, s, lambda v: v >= 0, "an integer >= 0")


def positive_float(s: str) -> float:
    """argparse ``type=``: a finite number > 0 (learning rates, multipliers)."""
    return _number(float, s, lambda v: v > 0, "a finite number > 0")


def nonnegative_float(s: str) -> float:
    """argparse ``type=``: a finite number >= 0 (weight decay)."""
    return _number(float, s, lambda v: v >= 0, "a finite number >= 0")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (default vit_tiny_patch16_224)")
    g.add_argument("--pretrained", action="store_true",
                   help="load timm's pretrained target weights (needs them in the local HF cache or network)")
    g.add_argument("--target-checkpoint", default=None, help="start the target from this checkpoint instead")
    g.add_argument("--img-size", type=positive_int, default=None, help="override the model's image size (e.g. 32)")
    g.add_argument("--patch-size", type=positive_int, default=None, help="override the patch size")
    g.add_argument("--depth", type=positive_int, default=None, help="override the number of blocks (tiny test runs)")
    g.add_argument("--num-classes", type=positive_int, default=10)


def create_timm_model(args):
    timm = require_timm()
    kwargs = {"num_classes": args.num_classes}
    for k in ("img_size", "patch_size", "depth"):
        if getattr(args, k, None) is not None:
            kwargs[k] = getattr(args, k)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except Exception as exc:  # unknown name, no weights offline, ...
        sys.exit(f"error: timm.create_model({args.model!r}, pretrained={args.pretrained}, {kwargs}) failed: "
                 f"{one_line(exc, 300)}")
    pe = getattr(model, "patch_embed", None)
    img, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    if img is not None and patch is not None and any(p > i for p, i in zip(patch, img)):
        sys.exit(f"error: --patch-size {patch[0]} is larger than the image ({img[0]} pixels, --img-size); "
                 "no patch would fit")
    if getattr(args, "target_checkpoint", None):
        from m2pt_kernels.pathways import load_checkpoint
        try:
            sd = load_checkpoint(args.target_checkpoint)
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # new task, new head
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except Exception as exc:  # unreadable file, shapes that don't fit the model, ...
            sys.exit(f"error: --target-checkpoint {args.target_checkpoint}: {one_line(exc, 400)}")
        print(f"target weights from {args.target_checkpoint}: missing {len(missing)} (head expected), "
              f"unexpected {len(unexpected)}")
    return model


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--synthetic", action="store_true",
                   help="synthetic class-dependent images (no dataset needed; checks the pipeline)")
    g.add_argument("--data-dir", default=None, help="an ImageFolder root with train/ and val/ (needs torchvision)")
    g.add_argument("--synthetic-size", type=positive_int, default=512, help="number of synthetic training images")


def _synthetic(n: int, num_classes: int, img_size: int, seed: int):
    """Images whose class sets a frequency and orientation of a grating, plus noise: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    coords = torch.linspace(-1, 1, img_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = y.float() * math.pi / num_classes
    freq = 2.0 + (y % 3).float()
    phase = torch.rand(n, generator=g) * 2 * math.pi
    proj = xx[None] * angle.cos()[:, None, None] + yy[None] * angle.sin()[:, None, None]
    img = torch.sin(freq[:, None, None] * math.pi * proj + phase[:, None, None])
    x = img[:, None].expand(-1, 3, -1, -1) + 0.5 * torch.randn(n, 3, img_size, img_size, generator=g)
    return x.contiguous(), y


def make_loaders(args, model):
    """(train_batches_fn, val_set): train_batches_fn(step) -> (x, y)."""
    img_size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else (args.img_size or 224)
    if args.synthetic == bool(args.data_dir):
        sys.exit("error: choose exactly one of --synthetic and --data-dir")
    if args.synthetic:
        xtr, ytr = _synthetic(args.synthetic_size, args.num_classes, img_size, args.seed)
        xva, yva = _synthetic(max(64, args.synthetic_size // 4), args.num_classes, img_size, args.seed + 1)
        g = torch.Generator().manual_seed(args.seed + 2)

        def batches(step):
            idx = torch.randint(0, len(xtr), (args.batch_size,), generator=g)
            return xtr[idx], ytr[idx]
        return batches, (xva, yva)
    try:
        from torchvision import datasets, transforms
    except ImportError:
        sys.exit("error: --data-dir needs torchvision (pip install torchvision)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_dir, split)):
            sys.exit(f"error: --data-dir {args.data_dir!r} has no {split}/ folder (ImageFolder layout expected)")
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = transforms.Compose([transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(int(img_size * 1.14)), transforms.CenterCrop(img_size),
                                 transforms.ToTensor(), norm])
    train = datasets.ImageFolder(os.path.join(args.data_dir, "train"), train_tf)
    val = datasets.ImageFolder(os.path.join(args.data_dir, "val"), val_tf)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers)
    state = {"it": iter(loader)}

    def batches(step):
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])
    return batches, val


def add_train_args(p: argparse.ArgumentParser, lr: float, steps: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=steps)
    g.add_argument("--batch-size", type=positive_int, default=32)
    g.add_argument("--lr", type=positive_float, default=lr, help=f"base learning rate (default {lr})")
    g.add_argument("--scale-lr-mult", type=positive_float, default=10.0, help="λ's learning rate = lr x this")
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.05)
    g.add_argument("--workers", type=nonnegative_int, default=2, help="DataLoader workers (--data-dir)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None,
                   help="write the training checkpoint here (.safetensors, .pth, .pt, .bin, .ckpt or .pth.tar; "
                        "its folder must exist)")


def check_checkpoint_path(path: str, what: str) -> None:
    """Exit with a clear message, before any work, when ``path`` can't take a checkpoint:
    a format ``m2pt merge`` would not read, a folder, a missing or read-only parent folder
    (a symlink's: the file is written through it), or a read-only existing file."""
    from m2pt_kernels.pathways import checkpoint_format

    try:
        checkpoint_format(path)
    except ValueError as exc:
        sys.exit(f"error: {what}: {exc}")
    if os.path.isdir(path):
        sys.exit(f"error: {what} {path!r} is a folder; pass a checkpoint file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        sys.exit(f"error: {what} {path!r}: the folder {folder!r} does not exist; create it first")
    target = os.path.realpath(path)
    if os.path.dirname(target) != os.path.realpath(folder):  # a symlink: written where it points
        folder = os.path.dirname(target)
        if not os.path.isdir(folder):
            sys.exit(f"error: {what} {path!r} is a link to {target!r}, whose folder does not exist")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        sys.exit(f"error: {what} {path!r} exists and is not writable")
    if not os.path.exists(target) and not os.access(folder, os.W_OK | os.X_OK):
        sys.exit(f"error: {what} {path!r}: the folder {folder!r} is not writable")


def same_file(a: str, b: str) -> bool:
    """Whether writing ``b`` would overwrite ``a``: the same path, a symlink to it, or a hard link."""
    if os.path.abspath(a) == os.path.abspath(b) or os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def write_checkpoint(write, path: str, what: str) -> None:
    """``write()`` (which writes ``path``); any failure is a one-line error naming ``what`` and a nonzero exit."""
    try:
        write()
    except Exception as exc:  # OSError, torch's RuntimeError, safetensors' SafetensorError, ...
        sys.exit(f"error: {what}: cannot write {path!r}: {one_line(exc, 400)}")


def check_device(name: str) -> torch.device:
    """``--device`` parsed and checked to be usable here, or a clear exit (not a traceback mid-run)."""
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        sys.exit(f"error: --device {name!r} is not a torch device ({one_line(exc)})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"error: --device {name}: CUDA is not available here (torch {torch.__version__}); "
                     "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            sys.exit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError):  # torch built without that device type (the message is pages long)
            sys.exit(f"error: --device {name}: this torch ({torch.__version__}) cannot create tensors on {dev.type} "
                     "here; use cpu or cuda")
    return dev


def check_train_args(args) -> None:
    """The checks of add_train_args' options that can be made before the model is built and trained."""
    check_device(args.device)
    check_checkpoint_options({"--target-checkpoint": getattr(args, "target_checkpoint", None),
                              "--aux-checkpoint": getattr(args, "aux_checkpoint", None)}, "--out", args.out)


def check_checkpoint_options(inputs: dict, out_opt: str, out) -> None:
    """Input checkpoints (option -> path or None) exist; the output path (``out_opt``) can take a checkpoint
    and is none of the inputs."""
    for opt, path in inputs.items():
        if path and not os.path.isfile(path):
            sys.exit(f"error: {opt} {path!r}: no such file")
    if out:
        check_checkpoint_path(out, out_opt)
        for opt, path in inputs.items():
            if path and same_file(path, out):
                sys.exit(f"error: {out_opt} {out!r} is the {opt} file itself; write the checkpoint elsewhere")


def add_aux_args(p: argparse.ArgumentParser, *, aux_trainable_choice: bool = True) -> None:
    """``aux_trainable_choice=False``: no --freeze-aux (a script where W' is always frozen)."""
    g = p.add_argument_group("pathways")
    g.add_argument("--aux-checkpoint", default=None,
                   help="auxiliary model weights (.pth/.safetensors; e.g. a Point-MAE / AST / VideoMAE checkpoint "
                        "whose blocks use timm names). With --synthetic and no checkpoint, a randomly initialized "
                        "point-cloud transformer stands in (a pipeline check, not a real auxiliary).")
    if aux_trainable_choice:
        g.add_argument("--freeze-aux", action="store_true", help="keep W' frozen (default: trainable, as in the paper)")
    g.add_argument("--per-channel-scale", action="store_true", help="one λ per output channel instead of one per layer")


def aux_source(args, model):
    if args.aux_checkpoint:
        return args.aux_checkpoint
    if not args.synthetic:
        sys.exit("error: --aux-checkpoint is required with real data")
    from m2pt_kernels.models import vit_for_point_clouds
    blk = model.blocks[0]
    dim = blk.attn.qkv.in_features
    print("note: no --aux-checkpoint: using a randomly initialized point-cloud transformer as the auxiliary "
          "(pipeline check only)")
    torch.manual_seed(args.seed + 12345)
    return vit_for_point_clouds(num_groups=8, group_size=8, hidden=16, embed_dim=dim, depth=len(model.blocks),
                                num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / dim,
                                num_classes=1)


def optimizer(model, args):
    from m2pt_kernels.pathways import param_groups
    groups = param_groups(model, args.lr, weight_decay=args.weight_decay, scale_lr_mult=args.scale_lr_mult)
    return torch.optim.AdamW(groups)


@torch.no_grad()
def evaluate(model, val, device, batch_size=128):
    model.eval()
    correct = total = 0
    if isinstance(val, tuple):
        chunks = [(val[0][i:i + batch_size], val[1][i:i + batch_size]) for i in range(0, len(val[0]), batch_size)]
    else:
        chunks = torch.utils.data.DataLoader(val, batch_size=batch_size)
    for x, y in chunks:
        correct += (model(x.to(device)).argmax(-1).cpu() == y).sum().item()
        total += len(y)
    model.train()
    return correct / max(1, total)


def train(model, batches, val, args):
    device = torch.device(args.device)
    model.to(device).train()
    opt = optimizer(model, args)
    warmup = max(1, args.steps // 10)
    t0 = time.perf_counter()
    for step in range(args.steps):
        f = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        x, y = batches(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, args.steps // 5) == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  "
                  f"{(time.perf_counter() - t0) / (step + 1) * 1e3:.1f} ms/step", flush=True)
    acc = evaluate(model, val, device)
    print(f"validation accuracy {acc:.4f}")
    return acc


def print_scales(model):
    scales = {n[: -len(".cross_modal_scale")]: p.detach().float().mean().item()
              for n, p in model.named_parameters() if n.endswith("cross_modal_scale")}
    if scales:
        vals = list(scales.values())
        print(f"learned λ over {len(vals)} layers: mean {sum(vals) / len(vals):+.4f}, "
              f"min {min(vals):+.4f} ({min(scales, key=scales.get)}), max {max(vals):+.4f} ({max(scales, key=scales.get)})")
    return scales


def save(model, args, extra=None):
    if not args.out:
        return
    from m2pt_kernels.pathways import checkpoint_format, save_checkpoint
    sd = model.state_dict()
    if checkpoint_format(args.out) == ".safetensors":  # the package's reading of the suffix (any case)
        write_checkpoint(lambda: save_checkpoint(sd, args.out), args.out, "--out")
    else:  # the paper's layout: {"model": state_dict, ...}; m2pt merge and load_checkpoint unwrap it
        write_checkpoint(lambda: torch.save({"model": {k: v.detach().cpu() for k, v in sd.items()}, **(extra or {})},
                                            args.out), args.out, "--out")
    print(f"training checkpoint written to {args.out} (fold the pathways with: m2pt merge {args.out} MERGED)")
