"""Test setup: run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported, so it is set here, first.
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A stale inductor cache can give false results in compile tests.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402

from m2pt_kernels import available_backends  # noqa: E402


def device_for_tests() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def fused_backends() -> list[str]:
    """The fused backends that can run here (triton on CPU under the interpreter)."""
    return [b for b in ("triton", "cuda") if b in available_backends()]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Different random inputs in every test, the same on every run of it (seeded by the test id;
    set M2PT_TEST_SEED to draw another set)."""
    seed = int(os.environ.get("M2PT_TEST_SEED", "0")) or zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield
