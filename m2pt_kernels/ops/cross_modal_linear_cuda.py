"""CUDA C++ backend of ``m2pt::cross_modal_linear``: the compiled extension ``m2pt_kernels._C``.

Kernels and bindings live in ``csrc/`` (see csrc/README.md); importing ``m2pt_kernels._C`` registers
``torch.ops.m2pt_cuda.forward / dgrad / wgrad``. This module adapts them to the backend interface in
the op's docstring (``forward``, ``dgrad``, ``wgrad`` on 2-D views) and says, through
``availability()``, whether the backend can run here and why not.

The package works without the extension. The extension records the torch / CUDA versions it was built
against as a marker string in the library file; that record is read *before* the library is loaded,
and a library built against another torch (major.minor) or CUDA major is refused with a warning,
never loaded (an ABI mismatch could crash the process at load time).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import warnings
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from .._precision import fp32_matmul_allows_tf32

EXTENSION = "m2pt_kernels._C"
_BUILD_INFO = re.compile(rb"M2PT_BUILD_INFO;torch=([^;\x00]*);cuda=([^;\x00]*);archs=([^\x00]*?);END")


def read_build_info(path: str) -> Optional[dict[str, str]]:
    """The build record embedded in the extension file at ``path`` (torch, cuda, archs), or None."""
    with open(path, "rb") as f:
        match = _BUILD_INFO.search(f.read())
    if match is None:
        return None
    torch_version, cuda_version, archs = (g.decode("utf-8", "replace") for g in match.groups())
    return {"torch": torch_version, "cuda": cuda_version, "archs": archs}


def _major_minor(version: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else ()


def version_mismatch(built: dict[str, str], torch_version: Optional[str] = None,
                     cuda_version: Optional[str] = None) -> Optional[str]:
    """Why an extension built against ``built`` can't be loaded into this torch, or None if it can."""
    torch_version = torch.__version__ if torch_version is None else torch_version
    cuda_version = torch.version.cuda if cuda_version is None else cuda_version
    if _major_minor(built["torch"]) != _major_minor(torch_version):
        return (f"the extension {EXTENSION} was built against torch {built['torch']} but torch {torch_version} "
                "is running; rebuild it (M2PT_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace, or "
                "pip wheel --no-build-isolation .)")
    built_cuda, running_cuda = _major_minor(built["cuda"])[:1], _major_minor(cuda_version or "")[:1]
    if built_cuda != running_cuda:
        return (f"the extension {EXTENSION} was built for CUDA {built['cuda']} but torch uses CUDA "
                f"{cuda_version}; rebuild it against this torch")
    return None


def load_extension(path: Optional[str] = None) -> tuple[Optional[ModuleType], Optional[str]]:
    """(the extension module, None), or (None, why not). Never raises; warns on a version mismatch.

    ``path``: the library file to check (default: where ``m2pt_kernels._C`` would be imported from).
    """
    try:
        if path is None:
            spec = importlib.util.find_spec(EXTENSION)
            if spec is None or not spec.origin:
                return None, (f"the extension {EXTENSION} is not built (build it with "
                              "M2PT_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace)")
            path = spec.origin
        built = read_build_info(path)
        if built is None:
            why = f"the extension {EXTENSION} at {path} has no build record; rebuild it"
            warnings.warn(f"m2pt_kernels: cuda backend disabled: {why}", RuntimeWarning, stacklevel=2)
            return None, why
        mismatch = version_mismatch(built)
        if mismatch is not None:
            warnings.warn(f"m2pt_kernels: cuda backend disabled: {mismatch}", RuntimeWarning, stacklevel=2)
            return None, mismatch
        return importlib.import_module(EXTENSION), None
    except Exception as exc:  # noqa: BLE001 -- a broken extension must never break the package
        return None, f"the extension {EXTENSION} failed to load ({type(exc).__name__}: {exc})"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    return load_extension()


def availability() -> tuple[bool, str]:
    ext, why = _load()
    if ext is None:
        return False, why
    if not torch.cuda.is_available():
        return False, (f"the extension is built (torch {ext.TORCH_VERSION}, CUDA {ext.CUDA_VERSION}, "
                       f"archs {ext.CUDA_ARCHS}) but there is no CUDA device")
    return True, f"compiled CUDA kernels (built for archs {ext.CUDA_ARCHS})"


def _ops():
    ext, why = _load()
    if ext is None:
        raise RuntimeError(f"m2pt_kernels backend 'cuda' is not available: {why}")
    return torch.ops.m2pt_cuda


def _allow_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and fp32_matmul_allows_tf32()  # 16-bit inputs: no fp32 dots to set


def _scale32(scale: Tensor) -> Tensor:
    return scale.to(torch.float32).contiguous()  # λ is read as fp32 by the kernels


# ---- the backend interface (see the op's docstring) ----------------------------------------------

def forward(x2: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _ops().forward(x2, weight.contiguous(), aux_weight.contiguous(), _scale32(scale),
                          bias.contiguous() if bias is not None else None, _allow_tf32(x2.dtype))


def dgrad(dy2: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor) -> Tensor:
    return _ops().dgrad(dy2, weight.contiguous(), aux_weight.contiguous(), _scale32(scale), _allow_tf32(dy2.dtype))


def wgrad(
    dy2: Tensor, x2: Tensor, aux_weight: Tensor, scale: Tensor,
    need_weight: bool, need_aux: bool, need_scale: bool, need_bias: bool,
):
    dw, daux, dscale, db = _ops().wgrad(dy2, x2, aux_weight.contiguous(), _scale32(scale), need_weight, need_aux,
                                        need_scale, need_bias, _allow_tf32(dy2.dtype))
    return (
        dw if need_weight else None,
        daux if need_aux else None,
        dscale.to(scale.dtype).view(scale.shape) if need_scale else None,
        db if need_bias else None,
    )
