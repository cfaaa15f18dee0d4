"""m2pt_kernels: fused kernels and tools for the Multimodal Pathway method (M2PT, CVPR 2024).

``import m2pt_kernels`` needs only torch; triton and the compiled extension are loaded when used.
"""
from ._dispatch import available_backends, backend_status, use_backend
from .ops.cross_modal_linear import cross_modal_linear
from .layers import FusedCrossModalLinear
from .pathways import (PathwayConfig, add_pathways, mark_only_scales_trainable, merge_pathways,
                       reparameterize_aux_into_target_model)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "backend_status",
    "cross_modal_linear",
    "use_backend",
    "FusedCrossModalLinear",
    "PathwayConfig",
    "add_pathways",
    "merge_pathways",
    "mark_only_scales_trainable",
    "reparameterize_aux_into_target_model",
]
