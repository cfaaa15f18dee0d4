"""The ``m2pt`` command (``python -m m2pt_kernels`` is the same).

    m2pt demo [--quick] [--out DIR] [--device DEV] ...   end-to-end M2PT run on a CPU or GPU
    m2pt info [--json]                                  versions, devices, backends (and why not)
    m2pt merge IN OUT [--force] [--unsafe-pickle]       fold pathways into plain weights
    m2pt bench [ARGS...]                                the benchmark suite (m2pt_kernels.bench)

Exit codes: 0 ok, 2 user error (one line on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from typing import Sequence

__all__ = ["main"]

USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


# ---------------------------------------------------------------- info

def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict:
    import torch

    import m2pt_kernels
    from m2pt_kernels import backend_status

    info: dict = {
        "m2pt_kernels": m2pt_kernels.__version__,
        "location": os.path.dirname(m2pt_kernels.__file__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton") or _dist_version("pytorch-triton"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "M2PT_BACKEND": os.environ.get("M2PT_BACKEND"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "memory_gib": round(p.total_memory / 2**30, 1)})
    info["backends"] = {name: {"available": ok, "why": why} for name, (ok, why) in backend_status().items()}
    info["optional"] = {name: _dist_version(dist) for name, dist in (
        ("safetensors", "safetensors"), ("timm", "timm"), ("transformers", "transformers"),
        ("scikit-learn", "scikit-learn"), ("matplotlib", "matplotlib"), ("tqdm", "tqdm"))}
    return info


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"m2pt_kernels {info['m2pt_kernels']}  ({info['location']})")
    print(f"python       {info['python']}  on {info['platform']}")
    print(f"torch        {info['torch']}  (built with CUDA {info['torch_cuda'] or 'none'})")
    print(f"triton       {info['triton'] or 'not installed'}"
          + (f"  (TRITON_INTERPRET={info['TRITON_INTERPRET']})" if info["TRITON_INTERPRET"] else ""))
    print(f"CPU          {info['cpu_count']} cores, torch uses {info['torch_threads']} threads")
    if info["devices"]:
        for d in info["devices"]:
            print(f"cuda:{d['index']}       {d['name']}  sm_{d['capability'].replace('.', '')}  {d['memory_gib']} GiB")
    else:
        print("CUDA         no CUDA device visible")
    print("backends" + (f"     (M2PT_BACKEND={info['M2PT_BACKEND']})" if info["M2PT_BACKEND"] else ""))
    for name, b in info["backends"].items():
        print(f"  {name:<10} {'yes' if b['available'] else 'no ':<4} {b['why']}")
    print("optional     " + ", ".join(f"{k} {v or 'missing'}" for k, v in info["optional"].items()))
    return 0


# ---------------------------------------------------------------- merge

def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b) or os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def cmd_merge(args: argparse.Namespace) -> int:
    from m2pt_kernels.pathways import (checkpoint_format, is_pathway_state_dict, load_checkpoint,
                                       merge_state_dict, save_checkpoint)

    src, dst = args.input, args.output
    if not os.path.exists(src):
        raise UserError(f"m2pt merge: input checkpoint {src!r} does not exist")
    if os.path.isdir(src):
        raise UserError(f"m2pt merge: input {src!r} is a directory; pass the checkpoint file")
    if _same_file(src, dst):
        raise UserError(f"m2pt merge: OUT is the same file as IN ({src!r}); the input is never overwritten, "
                        "choose another output path")
    try:
        suffix = checkpoint_format(dst)
    except ValueError as exc:
        raise UserError(f"m2pt merge: output: {exc}") from None
    if os.path.isdir(dst):
        raise UserError(f"m2pt merge: output {dst!r} is a directory")
    if os.path.exists(dst) and not args.force:
        raise UserError(f"m2pt merge: output {dst!r} exists; pass --force to overwrite it")
    out_dir = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(out_dir):
        raise UserError(f"m2pt merge: the output folder {out_dir!r} does not exist")
    try:
        sd = load_checkpoint(src, weights_only=not args.unsafe_pickle)
    except Exception as exc:  # any failure to read the user's file is the file's fault
        raise UserError(f"m2pt merge: cannot read {src!r}: {_one_line(exc)}") from None
    if not is_pathway_state_dict(sd):
        raise UserError(f"m2pt merge: {src!r} has no pathways (no '*.aux_weight' / '*.cross_modal_scale' keys): "
                        "nothing to merge; it already loads into the plain architecture")
    try:
        merged = merge_state_dict(sd)
    except ValueError as exc:
        raise UserError(f"m2pt merge: {src!r}: {_one_line(exc)}") from None
    n_layers = sum(1 for k in sd if k.endswith("cross_modal_scale"))
    tmp = os.path.join(out_dir, f".{os.path.basename(dst)}.tmp-{os.getpid()}{suffix}")
    try:
        save_checkpoint(merged, tmp)
        os.replace(tmp, dst)  # never a half-written OUT
    except Exception as exc:  # noqa: BLE001 -- torch.save raises RuntimeError, safetensors its own error type
        raise UserError(f"m2pt merge: cannot write {dst!r}: {_one_line(exc)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    n_params = sum(v.numel() for v in merged.values())
    print(f"merged {n_layers} pathway layer(s) of {src} into plain weights: {len(sd)} -> {len(merged)} tensors, "
          f"{n_params:,} values; wrote {dst}")
    return 0


# ---------------------------------------------------------------- demo / bench

def cmd_demo(args: argparse.Namespace) -> int:
    from m2pt_kernels import demo

    try:
        demo.run(args)
    except ImportError as exc:
        raise UserError(f"m2pt demo: {_one_line(exc)}") from None
    except demo.DemoOptionError as exc:  # bad option values (steps < 1, device, --out, $M2PT_BACKEND, ...)
        raise UserError(f"m2pt demo: {_one_line(exc)}") from None
    except demo.DemoCheckError as exc:  # the demo's own check of its results failed: not the user's error
        print(f"error: m2pt demo: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    try:
        bench = importlib.import_module("m2pt_kernels.bench")
    except ModuleNotFoundError as exc:
        if exc.name in ("m2pt_kernels.bench",):
            raise UserError("m2pt bench: the benchmark suite (m2pt_kernels.bench) is not part of this "
                            "installation") from None
        raise UserError(f"m2pt bench: a dependency of the benchmark suite is missing: {exc.name} "
                        "(pip install 'm2pt_kernels[bench]')") from None
    try:
        rc = bench.main(list(argv))
    except SystemExit as exc:  # argparse inside the suite (--help, a usage error), or the suite's own message
        if isinstance(exc.code, str):
            msg = exc.code if exc.code.startswith("m2pt bench:") else f"m2pt bench: {exc.code}"
            raise UserError(msg) from None
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else USER_ERROR)
    return int(rc or 0)


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    from m2pt_kernels import demo

    p = argparse.ArgumentParser(prog="m2pt", description="Multimodal Pathway (M2PT) kernels and tools.",
                                epilog="exit codes: 0 ok, 1 the demo's check of its own results failed, 2 user error")
    sub = p.add_subparsers(dest="command", metavar="{demo,info,merge,bench}")
    d = sub.add_parser("demo", help="end-to-end M2PT run: point-cloud auxiliary -> digit-image target",
                       description=demo.DESCRIPTION)
    demo.add_arguments(d)
    i = sub.add_parser("info", help="versions, devices, available backends and why not")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    m = sub.add_parser("merge", help="fold every pathway of a training checkpoint into plain weights",
                       description="Fold every '*.aux_weight' / '*.cross_modal_scale' of a training checkpoint "
                                   "(this package's or the paper's CrossModalReparamLinear format) into "
                                   "'*.weight' (W + λ·W'); the result loads into the original architecture "
                                   "with strict=True. The input is never modified.")
    m.add_argument("input", metavar="IN", help="training checkpoint (.pth/.pt/.bin/.ckpt/.pth.tar/.safetensors)")
    m.add_argument("output", metavar="OUT", help="merged checkpoint to write (format from its suffix)")
    m.add_argument("--force", action="store_true", help="overwrite OUT if it exists (never IN)")
    m.add_argument("--unsafe-pickle", action="store_true",
                   help="read IN with torch.load(weights_only=False); only for files you trust")
    sub.add_parser("bench", help="the benchmark suite: m2pt bench [ARGS...] (see m2pt bench --help)",
                   add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            return int(exc.code or 0)
        if args.command is None:
            parser.print_help()
            return USER_ERROR
        if args.command == "info":
            return cmd_info(args)
        if args.command == "merge":
            return cmd_merge(args)
        return cmd_demo(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
