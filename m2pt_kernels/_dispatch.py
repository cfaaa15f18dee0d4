"""The one place that decides which backend computes the cross-modal linear op.

Priority: ``use_backend(name)`` (innermost wins) > ``M2PT_BACKEND`` in the environment > ``"auto"``.

- ``reference``: plain PyTorch, any device and dtype; the oracle.
- ``triton``: fused Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (the interpreter is how the kernels are tested without a GPU).
- ``cuda``: the compiled extension ``m2pt_kernels._C``; CUDA tensors only.
- ``auto``: ``triton`` for CUDA tensors of a supported dtype when triton is importable, then
  ``cuda`` if that is built, else ``reference``. The fused backends need an sm_80+ GPU (Ampere or
  newer); on an older one they are unavailable and ``auto`` picks ``reference``.

An unknown backend, or one that cannot run on the given tensors, is an error, never a silent
fallback. Backends are imported lazily here and never import each other.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from types import ModuleType

import torch

BACKENDS = ("reference", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS
_MODULES = {
    "reference": "m2pt_kernels.ops.cross_modal_linear_reference",
    "triton": "m2pt_kernels.ops.cross_modal_linear_triton",
    "cuda": "m2pt_kernels.ops.cross_modal_linear_cuda",
}
# dtypes each fused backend computes; ``auto`` sends anything else to ``reference``.
FUSED_DTYPES = {
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
ENV_VAR = "M2PT_BACKEND"

# use_backend's blocks, innermost last: one (name,) tuple per block, so that a block leaving removes its
# own entry even when blocks of several threads interleave (it is process-wide, like
# torch.nn.attention.sdpa_kernel: torch.compile guards on it, which it can't on thread-local state).
_override: list[tuple[str]] = []


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(
            f"unknown m2pt_kernels backend {name!r} (from {where}); choose one of {list(_CHOICES)}"
        )
    return name


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The fused kernels are built and tuned for Ampere and newer (bf16 / TF32 tensor cores, cp.async);
# on an older GPU ``auto`` computes with the reference, and asking for a fused backend is an error.
MIN_CAPABILITY = (8, 0)
_old_gpus: dict[int, str] | None = None  # device index -> "cuda:i (name, sm_XY)", for the GPUs below it


def _pre_ampere_devices() -> dict[int, str]:
    """The visible CUDA devices below ``MIN_CAPABILITY`` (asked once per process)."""
    global _old_gpus
    if _old_gpus is None:
        old = {}
        try:
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                if (major, minor) < MIN_CAPABILITY:
                    old[i] = f"cuda:{i} ({torch.cuda.get_device_name(i)}, sm_{major}{minor})"
        except Exception:  # noqa: BLE001 -- a device that can't be asked is left to the backends' own errors
            pass
        _old_gpus = old
    return _old_gpus


def _old_gpu_name(index: int) -> str:
    """``cuda:i (name, sm_XY)`` when GPU ``index`` is older than ``MIN_CAPABILITY``, else ""."""
    return _pre_ampere_devices().get(index, "")


def _needs_newer_gpu(what: str) -> str:
    return (f"its kernels need a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
            f"(Ampere, Ada, Hopper); {what}")


def backend_status() -> dict[str, tuple[bool, str]]:
    """For every concrete backend: (usable in this process, why or why not)."""
    status: dict[str, tuple[bool, str]] = {"reference": (True, "plain PyTorch, always available")}
    old_gpus = _pre_ampere_devices() if torch.cuda.is_available() else {}
    if importlib.util.find_spec("triton") is None:
        status["triton"] = (False, "triton is not installed (pip install triton)")
    elif torch.cuda.is_available():
        status["triton"] = (True, "triton kernels on CUDA tensors")
    elif triton_interpret():
        status["triton"] = (True, "triton interpreter on CPU tensors (TRITON_INTERPRET=1; slow, for testing)")
    else:
        status["triton"] = (False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)")
    try:
        cuda_mod = importlib.import_module(_MODULES["cuda"])
        status["cuda"] = cuda_mod.availability()
    except Exception as exc:  # a broken extension must never break the package
        status["cuda"] = (False, f"the cuda backend failed to load: {exc}")
    if old_gpus:
        every = len(old_gpus) == torch.cuda.device_count()
        for fused in ("triton", "cuda"):
            ok, why = status[fused]
            if ok and every:
                status[fused] = (False, _needs_newer_gpu(f"this machine has {', '.join(old_gpus.values())}"))
            elif ok:  # some GPUs are new enough: usable there (resolve() refuses the others)
                status[fused] = (True, f"{why}; not on {', '.join(old_gpus.values())} (older than sm_80: "
                                       "auto uses the reference there)")
    return status


def available_backends() -> list[str]:
    """The concrete backends that can run in this process (``auto`` picks among these)."""
    return [name for name, (ok, _) in backend_status().items() if ok]


class use_backend(contextlib.ContextDecorator):
    """Context manager selecting the backend for ``cross_modal_linear`` inside its block.

    ``name`` is one of ``auto``, ``reference``, ``triton``, ``cuda``: an unknown name is refused at the
    call (a forgotten ``with`` still says so), a backend that cannot run in this process on entering
    the block, with the reason (so ``@use_backend("cuda")`` on a function defined on a machine without
    it fails only when the function is called). The choice is
    process-wide while the block runs (other threads see it too, like
    ``torch.nn.attention.sdpa_kernel``); the innermost block still open wins, and a block that ends
    removes only its own choice. ``with use_backend(name) as chosen:`` gives the name; one object may
    be entered again, nested or from several threads, each block with its own entry. As a decorator
    (``@use_backend("reference")``) it selects the backend for each call of the function.
    """

    def __init__(self, name: str):
        _check_name(name, "use_backend")
        self.name = name
        self._open: dict[int, list[tuple[str]]] = {}  # thread -> the entries of its open blocks, innermost last

    def __repr__(self) -> str:
        return f"use_backend({self.name!r})"

    def __enter__(self) -> str:
        if self.name != "auto" and not _usable(self.name):  # cached: a decorated function enters on every call
            raise RuntimeError(f"m2pt_kernels backend {self.name!r} is not available: "
                               f"{backend_status()[self.name][1]}")
        entry = (self.name,)  # a new object per block: removed by identity
        self._open.setdefault(threading.get_ident(), []).append(entry)
        _override.append(entry)
        return self.name

    def __exit__(self, *exc_info) -> None:
        thread = threading.get_ident()
        mine = self._open.get(thread)
        if not mine:
            raise RuntimeError(f"{self!r}: __exit__ without a block of this thread open; use it as "
                               "'with use_backend(name):'")
        entry = mine.pop()
        if not mine:
            del self._open[thread]
        for i in range(len(_override) - 1, -1, -1):
            if _override[i] is entry:
                del _override[i]
                break


_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR


def _env_backend() -> str | None:
    """``os.environ.get(ENV_VAR)`` without its cost: that misses with a KeyError raised and caught
    inside ``os.environ`` on every op call when the variable is unset. ``os.environ`` keeps its
    encoded copy in ``_data``; read that when it is there (CPython), else ask the mapping."""
    data = getattr(os.environ, "_data", None)
    if data is None:
        return os.environ.get(ENV_VAR)
    raw = data.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def requested_backend() -> str:
    """The backend asked for right now: ``use_backend`` > ``$M2PT_BACKEND`` > ``auto``."""
    if _override:
        return _override[-1][0]
    env = _env_backend()
    if env:
        return _check_name(env.strip().lower(), f"${ENV_VAR}")
    return "auto"


_usable_cache: dict[tuple[str, bool], bool] = {}


def _usable(name: str) -> bool:
    """``backend_status()[name][0]``, cached: it is asked on every op call on CUDA tensors, and
    availability does not change within a process (only TRITON_INTERPRET, part of the key).
    Under torch.compile it is evaluated once at trace time (it imports modules, which dynamo will
    not trace) and baked into the graph as a constant."""
    key = (name, triton_interpret())
    ok = _usable_cache.get(key)
    if ok is None:
        ok = _usable_cache[key] = backend_status()[name][0]
    return ok


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (and with it
# triton) when m2pt_kernels is imported.
_usable._dynamo_marked_constant = True  # type: ignore[attr-defined]
_old_gpu_name._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve(x: torch.Tensor, requested: str | None = None) -> str:
    """The concrete backend that will compute the op for input ``x``; errors say why one can't."""
    name = requested_backend() if requested is None else _check_name(requested, "argument")
    on_cuda = x.is_cuda
    old_gpu = _old_gpu_name(x.device.index) if on_cuda else ""
    if name == "auto":
        if on_cuda and not old_gpu:
            for fused in ("triton", "cuda"):
                if x.dtype in FUSED_DTYPES[fused] and _usable(fused):
                    return fused
        return "reference"
    if name == "reference":
        return name
    if not _usable(name):
        raise RuntimeError(f"m2pt_kernels backend {name!r} is not available: {backend_status()[name][1]}")
    if old_gpu:
        raise RuntimeError(f"m2pt_kernels backend {name!r} can't run on {old_gpu}: "
                           + _needs_newer_gpu("use the 'reference' backend there ('auto' picks it by itself)"))
    if name == "triton" and not (on_cuda or (x.device.type == "cpu" and triton_interpret())):
        raise RuntimeError(
            f"m2pt_kernels backend 'triton' needs CUDA tensors, got tensors on {x.device} "
            "(set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU)"
        )
    if name == "cuda" and not on_cuda:
        raise RuntimeError(f"m2pt_kernels backend 'cuda' needs CUDA tensors, got tensors on {x.device}")
    if x.dtype not in FUSED_DTYPES[name]:
        supported = ", ".join(str(d).replace("torch.", "") for d in FUSED_DTYPES[name])
        raise TypeError(
            f"m2pt_kernels backend {name!r} computes {supported}; got {str(x.dtype).replace('torch.', '')} "
            "(use the 'reference' backend for other dtypes)"
        )
    return name


_loaded: dict[str, ModuleType] = {}


def implementation(name: str) -> ModuleType:
    """The module of a concrete backend: ``forward``, ``dgrad`` and ``wgrad`` (see the op's docstring)."""
    mod = _loaded.get(name)
    if mod is None:
        if name not in _MODULES:
            _check_name(name, "implementation")
            raise ValueError("'auto' is not a concrete backend; call resolve() first")
        mod = _loaded[name] = importlib.import_module(_MODULES[name])
    return mod
