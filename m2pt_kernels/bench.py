r"""Benchmarks of ``m2pt::cross_modal_linear`` against the plain linear layer and the paper's layer.

``python -m m2pt_kernels.bench`` / ``m2pt bench`` / ``benchmarks/run.py`` run :func:`main` (quick
mode by default). One run times every provider side by side on the same random inputs:

- ``plain``: ``F.linear`` with an ``nn.Linear``'s parameters of the same shape (the floor);
- ``paper``: the paper's layer (:class:`m2pt_kernels.baselines.PaperCrossModalReparamLinear`,
  materializes ``W + λ·W'``, autograd does the rest), cast to the case's dtype like ``model.to()``;
- ``paper_compiled``: the same layer under ``torch.compile`` (M marked dynamic: one compile per
  weight shape);
- ours: the drop-in layer (:class:`m2pt_kernels.layers.FusedCrossModalLinear`, which calls
  ``m2pt_kernels.cross_modal_linear``), called as a module like the paper's, under
  ``use_backend(name)`` for ``auto``, ``triton``, ``cuda`` and ``reference``.

Passes: ``fwd`` (training forward, autograd recording), ``bwd`` (backward alone; the forward runs
untimed before each repeat), ``fwd+bwd``, and ``probe`` (linear probing: only λ and x need
gradients). Every figure is a median over repeats with the 20th and 80th percentiles; GPU times come
from CUDA events around each repeat, CPU times from ``time.perf_counter``. Inputs are random (never
zeros) and several input sets (x, W, W', λ, b, dy) are rotated so that the caches don't flatter.
Gradients are set to None before every repeat, as ``optimizer.zero_grad()`` does, so nothing
accumulates. A GPU run first measures its ceilings (device-to-device copy bandwidth, an 8192³ bf16
matmul) and reports every case's achieved TFLOP/s and fraction of those ceilings.

The results are one JSON object (schema: ``RESULT_KEYS`` / ``CASE_KEYS`` and
:func:`validate_results`), written after every case so that a run killed by a timeout still leaves
what it measured; :func:`markdown_table` renders it and :func:`plot_results` draws it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._precision import fp32_matmul_precision_name

SCHEMA_VERSION = 1

# ViT widths; the four block linears in timm's names, as (K, N) for width D.
MODELS = {"tiny": 32, "vit_ti16": 192, "vit_s16": 384, "vit_b16": 768, "vit_l16": 1024}
LAYERS = ("qkv", "proj", "fc1", "fc2")
M_FULL = (197, 1576, 12608, 50432)  # tokens: 1, 8, 64 and 256 images of 197 tokens
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd+bwd", "fwd", "bwd", "probe")
PROVIDERS = ("plain", "paper", "auto", "triton", "cuda", "reference", "paper_compiled")
OURS = ("auto", "triton", "cuda", "reference")
RESULT_KEYS = ("schema_version", "device", "device_type", "torch", "triton", "cuda", "python", "commit",
               "date", "mode", "peaks", "providers", "skipped", "cases", "dropped", "whole_model",
               "merge_inference", "targets", "elapsed_s", "complete")
CASE_KEYS = ("layer", "model", "M", "K", "N", "dtype", "aux_trainable", "pass", "ms", "ms_spread",
             "peak_mb", "tflops", "flops", "bytes_min", "floor_ms", "errors")
MB = 1024.0 ** 2


def layer_shape(layer: str, width: int) -> tuple[int, int]:
    """(K, N) of a ViT block linear of width ``width`` (MLP ratio 4)."""
    return {"qkv": (width, 3 * width), "proj": (width, width),
            "fc1": (width, 4 * width), "fc2": (4 * width, width)}[layer]


@dataclass(frozen=True)
class Case:
    layer: str
    model: str
    M: int
    K: int
    N: int
    dtype: str
    aux_trainable: bool
    pass_: str
    priority: int = 9

    def key(self) -> tuple:
        return (self.model, self.layer, self.M, self.dtype, self.aux_trainable, self.pass_)

    def label(self) -> str:
        aux = "aux trainable" if self.aux_trainable else "aux frozen"
        return f"{self.model}.{self.layer} M={self.M} {self.K}->{self.N} {self.dtype} {self.pass_} {aux}"


# ---------------------------------------------------------------------------- counting
def case_flops(c: Case) -> int:
    """Matmul FLOPs of the pass: forward 2MNK; backward 2MNK for dx plus 2MNK for G = dyᵀx
    (needed for dW, dW' and dλ alike, so also in linear probing)."""
    mnk = 2 * c.M * c.N * c.K
    return {"fwd": mnk, "bwd": 2 * mnk, "fwd+bwd": 3 * mnk, "probe": 3 * mnk}[c.pass_]


def case_bytes(c: Case) -> int:
    """The fewest bytes the pass must move: each input read once, each output written once.

    forward: x, W, W', b in, y out. backward: dy, x, W, W' in; dx, dW (not in probe), dW' (when
    trainable), db (not in probe) out. λ is 4 bytes and ignored.
    """
    e = DTYPES[c.dtype].itemsize
    M, K, N = c.M, c.K, c.N
    fwd = (M * K + 2 * N * K + N + M * N) * e
    probe = c.pass_ == "probe"
    bwd_out = M * K + (0 if probe else N * K + N) + (N * K if c.aux_trainable and not probe else 0)
    bwd = (M * N + M * K + 2 * N * K + bwd_out) * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd, "probe": fwd + bwd}[c.pass_]


# ---------------------------------------------------------------------------- case grids
def full_grid() -> list[Case]:
    """Every case of the GPU run, by priority (0 first): what the budget drops last comes first."""
    cases: list[Case] = []

    def add(model, dtype, aux, pas, prio, ms=M_FULL):
        for M in ms:
            for layer in LAYERS:
                K, N = layer_shape(layer, MODELS[model])
                cases.append(Case(layer, model, M, K, N, dtype, aux, pas, prio))

    add("vit_b16", "bf16", True, "fwd+bwd", 0)
    add("vit_b16", "bf16", False, "fwd+bwd", 1)
    add("vit_b16", "bf16", True, "probe", 1)
    add("vit_b16", "bf16", True, "fwd", 2)
    add("vit_b16", "bf16", True, "bwd", 2)
    add("vit_l16", "bf16", True, "fwd+bwd", 3)
    add("vit_b16", "fp16", True, "fwd+bwd", 4)
    add("vit_b16", "fp32", True, "fwd+bwd", 5)
    add("vit_l16", "bf16", False, "fwd+bwd", 6)
    add("vit_l16", "bf16", True, "probe", 6)
    add("vit_l16", "fp16", True, "fwd+bwd", 7)
    add("vit_l16", "fp32", True, "fwd+bwd", 8)
    return cases


def quick_grid(device_type: str, tiny: bool = False) -> list[Case]:
    """Quick mode: on a GPU the priority-0 set (bf16 ViT-B, all M, fwd+bwd, aux trainable); on the
    CPU small ViT-like shapes at one image (M=197) in fp32; ``tiny``: seconds-long smoke shapes."""
    if tiny:
        K, N = layer_shape("qkv", MODELS["tiny"])
        out = [Case("qkv", "tiny", 17, K, N, "fp32", aux, pas, 0)
               for pas, aux in (("fwd+bwd", True), ("probe", True), ("fwd", False), ("bwd", False))]
        K, N = layer_shape("fc2", MODELS["tiny"])
        return out + [Case("fc2", "tiny", 33, K, N, "fp32", True, "fwd+bwd", 0)]
    if device_type == "cuda":
        return [c for c in full_grid() if c.priority == 0]
    out = []
    for model in ("vit_ti16", "vit_s16", "vit_b16"):
        for layer in LAYERS:
            K, N = layer_shape(layer, MODELS[model])
            out.append(Case(layer, model, 197, K, N, "fp32", True, "fwd+bwd", 0))
    for layer in LAYERS:
        K, N = layer_shape(layer, MODELS["vit_s16"])
        out.append(Case(layer, "vit_s16", 197, K, N, "fp32", True, "probe", 1))
        out.append(Case(layer, "vit_s16", 197, K, N, "fp32", False, "fwd+bwd", 1))
    return out


def filter_cases(cases: list[Case], args) -> list[Case]:
    def keep(c: Case) -> bool:
        return ((not args.models or c.model in args.models) and (not args.layers or c.layer in args.layers)
                and (not args.M or c.M in args.M) and (not args.dtypes or c.dtype in args.dtypes)
                and (not args.passes or c.pass_ in args.passes)
                and (args.aux is None or c.aux_trainable == (args.aux == "trainable")))
    return [c for c in cases if keep(c)]


def grid_from_lists(args) -> list[Case]:
    """An explicit grid from --models/--layers/--M/--dtypes/--passes (used with --grid explicit)."""
    out = []
    for model in args.models or ["vit_b16"]:
        for M in args.M or [197]:
            for layer in args.layers or list(LAYERS):
                K, N = layer_shape(layer, MODELS[model])
                for dtype in args.dtypes or ["bf16"]:
                    for pas in args.passes or ["fwd+bwd"]:
                        for aux in ([args.aux == "trainable"] if args.aux else [True]):
                            out.append(Case(layer, model, M, K, N, dtype, aux, pas, 0))
    return out


# ---------------------------------------------------------------------------- environment
def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    env = os.environ.get("M2PT_COMMIT")
    if env:
        return env
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except Exception:
        return None


def _loadavg() -> Optional[list[float]]:
    """The 1/5/15-minute load averages (a busy host makes CPU timings noisy); None where unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
        return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-") or "gpu"
    return f"cpu{os.cpu_count()}"


# ---------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) without numpy."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> tuple[float, list[float]]:
    return quantile(times_ms, 0.5), [quantile(times_ms, 0.2), quantile(times_ms, 0.8)]


def time_loop(step: Callable[[int], None], device: torch.device, *, setup: Optional[Callable[[int], None]] = None,
              warmup: int = 3, reps: Optional[int] = None, target_s: float = 0.2,
              min_reps: int = 5, max_reps: int = 200) -> list[float]:
    """Milliseconds of ``step(i)`` for each repeat; ``setup(i)`` runs untimed before each.

    GPU: a CUDA event pair around each repeat (setup's work is queued before the start event);
    CPU: ``time.perf_counter`` around each. With ``reps=None`` the count is chosen from the
    warm-up's time so that the timed repeats take about ``target_s``.
    """
    t0 = time.perf_counter()
    for i in range(warmup):
        if setup is not None:
            setup(i)
        step(i)
    _sync(device)
    per = (time.perf_counter() - t0) / max(warmup, 1)
    if reps is None:
        reps = int(min(max_reps, max(min_reps, target_s / max(per, 1e-6))))
    times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if setup is not None:
                setup(i)
            starts[i].record()
            step(i)
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(reps):
            if setup is not None:
                setup(i)
            t = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t) * 1e3)
    return times


def measure_peaks(device: torch.device, small: bool = False) -> dict:
    """The two ceilings: copy bandwidth (bytes read + written) and a bf16 (CPU: fp32) matmul rate."""
    peaks: dict = {}
    try:
        nbytes = (64 if small else 256) * 2 ** 20 if device.type == "cpu" else 2 * 2 ** 30
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        times = time_loop(lambda i: dst.copy_(src), device, warmup=3, reps=10 if device.type == "cpu" else 30)
        ms, spread = summarize(times)
        peaks["copy_gbps"] = 2 * nbytes / (ms * 1e-3) / 1e9
        peaks["copy_bytes"] = nbytes
        del src, dst
    except Exception as exc:  # a ceiling that can't be measured is recorded, not fatal
        peaks["copy_error"] = f"{type(exc).__name__}: {exc}"
    try:
        if device.type == "cuda":
            n, dtype = 8192, torch.bfloat16
        else:
            n, dtype = (256 if small else 1024), torch.float32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = time_loop(lambda i: torch.mm(a, b), device, warmup=3, reps=5 if device.type == "cpu" else 30)
        ms, _ = summarize(times)
        peaks["matmul_tflops"] = 2 * n ** 3 / (ms * 1e-3) / 1e12
        peaks["matmul_shape"] = [n, n, n]
        peaks["matmul_dtype"] = str(dtype).replace("torch.", "")
        del a, b
    except Exception as exc:
        peaks["matmul_error"] = f"{type(exc).__name__}: {exc}"
    return peaks


# ---------------------------------------------------------------------------- providers
def provider_status(device: torch.device, allow_interpreter: bool = False, compile_ok: bool = True) -> dict:
    """Per provider: {"ok": bool, "reason": str} for this device (before any case runs)."""
    from . import _dispatch
    out = {"plain": {"ok": True, "reason": "F.linear with nn.Linear parameters (the floor)"},
           "paper": {"ok": True, "reason": "PaperCrossModalReparamLinear, eager"}}
    if not compile_ok:
        out["paper_compiled"] = {"ok": False, "reason": "torch.compile disabled (--no-compile)"}
    else:
        out["paper_compiled"] = {"ok": True, "reason": "PaperCrossModalReparamLinear under torch.compile"}
    status = _dispatch.backend_status()
    probe = torch.empty(1, device=device)
    try:
        resolved = _dispatch.resolve(probe, "auto")
        out["auto"] = {"ok": True, "reason": f"dispatches to {resolved!r} for fp32 {device.type} tensors"}
    except Exception as exc:
        out["auto"] = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    for name in ("triton", "cuda", "reference"):
        ok, why = status[name]
        if ok and name == "triton" and device.type != "cuda" and not allow_interpreter:
            ok, why = False, ("the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool, not a "
                              "performance path; pass --allow-interpreter to time it anyway")
        if ok and name == "cuda" and device.type != "cuda":
            ok, why = False, "the cuda backend needs a CUDA device"
        out[name] = {"ok": bool(ok), "reason": why}
    return out


class _Instance:
    """One input set for one provider: the callable, its inputs, and what needs gradients."""

    def __init__(self, fn, x, dy, grads: dict, backend=None):
        self.fn, self.x, self.dy = fn, x, dy
        self.named_grads = grads  # name -> tensor whose gradient a repeat produces
        self.grads = list(grads.values())
        self.backend = backend  # ours: the use_backend() name to hold around calls of fn
        self.y = None

    def backend_ctx(self):
        """``use_backend(name)`` for our providers (entered once around a timing loop: its entry
        check is not part of the op's per-call cost), else a null context."""
        if self.backend is None:
            return contextlib.nullcontext()
        from ._dispatch import use_backend
        return use_backend(self.backend)

    def clear_grads(self):
        for t in self.grads:
            t.grad = None


def _paper_forward(layer, x):
    return layer(x)


_COMPILED: dict = {}


def _compiled_paper(mode: Optional[str]):
    fn = _COMPILED.get(mode)
    if fn is None:
        dyn = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # many shapes share one code object
            if hasattr(dyn, name):
                setattr(dyn, name, max(getattr(dyn, name), 512))
        if hasattr(dyn, "accumulated_recompile_limit"):
            dyn.accumulated_recompile_limit = max(dyn.accumulated_recompile_limit, 4096)
        elif hasattr(dyn, "accumulated_cache_size_limit"):
            dyn.accumulated_cache_size_limit = max(dyn.accumulated_cache_size_limit, 4096)
        fn = _COMPILED[mode] = torch.compile(_paper_forward, mode=mode)
    return fn


def _random_set(c: Case, device, gen: torch.Generator):
    dtype = DTYPES[c.dtype]

    def rn(*shape, scale=1.0, dt=dtype):  # drawn on the device: CPU-side randn of 10⁸ values is slow
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype=dt)

    return {
        "x": rn(c.M, c.K),
        "w": rn(c.N, c.K, scale=c.K ** -0.5),
        "aux": rn(c.N, c.K, scale=c.K ** -0.5),
        "lam": rn(1, scale=0.1, dt=torch.float32) + 0.05,  # never 0
        "b": rn(c.N, scale=0.1),
        "dy": rn(c.M, c.N, scale=c.N ** -0.5),
    }


def _load_case_tensors(layer: nn.Module, data: dict, probe: bool, x: torch.Tensor) -> dict:
    """Give a pathway layer (the paper's or ours) the case's W, b and λ, freeze W and b for linear
    probing, and return the tensors whose gradients a repeat produces, by name (x first)."""
    with torch.no_grad():
        layer.weight.copy_(data["w"])
        layer.bias.copy_(data["b"])
        layer.cross_modal_scale.copy_(data["lam"])
    if probe:
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
    return {"x": x, **{n: p for n, p in layer.named_parameters() if p.requires_grad}}


def make_instance(provider: str, c: Case, data: dict, compile_mode: Optional[str]) -> _Instance:
    from .baselines import PaperCrossModalReparamLinear
    probe = c.pass_ == "probe"
    x = data["x"].clone().requires_grad_(True)
    if provider == "plain":
        w = data["w"].clone().requires_grad_(not probe)
        b = data["b"].clone().requires_grad_(not probe)
        return _Instance(lambda: F.linear(x, w, b), x, data["dy"],
                         {n: t for n, t in (("x", x), ("weight", w), ("bias", b)) if t.requires_grad})
    if provider in ("paper", "paper_compiled"):
        K, N = c.K, c.N
        layer = PaperCrossModalReparamLinear(K, N, bias=True, aux_weight=data["aux"],
                                             is_aux_trainable=c.aux_trainable and not probe,
                                             device=data["w"].device, dtype=data["w"].dtype)
        grads = _load_case_tensors(layer, data, probe, x)
        layer.to(DTYPES[c.dtype])  # what model.to(dtype) does to the paper's layer: λ too
        if provider == "paper":
            return _Instance(lambda: layer(x), x, data["dy"], grads)
        compiled = _compiled_paper(compile_mode)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return _Instance(lambda: compiled(layer, x), x, data["dy"], grads)
    if provider in OURS:
        # The drop-in layer, called as a module like the paper's: the comparison users make, with
        # the same per-call Python on both sides (module call, parameter reads).
        from .layers import FusedCrossModalLinear
        layer = FusedCrossModalLinear(c.K, c.N, bias=True, aux_weight=data["aux"],
                                      aux_trainable=c.aux_trainable and not probe,
                                      device=data["w"].device, dtype=data["w"].dtype)
        grads = _load_case_tensors(layer, data, probe, x)  # λ stays fp32 (the layer keeps it so)
        return _Instance(lambda: layer(x), x, data["dy"], grads, backend=provider)
    raise ValueError(f"unknown provider {provider!r}; choose from {list(PROVIDERS)}")


def n_input_sets(c: Case, device: torch.device) -> int:
    """Enough rotated input sets that together they are ≥ 3× the L2 (GPU); 2 on the CPU."""
    if device.type != "cuda":
        return 2
    e = DTYPES[c.dtype].itemsize
    set_bytes = (c.M * c.K + 2 * c.N * c.K + c.N + c.M * c.N) * e
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20) or 50 * 2 ** 20
    return int(min(32, max(2, math.ceil(3 * l2 / set_bytes))))


class _Runner:
    """One provider on one case: its input-set instances and the pass's step / setup functions."""

    def __init__(self, provider: str, c: Case, sets: list, device, args):
        self.provider, self.c, self.device, self.args = provider, c, device, args
        self.insts = [make_instance(provider, c, d, args.compile_mode) for d in sets]
        n = len(self.insts)
        insts = self.insts

        def fwd(i):
            inst = insts[i % n]
            inst.y = inst.fn()
            inst.y = None

        def fwd_bwd(i):
            inst = insts[i % n]
            inst.fn().backward(inst.dy)

        def bwd_setup(i):
            inst = insts[i % n]
            inst.clear_grads()
            inst.y = inst.fn()

        def bwd(i):
            inst = insts[i % n]
            y, inst.y = inst.y, None
            y.backward(inst.dy)

        def clear(i):
            insts[i % n].clear_grads()

        self.bwd_setup = bwd_setup
        if c.pass_ == "fwd":
            self.step, self.setup = fwd, clear
        elif c.pass_ == "bwd":
            self.step, self.setup = bwd, bwd_setup
        else:
            self.step, self.setup = fwd_bwd, clear
        self.reps_per_round = 0
        self.times: list[float] = []
        self.round_ms: list[float] = []  # each round's mean, for the paired ratios
        self.peak: Optional[float] = None

    def prepare(self, rounds: int) -> None:
        """Peak memory (GPU: one untimed pass above what is already allocated, after a first one that
        compiles and autotunes), warm-up and the repeat count per round (``--reps`` in all, or
        ~``--target-s`` of timing)."""
        device, n = self.device, len(self.insts)
        with self.insts[0].backend_ctx():
            if device.type == "cuda":
                # one untimed step first: the Triton autotuner's first call benchmarks its configs with
                # a 256 MiB cache-flush buffer, and compiles allocate too; neither belongs in the peak
                self.setup(0)
                self.step(0)
                for inst in self.insts:
                    inst.clear_grads()
                if self.c.pass_ == "bwd":
                    self.bwd_setup(0)
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                self.step(0)
                _sync(device)
                self.peak = (torch.cuda.max_memory_allocated(device) - base) / MB
            warmup = max(3, n) if device.type == "cuda" else 2
            t0 = time.perf_counter()
            time_loop(self.step, device, setup=self.setup, warmup=warmup, reps=1)
            per = (time.perf_counter() - t0) / (warmup + 1)
        if self.args.reps:
            total = self.args.reps
        else:
            total = int(min(self.args.max_reps, max(5, self.args.target_s / max(per, 1e-6))))
        if device.type == "cuda":
            total = max(total, n)
        self.reps_per_round = max(1, math.ceil(total / rounds))

    def timed_round(self, offset: int) -> None:
        with self.insts[0].backend_ctx():
            times = time_loop(lambda i: self.step(i + offset), self.device,
                              setup=lambda i: self.setup(i + offset), warmup=0, reps=self.reps_per_round)
        self.times += times
        self.round_ms.append(sum(times) / len(times))

    def close(self) -> None:
        for inst in self.insts:
            inst.clear_grads()
        self.insts = []


def paired_ratio(num_ms: list[float], den_ms: list[float], n_boot: int = 2000) -> Optional[dict]:
    """Median over rounds of ``num / den`` (each round's mean times, measured side by side) and a
    bootstrap 95% interval of that median (fixed seed: a file's numbers can be recomputed). A
    drift in clocks or load between rounds cancels in each round's ratio, which the ratio of the
    two overall medians does not do."""
    ratios = sorted(a / b for a, b in zip(num_ms, den_ms) if a > 0 and b > 0)
    if not ratios:
        return None
    rng = random.Random(len(ratios))
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n_boot))
    return {"median": statistics.median(ratios), "ci95": [boot[int(0.025 * n_boot)], boot[int(0.975 * n_boot) - 1]],
            "rounds": len(ratios)}


def _rotated(names: list, r: int) -> list:
    """Round ``r``'s order: the list rotated by ``r``, so no provider always runs right after
    another one (whose caches, clocks and allocator state it would inherit)."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def run_case(c: Case, providers: list[str], status: dict, device, args, peaks: dict) -> dict:
    """Time every provider on one case. The providers' repeats are interleaved in rounds
    (``--rounds``), so a change in the machine's load or clocks during the case hits them alike, and
    their order rotates from round to round."""
    gen = torch.Generator(device=device).manual_seed(sum(map(ord, repr(c.key()))) * 7919 + 1)
    nsets = n_input_sets(c, device)
    sets = [_random_set(c, device, gen) for _ in range(nsets)]
    flops, nbytes = case_flops(c), case_bytes(c)
    rec = {"layer": c.layer, "model": c.model, "M": c.M, "K": c.K, "N": c.N, "dtype": c.dtype,
           "aux_trainable": c.aux_trainable, "pass": c.pass_, "priority": c.priority,
           "ms": {}, "ms_spread": {}, "peak_mb": {}, "tflops": {}, "reps": {},
           "flops": flops, "bytes_min": nbytes, "n_input_sets": nsets, "errors": {}}
    rec["floor_ms"] = floor_ms(flops, nbytes, c.dtype, peaks)
    if "auto" in providers:
        from . import _dispatch
        try:
            rec["auto_resolves_to"] = _dispatch.resolve(sets[0]["x"], "auto")
        except Exception as exc:
            rec["auto_resolves_to"] = f"error: {exc}"

    def fail(p, exc):
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        rec["errors"][p] = msg
        print(f"  {p:>15}: FAILED {msg}", flush=True)

    rounds = max(1, args.rounds)
    runners: dict = {}
    for p in providers:
        if not status[p]["ok"]:
            continue
        t0 = time.perf_counter()
        try:
            r = _Runner(p, c, sets, device, args)
            r.prepare(rounds)
            runners[p] = r
        except Exception as exc:
            fail(p, exc)
        finally:
            if p == "paper_compiled":
                args._compile_spent += time.perf_counter() - t0
    offset = 0
    for r in range(rounds):
        for p in _rotated(list(runners), r):
            try:
                runners[p].timed_round(offset)
            except Exception as exc:
                fail(p, exc)
                runners.pop(p).close()
        offset += max((r.reps_per_round for r in runners.values()), default=0)
    paper = runners.get("paper")
    if paper is not None and len(runners) > 1:
        rec["paired_x_paper"] = {p: paired_ratio(r.round_ms, paper.round_ms)
                                 for p, r in runners.items() if p != "paper" and len(r.round_ms) == len(paper.round_ms)}
    for p, r in runners.items():
        ms, spread = summarize(r.times)
        rec["ms"][p] = ms
        rec["ms_spread"][p] = spread
        rec["peak_mb"][p] = r.peak
        rec["reps"][p] = len(r.times)
        rec["tflops"][p] = flops / (ms * 1e-3) / 1e12
        r.close()
    runners.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def floor_ms(flops: int, nbytes: int, dtype: str, peaks: dict) -> Optional[float]:
    """max(FLOPs / matmul ceiling, bytes / copy bandwidth) with the measured ceilings (the bf16 matmul
    ceiling is used for bf16/fp16 only; None when it does not apply)."""
    tf = peaks.get("matmul_tflops")
    bw = peaks.get("copy_gbps")
    if not tf or not bw:
        return None
    mm_dtype = peaks.get("matmul_dtype")
    if not ((dtype in ("bf16", "fp16") and mm_dtype == "bfloat16") or (dtype == "fp32" and mm_dtype == "float32")):
        return None
    return max(flops / (tf * 1e12), nbytes / (bw * 1e9)) * 1e3


# ---------------------------------------------------------------------------- whole model
VIT_CONFIGS = {
    "vit_b16": {"img": 224, "patch": 16, "width": 768, "depth": 12, "heads": 12, "classes": 1000},
    "tiny": {"img": 32, "patch": 8, "width": 32, "depth": 2, "heads": 2, "classes": 10},
}


class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BenchViT(nn.Module):
    """A timm-style ViT (timm's module names: blocks.i.attn.qkv / attn.proj / mlp.fc1 / mlp.fc2)."""

    def __init__(self, img=224, patch=16, width=768, depth=12, heads=12, classes=1000):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[_Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, classes)
        self.tokens = n + 1

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class _OwnPathwayLinear(nn.Module):
    """Fallback pathway layer on the functional op (used when m2pt_kernels.layers is missing)."""

    def __init__(self, linear: nn.Linear, aux: torch.Tensor, aux_trainable: bool):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.aux_weight = nn.Parameter(aux.detach().clone(), requires_grad=aux_trainable)
        self.cross_modal_scale = nn.Parameter(torch.zeros(1, device=aux.device))

    def forward(self, x):
        from .ops.cross_modal_linear import cross_modal_linear
        return cross_modal_linear(x, self.weight, self.aux_weight, self.cross_modal_scale, self.bias)


def _pathway_targets(model: nn.Module):
    for block in model.blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
            yield parent, name


def add_bench_pathways(model: nn.Module, variant: str, aux_trainable: bool, gen: torch.Generator) -> str:
    """Replace the block linears with pathway layers in place; returns the layer class used."""
    used = None
    for parent, name in _pathway_targets(model):
        lin = getattr(parent, name)
        aux = (torch.randn(lin.weight.shape, generator=gen) * lin.weight.detach().float().std().cpu()).to(
            lin.weight.device, lin.weight.dtype)
        lam = torch.randn(1, generator=gen) * 0.05 + 0.05
        if variant == "paper":
            from .baselines import PaperCrossModalReparamLinear
            new = PaperCrossModalReparamLinear(lin.in_features, lin.out_features, bias=True, origin_layer=lin,
                                               aux_weight=aux, is_aux_trainable=aux_trainable,
                                               device=lin.weight.device, dtype=lin.weight.dtype)
        else:
            try:
                from .layers import FusedCrossModalLinear
                new = FusedCrossModalLinear.from_linear(lin, aux, aux_trainable=aux_trainable)
            except ImportError:
                new = _OwnPathwayLinear(lin, aux, aux_trainable)
        with torch.no_grad():
            new.cross_modal_scale.copy_(lam.to(new.cross_modal_scale.device))
        setattr(parent, name, new)
        used = f"{type(new).__module__}.{type(new).__name__}"
    return used or "none"


def merge_bench_pathways(model: nn.Module) -> tuple[nn.Module, str]:
    """Fold W + λ·W' into plain nn.Linear layers: ``m2pt_kernels.merge_pathways`` when the package
    has it, else each layer's ``merge()``, else by hand here."""
    import m2pt_kernels
    merge = getattr(m2pt_kernels, "merge_pathways", None)
    if merge is not None:
        out = merge(model)
        return (out if isinstance(out, nn.Module) else model), "m2pt_kernels.merge_pathways"
    how = "manual fold"
    for parent, name in _pathway_targets(model):
        layer = getattr(parent, name)
        if hasattr(layer, "merge"):
            setattr(parent, name, layer.merge())
            how = "layer.merge()"
            continue
        w = layer.weight.detach()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            merged = w.float() + layer.cross_modal_scale.detach().float().view(-1, 1) * layer.aux_weight.detach().float()
            lin.weight.copy_(merged.to(w.dtype))
            if layer.bias is not None:
                lin.bias.copy_(layer.bias.detach())
        setattr(parent, name, lin)
    return model, how


def run_whole_model(device, args, peaks: dict) -> tuple[dict, dict]:
    """Training step (forward, backward, AdamW) of a ViT without pathways, with the paper's layers and
    with ours; then inference after merging ours against the plain model.

    Every variant is built (and, on a GPU, its memory measured) first; then their timed steps are
    interleaved in ``--rounds`` rounds like the layer providers', so a drift in the machine's clocks
    or load hits them alike and the ratios are measured side by side."""
    cfg = dict(VIT_CONFIGS["tiny" if args.tiny or device.type != "cuda" else "vit_b16"])
    if device.type != "cuda" and not args.tiny:
        cfg.update(img=64, patch=16, width=192, depth=2, heads=3)  # a ViT-Ti-width stand-in, 2 blocks
    batch = args.model_batch or (64 if device.type == "cuda" else 2)
    amp = device.type == "cuda"
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    base = BenchViT(**cfg).to(device)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    imgs = [torch.randn(batch, 3, cfg["img"], cfg["img"], generator=gen).to(device) for _ in range(2)]
    labels = [torch.randint(0, cfg["classes"], (batch,), generator=gen).to(device) for _ in range(2)]
    tokens = batch * base.tokens
    out = {"config": cfg, "batch": batch, "tokens_per_step": tokens,
           "autocast": "bf16" if amp else None, "optimizer": "AdamW", "interleaved_rounds": max(1, args.rounds),
           "variants": {}, "errors": {}}
    variants = [("plain", None, None), ("paper", "paper", True), ("ours", "ours", True),
                ("paper_aux_frozen", "paper", False), ("ours_aux_frozen", "ours", False)]
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def fail(name, exc):
        out["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
        out["variants"].pop(name, None)
        steps.pop(name, None)
        print(f"  whole model {name}: FAILED {out['errors'][name]}", flush=True)

    steps: dict = {}  # name -> step(i), for the variants built without error
    models: dict = {}
    for name, kind, aux_trainable in variants:
        try:
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            model = BenchViT(**cfg).to(device)
            model.load_state_dict(state)
            layer_cls = "torch.nn.Linear"
            if kind is not None:
                layer_cls = add_bench_pathways(model, kind, aux_trainable, gen)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step(i, model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                with ctx():
                    logits = model(imgs[i % 2])
                F.cross_entropy(logits.float(), labels[i % 2]).backward()
                opt.step()

            step(0)  # creates the optimizer state and the gradients
            _sync(device)
            rec = {"layer": layer_cls,
                   "n_params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "peak_mb": None}
            if device.type == "cuda":  # this variant's own memory: from before its model to its step's peak
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                step(1)
                _sync(device)
                rec["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / MB
                rec["peak_above_resident_mb"] = (torch.cuda.max_memory_allocated(device) - resident) / MB
            out["variants"][name] = rec
            steps[name], models[name] = step, model
        except Exception as exc:
            fail(name, exc)

    # Repeats per variant: --model-reps in all, or about target_s of the slowest variant's steps.
    per = 0.0
    for name in list(steps):
        try:
            t0 = time.perf_counter()
            time_loop(steps[name], device, warmup=2, reps=1)
            per = max(per, (time.perf_counter() - t0) / 3)
        except Exception as exc:
            fail(name, exc)
    target_s = 1.0 if device.type == "cuda" else (0.2 if args.tiny else 0.5)
    total = args.model_reps or int(min(30, max(5, target_s / max(per, 1e-6))))
    rounds = max(1, args.rounds)
    per_round = max(1, math.ceil(total / rounds))
    times: dict = {name: [] for name in steps}
    round_ms: dict = {name: [] for name in steps}
    for r in range(rounds):
        for name in _rotated(list(steps), r):
            try:
                t = time_loop(lambda i, f=steps[name], o=r * per_round: f(i + o), device, warmup=0, reps=per_round)
            except Exception as exc:
                fail(name, exc)
                continue
            times[name] += t
            round_ms[name].append(sum(t) / len(t))
    for name in steps:
        ms, spread = summarize(times[name])
        out["variants"][name].update({"ms": ms, "ms_spread": spread, "reps": len(times[name]),
                                      "tokens_per_s": tokens / (ms * 1e-3)})
        print(f"  whole model {name}: {ms:.3f} ms/step", flush=True)
    v = out["variants"]
    if "plain" in v:
        for name in v:
            v[name]["x_plain"] = v[name]["ms"] / v["plain"]["ms"]
    out["paired"] = {f"{a}/{b}": paired_ratio(round_ms[a], round_ms[b])
                     for a, b in (("ours", "paper"), ("ours_aux_frozen", "paper_aux_frozen"), ("ours", "plain"))
                     if a in steps and b in steps}
    ours_model = models.pop("ours", None)
    models.clear()
    steps.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    merge = run_merge_inference(ours_model, base, state, imgs, device, amp) if ours_model is not None else {
        "error": "the 'ours' whole-model variant did not run"}
    return out, merge


def run_merge_inference(model, base, state, imgs, device, amp) -> dict:
    """Merge ``model``'s pathways and compare with the plain model: module types, outputs, time."""
    rec: dict = {}
    try:
        model.eval()
        with torch.no_grad():
            ref = model(imgs[0].float()).float()
        merged, how = merge_bench_pathways(model)
        rec["merged_with"] = how
        plain = base.to(device).eval()
        plain.load_state_dict(state)
        kinds_plain = sorted({type(m).__name__ for m in plain.modules()})
        kinds_merged = sorted({type(m).__name__ for m in merged.modules()})
        rec["module_types_identical"] = kinds_plain == kinds_merged
        rec["module_types"] = kinds_merged
        with torch.no_grad():
            got = merged(imgs[0].float()).float()
        rec["merged_vs_unmerged_rel_err"] = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext

        def infer(m):
            def f(i):
                with torch.no_grad(), ctx():
                    m(imgs[i % 2])
            return f

        for name, m in (("plain", plain), ("merged", merged), ("plain_again", plain)):
            times = time_loop(infer(m), device, warmup=2, target_s=0.5, min_reps=5, max_reps=50)
            ms, spread = summarize(times)
            rec[name] = {"ms": ms, "ms_spread": spread, "reps": len(times)}
        rec["merged_x_plain"] = rec["merged"]["ms"] / rec["plain"]["ms"]
        rec["plain_repeat_x_plain"] = rec["plain_again"]["ms"] / rec["plain"]["ms"]  # the noise level
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return rec


# ---------------------------------------------------------------------------- targets
def _m_limit(M: int) -> float:
    if M < 1576:
        return 1.15
    if M < 12608:
        return 1.05
    return 1.02


def evaluate_targets(res: dict) -> list[dict]:
    """Each stated target: met / missed / not measured, with the numbers behind it.

    The targets are for an H100/H200; elsewhere they are evaluated for information only.
    """
    out: list[dict] = []
    gpu = res.get("device_type") == "cuda"
    peaks = res.get("peaks", {})
    prim = [c for c in res.get("cases", []) if c["model"] == "vit_b16" and c["dtype"] == "bf16"
            and c["aux_trainable"] and c["pass"] == "fwd+bwd"]

    def add(name, case, status, value, limit, detail):
        t = {"target": name, "status": status, "value": value, "limit": limit, "detail": detail}
        if case is not None:
            t["case"] = f"{case['model']}.{case['layer']} M={case['M']} {case['dtype']} {case['pass']}"
            if status == "missed":
                t["cost"] = _case_cost(case, peaks)
        out.append(t)

    if not prim:
        out.append({"target": "ViT-B/16 bf16 fwd+bwd targets", "status": "not measured", "value": None,
                    "limit": None, "detail": "no bf16 vit_b16 fwd+bwd aux-trainable case in this run"})
    for c in sorted(prim, key=lambda c: (c["M"], LAYERS.index(c["layer"]))):
        ms = c["ms"]
        if "auto" in ms and "plain" in ms:
            lim = _m_limit(c["M"])
            r = ms["auto"] / ms["plain"]
            add("auto <= limit x plain", c, "met" if r <= lim else "missed", r, lim,
                f"auto {ms['auto']:.4f} ms vs plain {ms['plain']:.4f} ms")
        else:
            add("auto <= limit x plain", c, "not measured", None, _m_limit(c["M"]), "auto or plain missing")
        if c["M"] <= 197:
            if "auto" in ms and "paper" in ms:
                r = ms["paper"] / ms["auto"]
                add("auto >= 1.5x faster than paper at M=197", c, "met" if r >= 1.5 else "missed", r, 1.5,
                    f"paper {ms['paper']:.4f} ms / auto {ms['auto']:.4f} ms")
        for other in ("paper", "paper_compiled"):
            if "auto" in ms and other in ms:
                r = ms["auto"] / ms[other]
                add(f"auto never slower than {other}", c, "met" if r <= 1.0 else "missed", r, 1.0,
                    f"auto {ms['auto']:.4f} ms vs {other} {ms[other]:.4f} ms")
            else:
                add(f"auto never slower than {other}", c, "not measured", None, 1.0,
                    f"{other} not measured ({c['errors'].get(other) or (res.get('skipped') or {}).get(other, 'skipped')})")
        pk = c.get("peak_mb") or {}
        if pk.get("auto") is not None and pk.get("plain") is not None:
            aux_grad_mb = c["N"] * c["K"] * DTYPES[c["dtype"]].itemsize / MB
            lim = pk["plain"] + aux_grad_mb + 1.0  # 1 MiB slack: λ's grad, allocator rounding
            add("auto peak memory <= plain + aux grad", c, "met" if pk["auto"] <= lim else "missed", pk["auto"], lim,
                f"auto {pk['auto']:.1f} MiB, plain {pk['plain']:.1f} MiB, aux grad {aux_grad_mb:.1f} MiB")
        elif gpu:
            add("auto peak memory <= plain + aux grad", c, "not measured", None, None, "no peak memory figure")
    wm = (res.get("whole_model") or {}).get("variants", {})
    if "ours" in wm and "plain" in wm:
        r = wm["ours"]["ms"] / wm["plain"]["ms"]
        add("whole ViT step ours <= 1.03x no pathways", None, "met" if r <= 1.03 else "missed", r, 1.03,
            f"ours {wm['ours']['ms']:.3f} ms/step vs plain {wm['plain']['ms']:.3f} ms/step "
            f"({res['whole_model'].get('config', {}).get('width')}-wide, {res['whole_model'].get('batch')} images)")
    else:
        add("whole ViT step ours <= 1.03x no pathways", None, "not measured", None, 1.03, "whole-model section missing")
    if not gpu:  # the reference backend's CPU requirement (informational)
        for c in res.get("cases", []):
            if c["dtype"] == "fp32" and c["pass"] == "fwd+bwd" and "reference" in c["ms"] and "paper" in c["ms"]:
                paired = (c.get("paired_x_paper") or {}).get("reference")
                r = paired["median"] if paired else c["ms"]["reference"] / c["ms"]["paper"]
                how = (f"paired per-round ratio {r:.3f} (95% CI {paired['ci95'][0]:.3f}-{paired['ci95'][1]:.3f}, "
                       f"{paired['rounds']} rounds); " if paired else "")
                add("CPU: reference no slower than paper (fwd+bwd fp32)", c, "met" if r <= 1.0 else "missed", r, 1.0,
                    how + f"reference {c['ms']['reference']:.3f} ms vs paper {c['ms']['paper']:.3f} ms")
    for t in out:
        t["informational"] = not gpu
    return out


def _case_cost(c: dict, peaks: dict) -> dict:
    ms = c["ms"].get("auto")
    cost = {"flops": c["flops"], "bytes_min": c["bytes_min"], "floor_ms": c.get("floor_ms")}
    if ms:
        cost["achieved_tflops"] = c["flops"] / (ms * 1e-3) / 1e12
        cost["achieved_gbps_min_bytes"] = c["bytes_min"] / (ms * 1e-3) / 1e9
        if peaks.get("matmul_tflops"):
            cost["fraction_of_matmul_peak"] = cost["achieved_tflops"] / peaks["matmul_tflops"]
        if peaks.get("copy_gbps"):
            cost["fraction_of_copy_bw"] = cost["achieved_gbps_min_bytes"] / peaks["copy_gbps"]
    return cost


def format_targets(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        v = t["value"]
        val = "-" if v is None else f"{v:.3f}"
        lim = "-" if t["limit"] is None else f"{t['limit']:.3f}"
        tag = t["status"].upper() + (" (info)" if t.get("informational") else "")
        line = f"[{tag}] {t['target']}: {t.get('case', '')} value {val} limit {lim}; {t['detail']}"
        if "cost" in t:
            cst = t["cost"]
            line += (f"; FLOPs {cst['flops']:.3g}, bytes {cst['bytes_min']:.3g}"
                     + (f", {cst['achieved_tflops']:.1f} TFLOP/s" if "achieved_tflops" in cst else "")
                     + (f" = {cst['fraction_of_matmul_peak']:.0%} of matmul peak" if "fraction_of_matmul_peak" in cst else "")
                     + (f", floor {cst['floor_ms']:.4f} ms" if cst.get("floor_ms") else ""))
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- output
def validate_results(res: dict) -> None:
    """Raise ValueError naming the first thing that breaks the schema."""
    if not isinstance(res, dict):
        raise ValueError(f"results must be a JSON object, got {type(res).__name__}")
    for k in RESULT_KEYS:
        if k not in res:
            raise ValueError(f"results: missing top-level key {k!r}")
    if res["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"results: schema_version {res['schema_version']!r}, expected {SCHEMA_VERSION}")
    if not isinstance(res["cases"], list):
        raise ValueError("results: 'cases' must be a list")
    for i, c in enumerate(res["cases"]):
        for k in CASE_KEYS:
            if k not in c:
                raise ValueError(f"results: cases[{i}] misses {k!r}")
        if c["pass"] not in PASSES:
            raise ValueError(f"results: cases[{i}] pass {c['pass']!r} not in {PASSES}")
        if c["dtype"] not in DTYPES:
            raise ValueError(f"results: cases[{i}] dtype {c['dtype']!r} not in {list(DTYPES)}")
        for p, v in c["ms"].items():
            if p not in PROVIDERS:
                raise ValueError(f"results: cases[{i}] unknown provider {p!r}")
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"results: cases[{i}].ms[{p!r}] = {v!r} is not a positive time")
            lo, hi = c["ms_spread"][p]
            if not (lo <= v <= hi):
                raise ValueError(f"results: cases[{i}] {p!r}: median {v} outside its spread [{lo}, {hi}]")
            if p not in c["peak_mb"] or p not in c["tflops"]:
                raise ValueError(f"results: cases[{i}] {p!r} has a time but no peak_mb/tflops entry")
    if not isinstance(res["skipped"], dict):
        raise ValueError("results: 'skipped' must map provider -> reason")
    if not isinstance(res["targets"], list):
        raise ValueError("results: 'targets' must be a list")


def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _fmt_paired(r: dict) -> str:
    """A ``paired_ratio`` result: ``0.710 (0.700–0.720)``."""
    return f"{r['median']:.3f} ({r['ci95'][0]:.3f}–{r['ci95'][1]:.3f})"


def _paired_cell(paired: dict) -> str:
    """The first of our providers with a paired ratio: ``auto 0.710 (0.700–0.720)``."""
    for p in ("auto", "triton", "cuda", "reference"):
        r = paired.get(p)
        if r:
            return f"{p} {_fmt_paired(r)}"
    return "-"


def markdown_table(res: dict, providers: Optional[list[str]] = None, max_priority: Optional[int] = None) -> str:
    """The results as markdown: per case, each provider's median ms and its ratio to ``plain``;
    then the whole-model step and the merged-inference check. ``max_priority=0``: only the main
    cases (bf16 ViT-B fwd+bwd aux trainable on a GPU), for a short table."""
    cases = [c for c in res.get("cases", []) if max_priority is None or c.get("priority", 0) <= max_priority]
    if providers is None:
        seen = {p for c in cases for p in c["ms"]}
        providers = [p for p in PROVIDERS if p in seen]
    dev = f"{res.get('device')} (torch {res.get('torch')}, triton {res.get('triton')}, {res.get('date')}, commit {str(res.get('commit'))[:12]})"
    lines = [f"Device: {dev}. Median ms (× plain); aux = aux trainable (T) or frozen (F)."]
    if res.get("note"):
        lines.append(f"Note: {res['note']}")
    host = res.get("host") or {}
    if res.get("device_type") == "cpu" and host.get("loadavg_start"):
        lines.append(f"Host load average at start / end: {host.get('loadavg_start')} / {host.get('loadavg_end')} "
                     f"on {host.get('cpu_count')} cores, {host.get('torch_threads')} torch thread(s).")
    lines.append("")
    paired = any(c.get("paired_x_paper") for c in cases)
    head = ["model", "layer", "M", "K→N", "dtype", "pass", "aux"] + providers
    if paired:
        head.append("ours ÷ paper, per round (95% CI)")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for c in cases:
        plain = c["ms"].get("plain")
        cells = [c["model"], c["layer"], str(c["M"]), f"{c['K']}→{c['N']}", c["dtype"], c["pass"],
                 "T" if c["aux_trainable"] else "F"]
        for p in providers:
            v = c["ms"].get(p)
            if v is None:
                cells.append("err" if p in c.get("errors", {}) else "-")
            else:
                cells.append(_fmt_ms(v) + (f" ({v / plain:.2f}×)" if plain else ""))
        if paired:
            cells.append(_paired_cell(c.get("paired_x_paper") or {}))
        lines.append("| " + " | ".join(cells) + " |")
    wm = res.get("whole_model") or {}
    if wm.get("variants"):
        cfg = wm.get("config", {})
        lines += ["", f"Whole-model training step (width {cfg.get('width')}, depth {cfg.get('depth')}, "
                      f"{wm.get('batch')} images, {wm.get('tokens_per_step')} tokens, autocast {wm.get('autocast')}, AdamW):", "",
                  "| variant | ms/step | × plain | tokens/s | peak MiB |", "|---|---|---|---|---|"]
        for name, v in wm["variants"].items():
            pk = "-" if v.get("peak_mb") is None else f"{v['peak_mb']:.0f}"
            lines.append(f"| {name} | {_fmt_ms(v['ms'])} | {v.get('x_plain', float('nan')):.3f} | "
                         f"{v['tokens_per_s']:.4g} | {pk} |")
        pairs = [f"{k} {_fmt_paired(r)}" for k, r in (wm.get("paired") or {}).items() if r]
        if pairs:
            lines += ["", f"Paired per-round ratios ({wm.get('interleaved_rounds')} interleaved rounds, 95% CI): "
                          + "; ".join(pairs)]
    mi = res.get("merge_inference") or {}
    if "merged_x_plain" in mi:
        lines += ["", f"Inference after merge ({mi['merged_with']}): module types identical to plain: "
                      f"{mi['module_types_identical']}; merged {_fmt_ms(mi['merged']['ms'])} ms vs plain "
                      f"{_fmt_ms(mi['plain']['ms'])} ms ({mi['merged_x_plain']:.3f}×; plain twice: "
                      f"{mi['plain_repeat_x_plain']:.3f}×); output rel. err vs unmerged "
                      f"{mi['merged_vs_unmerged_rel_err']:.2e}"]
    elif mi.get("error"):
        lines += ["", f"Inference after merge: failed: {mi['error']}"]
    if res.get("skipped"):
        lines += ["", "Skipped providers: " + "; ".join(f"{p}: {why}" for p, why in res["skipped"].items())]
    return "\n".join(lines)


def _pick_group(cases: list[dict]) -> tuple:
    groups: dict = {}
    for c in cases:
        groups.setdefault((c["model"], c["dtype"], c["pass"], c["aux_trainable"]), 0)
        groups[(c["model"], c["dtype"], c["pass"], c["aux_trainable"])] += 1
    pref = ("vit_b16", "bf16", "fwd+bwd", True)
    if pref in groups:
        return pref
    return max(groups, key=lambda g: (groups[g], g[2] == "fwd+bwd", g[3]))


def plot_results(res: dict, path: str, group: Optional[tuple] = None) -> str:
    """A PNG: time relative to ``plain`` against M, one line per provider, one panel per layer,
    for one (model, dtype, pass, aux_trainable) group (default: bf16 ViT-B fwd+bwd aux trainable
    when present, else the largest group). When the run has a single M (the CPU quick mode), the
    x axis is the model width instead, over every model of that (dtype, pass, aux)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in res["cases"] if c["ms"].get("plain")]
    if not cases:
        raise ValueError("plot_results: no case has a 'plain' time to compare with")
    group = tuple(group or _pick_group(cases))
    model, dtype, pas, aux = group
    sel = [c for c in cases if (c["model"], c["dtype"], c["pass"], c["aux_trainable"]) == group]
    x_of, x_label, title = (lambda c: c["M"]), "tokens M", f"{model} {dtype} {pas}"
    if len({c["M"] for c in sel}) == 1:
        wide = [c for c in cases if (c["dtype"], c["pass"], c["aux_trainable"]) == (dtype, pas, aux)
                and c["M"] == sel[0]["M"] and c["model"] in MODELS]
        if len({c["model"] for c in wide}) > 1:
            sel = wide
            x_of = lambda c: MODELS[c["model"]]  # noqa: E731
            x_label, title = f"model width (M = {sel[0]['M']})", f"{dtype} {pas}"
    layers = [l for l in LAYERS if any(c["layer"] == l for c in sel)]
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers):
        cs = sorted((c for c in sel if c["layer"] == layer), key=x_of)
        for p in PROVIDERS:
            pts = [(x_of(c), c["ms"][p] / c["ms"]["plain"]) for c in cs if p in c["ms"]]
            if pts:
                ax.plot([m for m, _ in pts], [r for _, r in pts], marker="o", label=p,
                        linestyle="--" if p == "plain" else "-")
        ax.set_xscale("log")
        ax.set_title(layer if len({(c["K"], c["N"]) for c in cs}) > 1 else f"{layer} {cs[0]['K']}→{cs[0]['N']}")
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("time / plain")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{title} aux {'trainable' if aux else 'frozen'} on {res.get('device')} ({res.get('date')})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write_json(res: dict, path: Optional[str]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


def default_out(device: torch.device, results_dir: Optional[str] = None) -> str:
    """``<results_dir>/<date>-<device>.json``; without a folder, ``benchmarks/results/`` when run from
    the repository root, else ``./m2pt-bench-<date>-<device>.json``."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    name = f"{date}-{device_slug(device)}.json"
    if results_dir is not None:
        return os.path.join(results_dir, name)
    if os.path.isdir(os.path.join("benchmarks", "results")):
        return os.path.join("benchmarks", "results", name)
    return f"m2pt-bench-{name}"


# ---------------------------------------------------------------------------- budget
def _compile_budget(args) -> Optional[float]:
    """Seconds of paper_compiled compiles after which later cases run without it (None: no limit)."""
    if args.compile_budget_s is not None:
        return args.compile_budget_s
    return 0.3 * args.budget_s if args.budget_s else None


# Triton autotuning on a GPU (estimate_case_s): ~0.03 s of benchmarking per config (the backend's
# _tune_bench), 35 configs per new key (14 forward, 14 dgrad, 7 wgrad; fewer where they cannot
# fit); compiling them for a new dtype, partly from the cache the GPU tests filled.
AUTOTUNE_S = 1.7
TRITON_COMPILE_S = 15.0


def estimate_case_s(c: Case, providers: list[str], device: torch.device, peaks: dict, args, seen_compile: set) -> float:
    """Rough seconds a case costs: per provider a fixed overhead plus ~(warm-up + repeats) passes at
    ~600 TFLOP/s bf16/fp16 (60 fp32) on a GPU, the measured matmul rate on the CPU; plus a compile
    for each new (K, N, dtype, aux, pass) of paper_compiled; plus, on a GPU, the Triton autotuner
    for ``auto`` / ``triton``: benchmarking its ~35 configs (forward, dgrad, wgrad) for each new
    autotune key (M rounded up to a power of 2, K, N, dtype, pass; shared by the two providers) and
    compiling them once per dtype (partly cached by the GPU tests that ran before)."""
    if device.type == "cuda":
        rate = (600e12 if c.dtype != "fp32" else 60e12)
        fixed = 0.4
        reps = args.reps or args.max_reps
    else:
        rate = (peaks.get("matmul_tflops") or 0.05) * 1e12 * 0.5
        fixed = 0.05
        reps = args.reps or 10
    per_pass_s = case_flops(c) / rate
    compile_s = (25.0 if args.compile_mode and "autotune" in args.compile_mode else 8.0) \
        if device.type == "cuda" else 30.0
    compile_budget = _compile_budget(args)
    total = 0.0
    for p in providers:
        if p == "paper_compiled" and compile_budget is not None and compile_budget < compile_s * sum(
                1 for k in seen_compile if k[0] == "paper_compiled"):
            continue  # run() stops timing paper_compiled once its compiles took the compile budget
        n = (reps + 10) if device.type == "cuda" else reps + 2
        total += fixed + min(n * per_pass_s, max(args.target_s * 1.5, 5 * per_pass_s) + 3 * per_pass_s)
        if p == "paper_compiled":
            key = ("paper_compiled", c.K, c.N, c.dtype, c.aux_trainable, c.pass_)
            if key not in seen_compile:
                seen_compile.add(key)
                total += compile_s
        if p in ("auto", "triton") and device.type == "cuda":
            for key, cost in ((("tune", 1 << max(c.M - 1, 0).bit_length(), c.K, c.N, c.dtype, c.pass_),
                               AUTOTUNE_S), (("triton-compile", c.dtype), TRITON_COMPILE_S)):
                if key not in seen_compile:
                    seen_compile.add(key)
                    total += cost
    return total


def plan_cases(cases: list[Case], providers: list[str], device, peaks, args) -> tuple[list[Case], list[dict]]:
    """Keep the cases in priority order while their estimated cost fits ``--budget-s``."""
    ordered = sorted(cases, key=lambda c: c.priority)  # stable: the grid's order within a priority
    if not args.budget_s:
        return ordered, []
    keep, dropped, spent, seen = [], [], 0.0, set()
    budget = args.budget_s - (args.model_reserve_s if args.whole_model else 0.0)
    for c in ordered:
        est = estimate_case_s(c, providers, device, peaks, args, set(seen))
        if spent + est <= budget:
            estimate_case_s(c, providers, device, peaks, args, seen)
            keep.append(c)
            spent += est
        else:
            dropped.append({"case": c.label(), "priority": c.priority, "reason": f"budget: est. {est:.1f} s "
                                                                                   f"would exceed {budget:.0f} s"})
    return keep, dropped


# ---------------------------------------------------------------------------- main
def _list_of(choices, what: str):
    """argparse type: a comma-separated subset of ``choices`` (an unknown name is a usage error naming it)."""
    def parse(s: str) -> list:
        items = [v.strip() for v in s.split(",") if v.strip()]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or s!r}; choose from {','.join(choices)}")
        return items
    return parse


def _token_counts(s: str) -> list:
    try:
        ms = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        ms = []
    if not ms or any(m < 1 for m in ms):
        raise argparse.ArgumentTypeError(f"token counts must be positive integers, got {s!r}")
    return ms


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2pt bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("quick", "full"), default="quick",
                   help="quick: the priority-0 GPU set / small CPU shapes; full: every case (use --budget-s)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke shapes (tests, dry runs)")
    p.add_argument("--grid", choices=("mode", "explicit"), default="mode",
                   help="explicit: the cross product of --models/--layers/--M/--dtypes/--passes/--aux")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all that can run)")
    p.add_argument("--models", type=_list_of(MODELS, "model(s)"), default=None, help=f"filter: {','.join(MODELS)}")
    p.add_argument("--layers", type=_list_of(LAYERS, "layer(s)"), default=None, help=f"filter: {','.join(LAYERS)}")
    p.add_argument("--M", type=_token_counts, default=None, help="filter: token counts")
    p.add_argument("--dtypes", type=_list_of(DTYPES, "dtype(s)"), default=None, help=f"filter: {','.join(DTYPES)}")
    p.add_argument("--passes", type=_list_of(PASSES, "pass(es)"), default=None, help=f"filter: {','.join(PASSES)}")
    p.add_argument("--aux", choices=("trainable", "frozen"), default=None, help="filter: aux trainable or frozen")
    p.add_argument("--budget-s", type=float, default=None,
                   help="drop the lowest-priority cases whose estimated cost does not fit; also stop "
                        "starting new cases once this much time has passed")
    p.add_argument("--model-reserve-s", type=float, default=20.0,
                   help="seconds of --budget-s kept for the whole-model section")
    p.add_argument("--reps", type=int, default=None, help="fixed repeat count (default: ~--target-s of timing)")
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None,
                   help="interleave the providers' repeats in this many rounds (default GPU 2, CPU 5)")
    p.add_argument("--target-s", type=float, default=None, help="seconds of timed repeats per provider and case")
    p.add_argument("--model-reps", type=int, default=None)
    p.add_argument("--model-batch", type=int, default=None, help="images per whole-model step (GPU default 64)")
    p.add_argument("--no-whole-model", dest="whole_model", action="store_false",
                   help="skip the whole-model training step and the merge-inference check")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of paper_compiled (GPU default max-autotune-no-cudagraphs: no other "
                        "provider uses CUDA graphs; CPU default: torch's default)")
    p.add_argument("--compile-budget-s", type=float, default=None,
                   help="stop timing paper_compiled once its compiles took this long (default 30%% of --budget-s)")
    p.add_argument("--no-compile", action="store_true", help="skip paper_compiled")
    p.add_argument("--allow-interpreter", action="store_true", help="time the triton backend under TRITON_INTERPRET")
    p.add_argument("--out", default=None,
                   help="results JSON (default: benchmarks/results/<date>-<device>.json when run from the "
                        "repository root or through benchmarks/run.py, else ./m2pt-bench-<date>-<device>.json)")
    p.add_argument("--no-save", action="store_true", help="write no JSON")
    p.add_argument("--plot", default=None, help="also draw the PNG here")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 with --tiny, else torch's; on a shared or loaded "
                        "machine 1 thread gives far steadier CPU numbers)")
    p.add_argument("--plan-only", action="store_true",
                   help="print the cases --budget-s would keep (with estimated seconds) and exit; touches no "
                        "device, so `--device cuda --plan-only` works on a machine without a GPU")
    p.add_argument("--note", default=None, help="free text recorded in the results and shown above the table")
    p.add_argument("--quiet", action="store_true")
    return p


def run(args) -> dict:
    t_start = time.perf_counter()
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise SystemExit(f"m2pt bench: --device {args.device!r} is not a device torch knows ({exc})") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"m2pt bench: --device {args.device!r}: the benchmarks run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("m2pt bench: --device cuda, but torch sees no CUDA device here (torch.cuda.is_available() "
                         "is False); use --device cpu")
    if args.max_reps is None:
        args.max_reps = 200 if device.type == "cuda" else 30
    if args.rounds is None:
        args.rounds = 2 if device.type == "cuda" else 5
    if args.target_s is None:
        args.target_s = 0.15 if device.type == "cuda" else (0.05 if args.tiny else 0.3)
    if args.compile_mode is None and device.type == "cuda":
        args.compile_mode = "max-autotune-no-cudagraphs"
    if args.compile_mode in ("default", ""):
        args.compile_mode = None
    args._compile_spent = 0.0
    compile_budget = _compile_budget(args)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    out_path = None if args.no_save else (args.out or default_out(device, getattr(args, "results_dir", None)))

    status = provider_status(device, args.allow_interpreter, compile_ok=not args.no_compile)
    wanted = list(PROVIDERS) if not args.providers else [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in wanted:
        if p not in PROVIDERS:
            raise SystemExit(f"m2pt bench: unknown provider {p!r}; choose from {','.join(PROVIDERS)}")
    providers = [p for p in PROVIDERS if p in wanted]
    skipped = {p: status[p]["reason"] for p in providers if not status[p]["ok"]}
    skipped.update({p: "not requested (--providers)" for p in PROVIDERS if p not in providers})
    runnable = [p for p in providers if status[p]["ok"]]

    log(f"m2pt bench: {device_name(device)}; torch {torch.__version__}, triton {_version('triton')}")
    peaks = measure_peaks(device, small=args.tiny)
    log("ceilings: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in peaks.items()))

    if args.grid == "explicit":
        cases = grid_from_lists(args)
    else:
        cases = filter_cases(full_grid() if args.mode == "full" and not args.tiny else quick_grid(device.type, args.tiny), args)
    if not cases:
        raise SystemExit("m2pt bench: no case matches --models/--layers/--M/--dtypes/--passes/--aux in this grid"
                         f" ({'--tiny' if args.tiny else '--mode ' + args.mode}); widen the filters, or pass "
                         "--grid explicit to time exactly the cross product of those lists")
    cases, dropped = plan_cases(cases, runnable, device, peaks, args)

    res = {
        "schema_version": SCHEMA_VERSION, "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": "tiny" if args.tiny else args.mode,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "host": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "loadavg_start": _loadavg()},
        "note": args.note,
        "float32_matmul_precision": fp32_matmul_precision_name(),
        "compile": {"mode": args.compile_mode or "default", "dynamic_M": True},
        "peaks": peaks, "providers": status, "skipped": skipped, "cases": [], "dropped": dropped,
        "whole_model": None, "merge_inference": None, "targets": [], "elapsed_s": 0.0, "complete": False,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        res["gpu"] = {"name": props.name, "sm_count": props.multi_processor_count,
                      "memory_gb": props.total_memory / 1e9, "l2_mb": getattr(props, "L2_cache_size", 0) / MB,
                      "capability": f"{props.major}.{props.minor}"}
    _write_json(res, out_path)

    def over_budget(reserve: float = 0.0) -> bool:
        return bool(args.budget_s) and time.perf_counter() - t_start > args.budget_s - reserve

    def run_cases(todo: list[Case], reserve: float = 0.0):
        for i, c in enumerate(todo):
            if over_budget(reserve):
                res["dropped"] += [{"case": d.label(), "priority": d.priority, "reason": "budget spent at run time"}
                                   for d in todo[i:]]
                return
            provs = list(runnable)
            if "paper_compiled" in provs and compile_budget is not None and args._compile_spent > compile_budget:
                provs.remove("paper_compiled")
                res["skipped"].setdefault("paper_compiled", f"compile budget ({compile_budget:.0f} s) spent; "
                                                            "later cases run without it")
            log(f"case {c.label()}")
            rec = run_case(c, provs, status, device, args, peaks)
            res["cases"].append(rec)
            log("  " + "  ".join(f"{p} {rec['ms'][p]:.4g} ms" for p in rec["ms"]))
            res["elapsed_s"] = time.perf_counter() - t_start
            _write_json(res, out_path)
            gc.collect()

    first = [c for c in cases if c.priority == 0]
    rest = [c for c in cases if c.priority != 0]
    run_cases(first, reserve=args.model_reserve_s if args.whole_model else 0.0)
    if args.whole_model:
        if over_budget():
            res["whole_model"] = {"error": "budget spent before the whole-model section", "variants": {}}
        else:
            log("whole model: training step")
            try:
                res["whole_model"], res["merge_inference"] = run_whole_model(device, args, peaks)
            except Exception as exc:
                res["whole_model"] = {"error": f"{type(exc).__name__}: {exc}"[:500], "variants": {}}
        _write_json(res, out_path)
    run_cases(rest)
    res["targets"] = evaluate_targets(res)
    res["host"]["loadavg_end"] = _loadavg()
    res["elapsed_s"] = time.perf_counter() - t_start
    res["complete"] = True
    _write_json(res, out_path)
    if out_path:
        res["_path"] = out_path
    return res


def plan_only(args) -> int:
    """``--plan-only``: the cases a run would keep and drop, from the budget estimate alone."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.max_reps = args.max_reps or (200 if device.type == "cuda" else 30)
    args.target_s = args.target_s or (0.15 if device.type == "cuda" else 0.3)
    if args.compile_mode is None and device.type == "cuda":
        args.compile_mode = "max-autotune-no-cudagraphs"
    provs = list(PROVIDERS) if not args.providers else [p.strip() for p in args.providers.split(",")]
    if args.no_compile and "paper_compiled" in provs:
        provs.remove("paper_compiled")
    peaks = {"matmul_tflops": 700.0 if device.type == "cuda" else 0.05}
    if args.grid == "explicit":
        cases = grid_from_lists(args)
    else:
        cases = filter_cases(full_grid() if args.mode == "full" and not args.tiny else quick_grid(device.type, args.tiny), args)
    kept, dropped = plan_cases(cases, provs, device, peaks, args)
    seen: set = set()
    total = 0.0
    for c in kept:
        est = estimate_case_s(c, provs, device, peaks, args, seen)
        total += est
        print(f"keep  p{c.priority} {c.label():70s} ~{est:5.1f} s")
    for d in dropped:
        print(f"drop  p{d['priority']} {d['case']:70s} {d['reason']}")
    print(f"{len(kept)} kept (~{total:.0f} s estimated, plus the whole-model section), {len(dropped)} dropped; "
          f"providers {','.join(provs)}; device type {device.type}")
    return 0


def main(argv: Optional[list[str]] = None, results_dir: Optional[str] = None) -> int:
    """``m2pt bench [ARGS]``: run the benchmarks (quick mode by default), write the JSON, print the
    target check and the markdown table last. Returns 0 when the run completed. ``results_dir``: where
    the JSON goes when ``--out`` is not given (see ``default_out``)."""
    args = build_parser().parse_args(argv)
    args.results_dir = results_dir
    if args.plan_only:
        return plan_only(args)
    threads = torch.get_num_threads()
    if args.threads is None and args.tiny:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = run(args)
    finally:
        torch.set_num_threads(threads)
    path = res.pop("_path", None)
    if args.plot:
        try:
            plot_results(res, args.plot)
            print(f"plot: {args.plot}")
        except Exception as exc:
            print(f"plot failed: {type(exc).__name__}: {exc}")
    if res["dropped"]:
        print(f"{len(res['dropped'])} case(s) dropped for the time budget (listed in the JSON under 'dropped')")
    print("\nTargets (defined for H100/H200):")
    print(format_targets(res["targets"]))
    if path:
        print(f"\nresults: {path}")
    print()
    print(markdown_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
