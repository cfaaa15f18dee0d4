"""``m2pt demo``: an end-to-end Multimodal Pathway run that fits on a laptop CPU.

1. Auxiliary modality: synthetic point clouds of primitive shapes (``demo_data.SHAPES``), randomly
   rotated, scaled, non-uniformly sampled and jittered, drawn on the fly; a point-cloud transformer
   (FPS + kNN + mini-PointNet tokenizer) learns to classify them.
2. Target modality: scikit-learn's bundled 8x8 handwritten digits, 2x2-patch tokenized, the same
   block configuration (``blocks.{i}.attn.qkv`` ... ``mlp.fc2``).
3. The target is trained three ways, with identical seeds, data order and budget:
   ``baseline`` (no pathways), ``control`` (pathways to an *untrained*, randomly initialized
   auxiliary) and ``m2pt`` (pathways to the trained auxiliary). Test accuracy, the learned λ per
   layer and the time per training step are reported for each.
4. The ``m2pt`` model is merged (``merge_pathways``), its outputs compared with the unmerged model,
   its inference timed against the baseline's, and the merged checkpoint exported (.safetensors).

Recipe (fixed before comparing the variants; never tuned on them): AdamW (β 0.9/0.999, weight
decay 0.05 on matrices, none on norms, biases, tokens and λ), linear warmup then cosine decay,
label smoothing 0.1, batch 64, base learning rate 3e-3 (picked on the *baseline alone*, from
{1e-3, 3e-3} at the quick budget: 1e-3 left it at 64% test accuracy after 200 steps, 3e-3 at 75%).
λ starts at 0 (``PathwayConfig`` default) and gets ``--scale-lr-mult`` x the base learning rate
(default 10): λ is one scalar per layer that has to move away from 0, while the base rate is sized
for weights initialized at std 0.02. Auxiliary weights stay trainable (``aux_trainable=True``, the
default), as in the paper. The auxiliary is trained with AdamW at 1e-3 (``--aux-lr``) and
gradient-norm clipping at 1.0: at the target's 3e-3 it collapsed to chance in the long schedule.

Everything is seeded; torch runs with deterministic algorithms and a fixed thread count, so a
second run on the same machine prints the same numbers.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from .demo_data import SHAPES, load_digits_split, point_cloud_batch

# ---------------------------------------------------------------- configuration

MODEL = dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
POINTS = dict(num_points=256, num_groups=16, group_size=16, hidden=32)
PRESETS = {
    # name: aux steps, target steps, seeds, eval every
    "quick": dict(aux_steps=250, steps=200, seeds=1, eval_every=25),
    "full": dict(aux_steps=1000, steps=500, seeds=3, eval_every=50),
}
VARIANTS = ("baseline", "control", "m2pt")
VARIANT_HELP = {
    "baseline": "no pathways",
    "control": "pathways to an untrained auxiliary",
    "m2pt": "pathways to the trained point-cloud auxiliary",
}


DESCRIPTION = ("End-to-end Multimodal Pathway run: train a point-cloud transformer on synthetic shapes, then "
               "train a digit-image transformer three ways (no pathways / pathways to an untrained auxiliary / "
               "pathways to the trained one), merge, check, time and export. Writes report.json, "
               "training_curves.png and the merged checkpoint to --out.")


class DemoOptionError(ValueError):
    """A bad option value (``m2pt demo`` prints it as one line and exits with code 2)."""


class DemoCheckError(RuntimeError):
    """A check the demo makes of its own results failed (``m2pt demo`` prints it and exits with code 1)."""


# the merged model computes what the model with pathways computed: max |Δ logits| over the logits' scale
MERGE_TOLERANCE = 1e-4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a short run (under 1 minute on 2 CPU cores): 1 seed, fewer steps")
    p.add_argument("--out", default="m2pt_report", help="report folder (default: m2pt_report/)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--seeds", type=int, default=None, help="number of target seeds (quick: 1, full: 3)")
    p.add_argument("--steps", type=int, default=None, help="target training steps per run (quick: 200, full: 500)")
    p.add_argument("--aux-steps", type=int, default=None, help="auxiliary training steps (quick: 250, full: 1000)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate the target every N steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="base learning rate (AdamW, default 3e-3)")
    p.add_argument("--aux-lr", type=float, default=1e-3, help="auxiliary's learning rate (AdamW, default 1e-3)")
    p.add_argument("--scale-lr-mult", type=float, default=10.0, help="λ's learning rate = lr x this (default 10)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: the matrices are tiny, and on a shared or "
                   "busy CPU more threads make it several times slower)")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--timing-repeats", type=int, default=20, help="forward passes timed per model in step 4")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------- small utilities

class _Plain:
    """Progress fallback when tqdm is missing: a line every ~10%."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.n, self._next = total, desc, enabled, 0, 0
        self.postfix = ""

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.enabled and (self.n >= self._next or self.n == self.total):
            print(f"  {self.desc}: {self.n}/{self.total} {self.postfix}", flush=True)
            self._next = self.n + max(1, self.total // 10)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            pass
    return _Plain(total, desc, enabled)


def _pick_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``: the devices the demo runs on (others are refused here,
    before any training, instead of failing half-way through)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise DemoOptionError(f"--device {name!r} is not a torch device ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise DemoOptionError(f"--device {name}: the demo runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DemoOptionError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                              "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DemoOptionError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def _check_backend(device: torch.device) -> None:
    """The backend asked for (``use_backend`` / ``$M2PT_BACKEND``) must run the op on ``device`` in
    float32; checked before any training, so a bad choice is one line, not a traceback mid-run."""
    from ._dispatch import ENV_VAR, resolve
    try:
        resolve(torch.empty(0, device=device))  # the requested backend, read and name-checked there
    except ValueError as exc:  # an unknown name; the message says where it came from
        raise DemoOptionError(f"{exc}") from None
    except (RuntimeError, TypeError) as exc:  # a known backend that can't run here
        hint = f"; or unset {ENV_VAR} (or set it to auto or reference)" if os.environ.get(ENV_VAR) else ""
        raise DemoOptionError(f"{exc}{hint}") from None


def _prepare_out(path: str) -> Path:
    """Create the report folder ``--out`` (parents too) and check that it can be written."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DemoOptionError(f"--out {path}: exists and is not a folder; pass a folder for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoOptionError(f"--out {path}: cannot create the report folder: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DemoOptionError(f"--out {path}: the report folder is not writable; pass another folder")
    return out


# torch >= 2.9 sets fp32 precision through ``fp32_precision``; once that is used, reading the legacy
# ``allow_tf32`` flags raises, so the demo reads and writes the new attributes where they exist.
_FP32_NEW_API = all(hasattr(b, "fp32_precision") for b in (torch.backends.cuda.matmul, torch.backends.cudnn))


def _fp32_flags() -> tuple:
    """(cuda matmul, cudnn) fp32 settings, in whichever API this torch has."""
    if _FP32_NEW_API:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_fp32_flags(matmul, cudnn) -> None:
    if _FP32_NEW_API:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision = matmul, cudnn
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _set_determinism(threads: int, device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        _set_fp32_flags(*(("ieee", "ieee") if _FP32_NEW_API else (False, False)))  # IEEE fp32: no TF32
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * t))


def _optimizer(model: nn.Module, lr: float, scale_lr_mult: float) -> torch.optim.Optimizer:
    from .pathways import param_groups
    return torch.optim.AdamW(param_groups(model, lr, weight_decay=0.05, scale_lr_mult=scale_lr_mult),
                             betas=(0.9, 0.999))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
    model.train(was)
    return correct / len(x)


def _scales(model: nn.Module) -> dict[str, float]:
    """λ per pathway layer (mean over channels when per-channel), by qualified layer name."""
    return {name[: -len(".cross_modal_scale")]: float(p.detach().float().mean())
            for name, p in model.named_parameters() if name.endswith("cross_modal_scale")}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _time_inference(model: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median seconds of one forward pass over ``x`` (eval mode, no grad), after a warmup."""
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- models

def build_aux(seed: int):
    from .models import vit_for_point_clouds
    _seed(seed)
    return vit_for_point_clouds(num_groups=POINTS["num_groups"], group_size=POINTS["group_size"],
                                hidden=POINTS["hidden"], num_classes=len(SHAPES), **MODEL)


def build_target(seed: int):
    from .models import vit_for_images
    _seed(seed)
    return vit_for_images(img_size=8, patch_size=2, in_chans=1, num_classes=10, **MODEL)


# ---------------------------------------------------------------- training loops

def _train_steps(model, opt, next_batch, steps, eval_fn, eval_every, device, bar, clip=None):
    """The shared loop: warmup-cosine LR, one optimizer step per batch, timed (device-synced), an
    evaluation every ``eval_every`` steps and at the end. Returns (curve, seconds spent training)."""
    warmup = max(1, steps // 20)
    curve = {"step": [], "train_loss": [], "test_acc_step": [], "test_acc": []}
    t_train = 0.0
    for step in range(steps):
        x, y = next_batch()
        x, y = x.to(device), y.to(device)
        for grp in opt.param_groups:
            grp["lr"] = grp["base_lr"] * _lr_at(step, steps, warmup)
        _sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        _sync(device)
        t_train += time.perf_counter() - t0
        curve["step"].append(step + 1)
        curve["train_loss"].append(float(loss.detach()))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = eval_fn()
            curve["test_acc_step"].append(step + 1)
            curve["test_acc"].append(acc)
            bar.set_postfix_str(f"loss {float(loss.detach()):.3f} test acc {acc:.3f}")
        bar.update(1)
    return curve, t_train


def train_aux(model, steps, args, device, progress) -> dict:
    g = torch.Generator().manual_seed(args.seed + 1_000_003)
    test_g = torch.Generator().manual_seed(args.seed + 2_000_003)
    test_x, test_y = point_cloud_batch(512, POINTS["num_points"], test_g)
    test_x, test_y = test_x.to(device), test_y.to(device)
    model.to(device).train()
    opt = _optimizer(model, args.aux_lr, args.scale_lr_mult)
    bar = progress(steps, "auxiliary (point clouds)")
    curve, t_train = _train_steps(
        model, opt, lambda: point_cloud_batch(32, POINTS["num_points"], g), steps,
        lambda: _accuracy(model, test_x, test_y), max(1, steps // 10), device, bar, clip=1.0)
    bar.close()
    chance = 1.0 / len(SHAPES)
    return {"test_acc": curve["test_acc"][-1] if curve["test_acc"] else _accuracy(model, test_x, test_y),
            "chance": chance, "steps": steps, "time_per_step_s": t_train / max(1, steps),
            "num_test": len(test_y), "curve": curve}


def train_target(model, data, steps, eval_every, seed, args, device, bar) -> dict:
    x_tr, y_tr, x_te, y_te = data
    model.to(device).train()
    opt = _optimizer(model, args.lr, args.scale_lr_mult)
    g = torch.Generator().manual_seed(seed + 17)  # same data order for every variant of a seed
    order = {"perm": torch.randperm(len(x_tr), generator=g), "pos": 0}

    def next_batch():
        if order["pos"] + args.batch_size > len(order["perm"]):
            order["perm"], order["pos"] = torch.randperm(len(x_tr), generator=g), 0
        idx = order["perm"][order["pos"]:order["pos"] + args.batch_size]
        order["pos"] += args.batch_size
        return x_tr[idx], y_tr[idx]

    curve, t_train = _train_steps(model, opt, next_batch, steps, lambda: _accuracy(model, x_te, y_te),
                                  eval_every, device, bar)
    return {"test_acc": curve["test_acc"][-1], "time_per_step_s": t_train / max(1, steps),
            "scales": _scales(model), "curve": curve}


# ---------------------------------------------------------------- report

def _plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib is not installed: no PNG; pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    aux = report["auxiliary"]["curve"]
    ax = axes[0]
    ax.plot(aux["step"], aux["train_loss"], lw=0.8, label="train loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title("auxiliary: point-cloud shapes")
    ax2 = ax.twinx()
    ax2.plot(aux["test_acc_step"], aux["test_acc"], "o-", color="tab:red", label="test acc")
    ax2.set_ylabel("test accuracy"), ax2.set_ylim(0, 1)
    ax.legend(loc="center right"), ax2.legend(loc="lower right")
    colors = {"baseline": "tab:gray", "control": "tab:orange", "m2pt": "tab:blue"}
    for v in VARIANTS:
        runs = report["target"]["runs"][v]
        steps = runs[0]["curve"]["test_acc_step"]
        accs = torch.tensor([r["curve"]["test_acc"] for r in runs])
        mean = accs.mean(0)
        axes[1].plot(steps, mean.tolist(), "o-", ms=3, color=colors[v], label=f"{v} ({VARIANT_HELP[v]})")
        if len(runs) > 1:
            lo, hi = accs.min(0).values, accs.max(0).values
            axes[1].fill_between(steps, lo.tolist(), hi.tolist(), color=colors[v], alpha=0.15)
    axes[1].set_xlabel("step"), axes[1].set_ylabel("test accuracy"), axes[1].set_ylim(0, 1)
    axes[1].set_title(f"target: digits ({len(report['target']['runs']['baseline'])} seed(s), min-max band)")
    axes[1].legend(fontsize=8, loc="lower right")
    names = list(report["target"]["runs"]["m2pt"][0]["scales"])
    xs = range(len(names))
    for k, v in enumerate(("control", "m2pt")):
        vals = [statistics.fmean(r["scales"][n] for r in report["target"]["runs"][v]) for n in names]
        axes[2].bar([i + (k - 0.5) * 0.4 for i in xs], vals, width=0.4, color=colors[v], label=v)
    axes[2].set_xticks(list(xs))
    axes[2].set_xticklabels([n.replace("blocks.", "b").replace("attn.", "").replace("mlp.", "") for n in names],
                            rotation=90, fontsize=7)
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].set_title("learned λ per layer (mean over seeds)"), axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


# ---------------------------------------------------------------- main

def run(args: argparse.Namespace) -> dict:
    """The whole demo; torch's global settings (threads, deterministic mode, TF32 flags) are set for
    the run and restored afterwards, so calling it in-process leaves the caller's torch as it was."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark, _fp32_flags())
    try:
        return _run(args)
    finally:
        threads, det, warn_only, bench, fp32_flags = saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.benchmark = bench
        _set_fp32_flags(*fp32_flags)


def _run(args: argparse.Namespace) -> dict:
    from .pathways import PathwayConfig, add_pathways, merge_pathways, save_checkpoint

    t_start = time.perf_counter()
    preset = PRESETS["quick" if args.quick else "full"]
    aux_steps = preset["aux_steps"] if args.aux_steps is None else args.aux_steps
    steps = preset["steps"] if args.steps is None else args.steps
    seeds = preset["seeds"] if args.seeds is None else args.seeds
    eval_every = preset["eval_every"] if args.eval_every is None else args.eval_every
    for name, v in (("--steps", steps), ("--seeds", seeds), ("--eval-every", eval_every), ("--batch-size", args.batch_size)):
        if v < 1:
            raise DemoOptionError(f"{name} must be >= 1, got {v}")
    if aux_steps < 0:
        raise DemoOptionError(f"--aux-steps must be >= 0, got {aux_steps}")
    if args.timing_repeats < 1:
        raise DemoOptionError(f"--timing-repeats must be >= 1, got {args.timing_repeats}")
    for name, v in (("--lr", args.lr), ("--aux-lr", args.aux_lr), ("--scale-lr-mult", args.scale_lr_mult)):
        if not (v > 0 and math.isfinite(v)):
            raise DemoOptionError(f"{name} must be a positive number, got {v}")
    if args.threads is not None and args.threads < 1:
        raise DemoOptionError(f"--threads must be a positive integer, got {args.threads}")
    device = _pick_device(args.device)
    _check_backend(device)
    out = _prepare_out(args.out)
    threads = args.threads or 1
    _set_determinism(threads, device)
    progress = lambda total, desc: _progress(total, desc, not args.no_progress)  # noqa: E731
    print(f"m2pt demo: {'quick' if args.quick else 'full'} run on {device} ({threads} CPU threads); "
          f"aux {aux_steps} steps, target {steps} steps x {len(VARIANTS)} variants x {seeds} seed(s); report -> {out}/")

    # 1. auxiliary
    print("[1/4] training the auxiliary point-cloud transformer "
          f"({len(SHAPES)} shapes: {', '.join(SHAPES)}; {POINTS['num_points']} points, "
          f"{POINTS['num_groups']} groups of {POINTS['group_size']})")
    aux = build_aux(args.seed + 101)
    aux_result = train_aux(aux, aux_steps, args, device, progress)
    print(f"      auxiliary test accuracy {aux_result['test_acc']:.3f} (chance {aux_result['chance']:.3f}), "
          f"{aux_result['time_per_step_s'] * 1e3:.1f} ms/step")
    aux.eval()

    # 2./3. target three ways
    data = [t.to(device) for t in load_digits_split(test_fraction=0.5, split_seed=args.seed)]
    print(f"[2/4] target: sklearn digits, {len(data[0])} train / {len(data[2])} test images (8x8, 2x2 patches)")
    print(f"[3/4] training the target: {', '.join(f'{v} = {VARIANT_HELP[v]}' for v in VARIANTS)}")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    kept: dict[str, nn.Module] = {}
    bar = progress(steps * len(VARIANTS) * seeds, "target runs")
    for s in range(seeds):
        seed = args.seed + 1000 * (s + 1)
        for v in VARIANTS:
            model = build_target(seed)  # same init for the three variants of a seed
            if v == "control":
                add_pathways(model, build_aux(seed + 7), PathwayConfig())
            elif v == "m2pt":
                add_pathways(model, aux, PathwayConfig())
            _seed(seed + 1)
            r = train_target(model, data, steps, eval_every, seed, args, device, bar)
            r["seed"] = seed
            runs[v].append(r)
            if s == 0:
                kept[v] = model
    bar.close()

    summary = {}
    for v in VARIANTS:
        acc_m, acc_s = _mean_std([r["test_acc"] for r in runs[v]])
        t_m, _ = _mean_std([r["time_per_step_s"] for r in runs[v]])
        summary[v] = {"test_acc_mean": acc_m, "test_acc_std": acc_s, "test_accs": [r["test_acc"] for r in runs[v]],
                      "time_per_step_ms": t_m * 1e3}
        if v != "baseline":
            names = list(runs[v][0]["scales"])
            summary[v]["scales_mean"] = {n: statistics.fmean(r["scales"][n] for r in runs[v]) for n in names}

    # 4. merge, check, time, export
    print("[4/4] merging the m2pt model, checking outputs and inference time, exporting")
    trained = kept["m2pt"]
    trained.eval()
    pathway_path = out / "target_with_pathways.safetensors"
    save_checkpoint({k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()}, str(pathway_path))
    merged = merge_pathways(copy.deepcopy(trained))
    merged.eval()
    x_te = data[2][:256]  # one inference batch for the output check and the timing
    with torch.no_grad():
        y_pathway, y_merged = trained(x_te), merged(x_te)
    max_abs_diff = float((y_pathway - y_merged).abs().max())
    with torch.enable_grad():  # the training path: the cross_modal_linear op (fused kernels on GPU)
        y_op = trained(x_te).detach()
    max_abs_diff_op = float((y_op - y_merged).abs().max())
    agree = float((y_pathway.argmax(-1) == y_merged.argmax(-1)).float().mean())
    merged_path = out / "target_merged.safetensors"
    save_checkpoint({k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}, str(merged_path))
    reloaded = build_target(0)
    reloaded.load_state_dict({k: v.to("cpu") for k, v in _load(merged_path).items()}, strict=True)
    reloaded.to(device).eval()
    with torch.no_grad():
        reload_diff = float((reloaded(x_te) - y_merged).abs().max())
    repeats = args.timing_repeats
    baseline = kept["baseline"]
    timing = {}
    for name, m in (("baseline", baseline), ("merged", merged), ("unmerged_pathways", trained)):
        timing[name] = _time_inference(m, x_te, device, repeats)
    # a second pass over the first two, interleaved, to show run-to-run noise on a shared machine
    timing["baseline_again"] = _time_inference(baseline, x_te, device, repeats)
    timing["merged_again"] = _time_inference(merged, x_te, device, repeats)
    n_base = sum(p.numel() for p in baseline.parameters())
    n_merged = sum(p.numel() for p in merged.parameters())
    merge_check = {
        "max_abs_diff_logits": max_abs_diff, "max_abs_diff_logits_training_path": max_abs_diff_op,
        "argmax_agreement": agree,
        "reload_strict_max_abs_diff": reload_diff,
        "params_baseline": n_base, "params_merged": n_merged,
        "params_with_pathways": sum(p.numel() for p in trained.parameters()),
        "inference_batch": len(x_te), "inference_median_s": timing,
        "merged_over_baseline": (timing["merged"] + timing["merged_again"]) / (timing["baseline"] + timing["baseline_again"]),
        "checkpoint_merged": str(merged_path), "checkpoint_with_pathways": str(pathway_path),
    }

    report = {
        "m2pt_kernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "threads": threads, "mode": "quick" if args.quick else "full",
        "config": {"model": MODEL, "points": POINTS, "aux_steps": aux_steps, "steps": steps, "seeds": seeds,
                   "eval_every": eval_every, "batch_size": args.batch_size, "lr": args.lr,
                   "scale_lr_mult": args.scale_lr_mult, "base_seed": args.seed,
                   "aux_lr": args.aux_lr,
                   "optimizer": "AdamW wd 0.05 on matrices, warmup + cosine, label smoothing 0.1; "
                                "aux: grad-norm clip 1.0"},
        "auxiliary": aux_result,
        "target": {"dataset": "sklearn digits 8x8", "num_train": len(data[0]), "num_test": len(data[2]),
                   "summary": summary, "runs": runs},
        "merge": merge_check,
    }
    png = out / "training_curves.png"
    if _plot(report, png):
        report["png"] = str(png)
    report["wall_time_s"] = time.perf_counter() - t_start
    with open(out / "report.json", "w") as f:
        json.dump(report, f, indent=1)

    # summary
    rows = []
    for v in VARIANTS:
        s = summary[v]
        acc = f"{s['test_acc_mean']:.4f}" + (f" ± {s['test_acc_std']:.4f}" if seeds > 1 else "")
        lam = "-"
        if v != "baseline":
            vals = list(s["scales_mean"].values())
            lam = f"{statistics.fmean(vals):+.3f} [{min(vals):+.3f}, {max(vals):+.3f}]"
        rows.append([v, VARIANT_HELP[v], acc, lam, f"{s['time_per_step_ms']:.1f}"])
    print()
    print(f"target test accuracy over {seeds} seed(s) ({len(data[2])} test digits), {steps} steps each:")
    print(_table(rows, ["variant", "what", "test acc" + (" (mean ± std)" if seeds > 1 else ""),
                        "λ mean [min, max]", "ms/step"]))
    print()
    print("learned λ per layer (m2pt, mean over seeds):")
    lam_rows = [[n, f"{summary['m2pt']['scales_mean'][n]:+.4f}", f"{summary['control']['scales_mean'][n]:+.4f}"]
                for n in summary["m2pt"]["scales_mean"]]
    print(_table(lam_rows, ["layer", "m2pt λ", "control λ"]))
    print()
    print(f"merge: max |logits(merged) - logits(pathways)| = {max_abs_diff:.3g} (eval path), "
          f"{max_abs_diff_op:.3g} (training path, the cross_modal_linear op); argmax agreement {agree:.4f}; "
          f"strict reload diff {reload_diff:.3g}")
    print(f"inference on {len(x_te)} digits (median of {repeats}): baseline {timing['baseline'] * 1e3:.2f} / "
          f"{timing['baseline_again'] * 1e3:.2f} ms, merged {timing['merged'] * 1e3:.2f} / "
          f"{timing['merged_again'] * 1e3:.2f} ms, unmerged pathways {timing['unmerged_pathways'] * 1e3:.2f} ms; "
          f"params baseline {n_base}, merged {n_merged}")
    print(f"auxiliary: test accuracy {aux_result['test_acc']:.3f} on {aux_result['num_test']} fresh clouds")
    print(f"report: {out / 'report.json'}" + (f", {png}" if "png" in report else "") +
          f", checkpoints {merged_path.name} (merged) and {pathway_path.name}")
    print(f"wall time {report['wall_time_s']:.1f} s")
    scale = max(1.0, float(y_merged.abs().max()))
    failed = [f"{what} = {diff:.3g}" for what, diff in (
        ("max |logits(merged) - logits(pathways)| (eval path)", max_abs_diff),
        ("the same on the training path", max_abs_diff_op),
        ("max |logits(reloaded merged checkpoint) - logits(merged)|", reload_diff)) if not diff <= MERGE_TOLERANCE * scale]
    if failed:
        raise DemoCheckError(f"the merged model does not compute what the model with pathways did: {'; '.join(failed)} "
                             f"(allowed {MERGE_TOLERANCE:g} x max(1, max |logits|) = {MERGE_TOLERANCE * scale:.3g}); "
                             f"the report is in {out}")
    return report


def _load(path: Path) -> dict:
    from .pathways import load_checkpoint
    return load_checkpoint(str(path))


def main(argv: list[str] | None = None) -> int:
    """``python -m m2pt_kernels.demo [ARGS]``: the same as ``m2pt demo [ARGS]`` (exit codes included)."""
    from .cli import main as cli_main
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
