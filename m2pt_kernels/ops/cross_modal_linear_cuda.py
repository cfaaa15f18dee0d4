"""CUDA C++ backend of ``m2pt::cross_modal_linear``: loads the compiled extension ``m2pt_kernels._C``.

The package works without the extension; ``availability()`` says why the backend can't run.
"""
from __future__ import annotations

import importlib


def _load():
    try:
        return importlib.import_module("m2pt_kernels._C"), None
    except ImportError as exc:
        return None, f"the extension m2pt_kernels._C is not built ({exc})"


def availability() -> tuple[bool, str]:
    ext, why = _load()
    if ext is None:
        return False, why
    import torch
    if not torch.cuda.is_available():
        return False, "the extension is built but there is no CUDA device"
    return True, "compiled CUDA kernels"
