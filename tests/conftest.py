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


@pytest.fixture
def restore_fp32_precision():
    """Starts from a fresh process's fp32 precision state and puts torch's back as it was after (a test
    that sets the new API would otherwise make the legacy getter raise in every later test). Yields
    whether this torch has the new API."""
    backends = [torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.mkldnn,
                torch.backends.mkldnn.matmul]
    new_api = all(hasattr(b, "fp32_precision") for b in backends)
    saved = [b.fp32_precision for b in backends] if new_api else None
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the session already uses the new API: restore its values as they were
        legacy = None
    torch.set_float32_matmul_precision("highest")  # each test starts from a fresh process's state
    if new_api:
        for b in backends:
            b.fp32_precision = "none"
    yield new_api
    if new_api:
        for b in backends:
            b.fp32_precision = "none"
    if legacy is not None:
        try:
            again = torch.get_float32_matmul_precision()
        except RuntimeError:
            again = None
        if again != legacy:  # the legacy setting keeps its own value: put it back (this sets the new API too)
            torch.set_float32_matmul_precision(legacy)
    if new_api:
        for b, value in zip(backends, saved):  # then the new API's values, global first
            b.fp32_precision = value
