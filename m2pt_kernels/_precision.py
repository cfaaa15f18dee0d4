"""The fp32 matmul precision the kernels follow: the one setting torch's own CUDA matmuls obey.

torch has two ways to set it: the legacy ``torch.set_float32_matmul_precision`` /
``torch.backends.cuda.matmul.allow_tf32``, and (torch ≥ 2.9) ``torch.backends.fp32_precision`` /
``torch.backends.cuda.matmul.fp32_precision``. Once the new one is used,
``torch.get_float32_matmul_precision()`` raises ("mix of the legacy and new APIs"), and so does
reading ``torch.backends.cuda.matmul.allow_tf32``. ``torch.backends.cuda.matmul.fp32_precision``
reflects every way of setting it ("tf32" after ``set_float32_matmul_precision("high")``,
``allow_tf32 = True`` or a global "tf32"; "ieee" or "none" otherwise), so it is the one read here.
"""
from __future__ import annotations

import torch


def fp32_matmul_allows_tf32() -> bool:
    """True when fp32 GEMMs may use TF32 (as torch's CUDA matmuls would), False for IEEE fp32."""
    value = getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", None)
    if value is None:  # torch without the new API
        return torch.get_float32_matmul_precision() != "highest"
    return value == "tf32"


def fp32_matmul_precision_name() -> str:
    """The setting in words, for results files: the legacy name ("highest" / "high" / "medium")
    where torch gives one that agrees with what the kernels use, else ``fp32_precision=<tf32|ieee>``
    (the legacy getter raises after some settings of the new API and, after others, still returns
    its own stale value: "high" followed by ``fp32_precision = "ieee"`` reads "high")."""
    tf32 = fp32_matmul_allows_tf32()
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    if legacy is not None and (legacy != "highest") == tf32:
        return legacy
    return f"fp32_precision={'tf32' if tf32 else 'ieee'}"
