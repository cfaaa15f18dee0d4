"""Ops: one file per op and backend, sharing the op's name (``cross_modal_linear*.py``)."""
from .cross_modal_linear import check_inputs, cross_modal_linear

__all__ = ["cross_modal_linear", "check_inputs"]
