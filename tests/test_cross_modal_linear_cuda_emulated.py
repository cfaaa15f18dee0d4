"""The CUDA kernels of csrc/cross_modal_linear.cu executed on the CPU by a host emulator, against the
float64 reference: the kernels' indexing, tile edges, strides, merge, epilogues (bias, dW, dW' = λ·G,
dλ partials + second reduction, fused db), the forward and dgrad GEMV paths for M <= 64 (vector and
scalar loads, the rounding of the merged weight, fp32 FFMA whatever the tf32 flag).

csrc/emulator/ runs each CUDA thread as a std::thread (blocks one after another, __syncthreads a
barrier, warp shuffles through a per-warp barrier) and nvcuda::wmma as per-lane whole-tile fp32
products. It checks the code's logic, not the hardware: tensor-core fragment layouts, memory-model
subtleties and performance need the GPU tests (tests/test_cross_modal_linear_cuda.py).
The emulator is compiled with g++ (about 10-30 s; no nvcc); skipped without g++ or CUDA headers.
"""
import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from helpers import rel_err, reference64

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DLAM_TOL, DLAM_TOL_TF32 = 1e-5, 2e-3


def _cuda_include():
    spec = importlib.util.spec_from_file_location("m2pt_setup_for_emulator", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    root = setup.find_cuda_toolkit(os.environ)
    for inc in ([os.path.join(root, "include")] if root else []) + ["/usr/local/cuda/include"]:
        if os.path.exists(os.path.join(inc, "crt", "host_defines.h")):
            return inc
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip(f"needs g++ and the CUDA toolkit headers (g++: {cxx}, CUDA include: {inc})")
    src = open(os.path.join(CSRC, "cross_modal_linear.cu"), encoding="utf-8").read()
    # k<<<grid, block, 0, stream>>>(args) -> emu_launch(k, grid, block, args)
    launch = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?), 0, stream>>>\(", re.S)
    emu_src, launches = launch.subn(r"emu_launch(\1, \2, ", src)
    assert launches == src.count("<<<"), "a kernel launch was not rewritten for the emulator"
    out = tmp_path_factory.mktemp("emu")
    (out / "kernels_emu.cpp").write_text(emu_src, encoding="utf-8")
    lib = out / "m2pt_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w",
           "-I", os.path.join(CSRC, "emulator"), "-I", CSRC, "-I", inc,
           "-include", os.path.join(CSRC, "emulator", "emulator.h"),
           str(out / "kernels_emu.cpp"), os.path.join(CSRC, "emulator", "emulator_api.cpp"), "-o", str(lib)]
    # UBSan's alignment check: a 16-byte vector load from an address that is not 16-byte aligned
    # faults on a GPU but works on x86, so without it the emulator can't see a missing alignment
    # check. Its runtime reads UBSAN_OPTIONS from the environment the process started with, so the
    # reports go to stderr: ``launches`` sends fd 2 to a file around every emulated launch and fails
    # on a report. Without libubsan: built without the check (``emu.ubsan`` False).
    ubsan = subprocess.run(cmd[:1] + ["-fsanitize=alignment"] + cmd[1:], capture_output=True, text=True, timeout=600)
    if ubsan.returncode != 0:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
    emu_lib = ctypes.CDLL(str(lib))
    emu_lib.ubsan = ubsan.returncode == 0
    return emu_lib


@contextlib.contextmanager
def launches(emu):
    """Emulated launches: fail with UBSan's report if a load or store in them was misaligned."""
    if not emu.ubsan:
        yield
        return
    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    assert "runtime error" not in text, "misaligned access in the emulated kernels:\n" + text[:3000]


def _p(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _i(v):
    return ctypes.c_int64(v)


def run_emulated(emu, x, w, a, s, b, dy, *, tf32=False, need=(True, True, True, True)):
    """forward, dgrad and wgrad of the emulated kernels on 2-D x [M, K] (any strides), dy [M, N]."""
    m, k = x.shape
    n = w.shape[0]
    dt, math = DTYPES[x.dtype], int(tf32)
    per_channel = int(s.numel() > 1)
    s32 = s.float().contiguous()
    y = torch.empty(m, n, dtype=x.dtype)
    dx = torch.empty(m, k, dtype=x.dtype)
    need_w, need_a, need_s, need_b = need
    dw = torch.full((n, k), float("nan"), dtype=x.dtype) if need_w else None
    da = torch.full((n, k), float("nan"), dtype=x.dtype) if need_a else None
    ds = torch.full((s.numel(),), float("nan")) if need_s else None
    part = torch.full(((k + 63) // 64, n), float("nan")) if need_s else None
    db = torch.full((n,), float("nan"), dtype=x.dtype) if need_b else None
    with launches(emu):
        emu.emu_forward(_i(m), _i(n), _i(k), _p(x), _i(x.stride(0)), _i(x.stride(1)), _p(w), _p(a), _p(s32),
                        per_channel, _p(b), _p(y), dt, math)
        emu.emu_dgrad(_i(m), _i(n), _i(k), _p(dy), _i(dy.stride(0)), _i(dy.stride(1)), _p(w), _p(a), _p(s32),
                      per_channel, _p(dx), dt, math)
        emu.emu_wgrad(_i(m), _i(n), _i(k), _p(dy), _i(dy.stride(0)), _i(dy.stride(1)), _p(x), _i(x.stride(0)),
                      _i(x.stride(1)), _p(a), _p(s32), per_channel, _p(dw), _p(da), _p(ds), _p(part), _p(db), dt,
                      math)
    return y, dx, dw, da, ds, db


def make(m, k, n, dtype, *, per_channel, bias, strided_x=False, strided_dy=False):
    if strided_x:  # column-major x: the loader walks the other dim
        x = torch.randn(k, m).to(dtype).t()
    else:
        x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) / k ** 0.5).to(dtype)
    a = (torch.randn(n, k) / k ** 0.5).to(dtype)
    s = torch.randn(n if per_channel else 1)
    b = torch.randn(n).to(dtype) if bias else None
    dy = torch.randn(n, m).to(dtype).t() if strided_dy else torch.randn(m, n).to(dtype)
    return x, w, a, s, b, dy


def dlam_err(got, ref, x, a, dy, per_channel):
    """dλ's error on the scale of its terms: |Σ_k G⊙W'| <= ‖G_n‖·‖W'_n‖ per channel (summed over n for
    one λ). A plain relative error is meaningless when the sum cancels (seen: 1.4e-4 in fp32 for one
    λ). dλ is fp32 whatever the input dtype (G accumulates exact products of the inputs in fp32), so
    its tolerance does not depend on the dtype: DLAM_TOL, or DLAM_TOL_TF32 when tf32 rounds G's inputs."""
    g = dy.double().t() @ x.double()
    bound = g.norm(dim=1) * a.double().norm(dim=1)
    bound = bound if per_channel else bound.sum().view(1)
    return ((got.double() - ref.double()).norm() / bound.norm()).item()


def check(outs, x, w, a, s, b, dy, tol, need=(True, True, True, True), tf32=False):
    y, dx, dw, da, ds, db = outs
    y64, (dx64, dw64, da64, ds64, db64) = reference64(x, w, a, s, b if b is not None else None, dy)
    if b is None:  # reference64 has no db then; Σ_m dy directly
        db64 = dy.double().sum(0)
    assert rel_err(y, y64) < tol, ("y", rel_err(y, y64))
    assert rel_err(dx, dx64) < tol, ("dx", rel_err(dx, dx64))
    for name, got, ref, wanted in (("dW", dw, dw64, need[0]), ("dW'", da, da64, need[1]),
                                   ("dλ", ds, ds64, need[2]), ("db", db, db64, need[3])):
        if not wanted:
            continue
        if name == "dλ":
            err = dlam_err(got, ref, x, a, dy, s.numel() > 1)
            assert err < (DLAM_TOL_TF32 if tf32 else DLAM_TOL), (name, err)
        else:
            err = rel_err(got, ref)
            assert err < tol, (name, err)


# (M, K, N): M = 1, the GEMV/tile boundary 64/65, K and N not multiples of the 64x64x32 tile; odd
# sizes take the scalar tile loads, multiples of 8 the 16-byte ones (both orientations).
SHAPES = [(1, 19, 13), (7, 40, 37), (64, 33, 70), (65, 72, 17), (130, 50, 66), (72, 48, 40), (130, 96, 80)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("per_channel", [False, True], ids=["lam1", "lamN"])
def test_emulated_kernels_match_reference(emu, dtype, m, k, n, per_channel):
    bias = (m + int(per_channel)) % 2 == 1
    x, w, a, s, b, dy = make(m, k, n, dtype, per_channel=per_channel, bias=bias)
    check(run_emulated(emu, x, w, a, s, b, dy), x, w, a, s, b, dy, TOL[dtype])


@pytest.mark.parametrize("per_channel", [False, True])
def test_emulated_tf32(emu, per_channel):
    x, w, a, s, b, dy = make(70, 45, 66, torch.float32, per_channel=per_channel, bias=True)
    check(run_emulated(emu, x, w, a, s, b, dy, tf32=True), x, w, a, s, b, dy, 2e-3, tf32=True)


@pytest.mark.parametrize("m", [5, 97])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_strided_inputs(emu, dtype, m):
    x, w, a, s, b, dy = make(m, 48, 40, dtype, per_channel=True, bias=True, strided_x=True, strided_dy=True)
    assert not x.is_contiguous() and not dy.is_contiguous()
    check(run_emulated(emu, x, w, a, s, b, dy), x, w, a, s, b, dy, TOL[dtype])


@pytest.mark.parametrize("need", [(False, False, True, False), (False, False, False, True), (True, False, False, True)],
                         ids=["lambda-only", "bias-only", "weight+bias"])
def test_emulated_partial_gradients(emu, need):
    x, w, a, s, b, dy = make(70, 40, 37, torch.bfloat16, per_channel=False, bias=True)
    check(run_emulated(emu, x, w, a, s, b, dy, need=need), x, w, a, s, b, dy, 2e-2, need=need)


@pytest.mark.parametrize("need", [(True, False, True, True), (False, True, False, False)],
                         ids=["weight+lambda+bias (W' frozen)", "aux-only"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["lam1", "lamN"])
def test_emulated_more_gradient_combinations(emu, need, per_channel):
    """The usual M2PT case (W' frozen: dW, dλ, db) and W' alone, both λ shapes."""
    x, w, a, s, b, dy = make(70, 40, 37, torch.bfloat16, per_channel=per_channel, bias=True)
    check(run_emulated(emu, x, w, a, s, b, dy, need=need), x, w, a, s, b, dy, 2e-2, need=need)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [9, 97], ids=["gemv", "tiled"])
def test_emulated_rows_padded_off_the_vector_width(emu, dtype, m):
    """x and dy as column slices of wider buffers: every row starts at an aligned base, K and N are
    multiples of 8, but the row stride (K + 1, N + 1) is not, so only the first row is 16-byte
    aligned. The kernels must take scalar loads there (a vector load would fault on a GPU; here the
    UBSan build reports it) and give the contiguous inputs' results, bit for bit where the
    scalar and vector paths sum in the same order (all but the fp32 GEMV's)."""
    k, n = 48, 40
    x, w, a, s, b, dy = make(m, k, n, dtype, per_channel=True, bias=True)
    x_pad = torch.empty(m, k + 1, dtype=dtype)[:, :k].copy_(x)
    dy_pad = torch.empty(m, n + 1, dtype=dtype)[:, :n].copy_(dy)
    assert x_pad.stride() == (k + 1, 1) and dy_pad.stride() == (n + 1, 1)
    padded = run_emulated(emu, x_pad, w, a, s, b, dy_pad)
    if not (dtype == torch.float32 and m <= 64):
        for got, ref in zip(padded, run_emulated(emu, x, w, a, s, b, dy)):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    check(padded, x, w, a, s, b, dy, TOL[dtype])


def test_emulated_gemv_vector_and_scalar_paths_agree(emu):
    """K % 8 == 0 and aligned: uint4 loads; the same data at an odd offset: scalar loads."""
    x, w, a, s, b, dy = make(9, 64, 24, torch.bfloat16, per_channel=True, bias=True)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    buf[1:] = x.reshape(-1)
    x_odd = buf[1:].view(9, 64)
    y_vec = run_emulated(emu, x, w, a, s, b, dy)[0]
    y_scalar = run_emulated(emu, x_odd, w, a, s, b, dy)[0]
    torch.testing.assert_close(y_vec, y_scalar, rtol=0, atol=0)
    y64, _ = reference64(x, w, a, s, b, dy)
    assert rel_err(y_vec, y64) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_gemm_vector_and_scalar_tile_loads_agree(emu, dtype):
    """M > 64 (tiled kernel): aligned operands take 16-byte tile loads, x and dy at an odd element
    offset scalar ones; the tiles, and so every output, must be bit-identical."""
    x, w, a, s, b, dy = make(97, 48, 40, dtype, per_channel=True, bias=True)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)

    vec = run_emulated(emu, x, w, a, s, b, dy)
    scalar = run_emulated(emu, shifted(x), w, a, s, b, shifted(dy))
    for got, ref in zip(scalar, vec):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    check(vec, x, w, a, s, b, dy, TOL[dtype])


def run_dgrad(emu, dy, w, a, s, *, tf32=False):
    """dx of the emulated dgrad launcher alone (GEMV for M <= 64, tiled kernel above)."""
    m, n = dy.shape
    k = w.shape[1]
    dx = torch.full((m, k), float("nan"), dtype=dy.dtype)
    s32 = s.float().contiguous()  # held: the kernel reads it through a raw pointer
    with launches(emu):
        emu.emu_dgrad(_i(m), _i(n), _i(k), _p(dy), _i(dy.stride(0)), _i(dy.stride(1)), _p(w), _p(a), _p(s32),
                      int(s.numel() > 1), _p(dx), DTYPES[dy.dtype], int(tf32))
    return dx


def shifted(t):
    """The same values at an odd element offset: not 16-byte aligned, so the scalar loads."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    buf[1:] = t.reshape(-1)
    return buf[1:].view(t.shape)


# dgrad around the GEMV / tile boundary: M = 1, 3 (one token group), 64 (all token groups: 8 for
# bf16/fp16, 4 for fp32), 65 (the tiled kernel). K = 40: 16-byte loads of W / W' rows (K % 8 == 0);
# K = 37: scalar loads and a partial last column block. N = 263 > 256 row groups: threads take several
# rows; N = 70: some row groups get none.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 64, 65])
@pytest.mark.parametrize("k,n", [(40, 263), (37, 70)])
@pytest.mark.parametrize("per_channel", [False, True], ids=["lam1", "lamN"])
def test_emulated_dgrad_small_m(emu, dtype, m, k, n, per_channel):
    x, w, a, s, b, dy = make(m, k, n, dtype, per_channel=per_channel, bias=False)
    if (m + k) % 2 == 1:  # every other column of a wider buffer: strides (2N, 2), for M = 1 too
        dy = torch.randn(m, 2 * n).to(dtype)[:, ::2]
        assert not dy.is_contiguous()
    dx = run_dgrad(emu, dy, w, a, s)
    _, (dx64, *_) = reference64(x, w, a, s, None, dy)
    assert dx.dtype == dtype
    assert rel_err(dx, dx64) < TOL[dtype], rel_err(dx, dx64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [9, 64])
def test_emulated_gemv_dgrad_vector_and_scalar_paths_agree(emu, dtype, m):
    """Aligned W, W' with K % (16 / itemsize) == 0: uint4 row loads; the same W, W' at an odd element
    offset: scalar loads. Same columns per thread and the same summation order, so bit-identical.
    dy is column-major (strided) in both."""
    x, w, a, s, b, dy = make(m, 48, 300, dtype, per_channel=True, bias=False, strided_dy=True)
    dx_vec = run_dgrad(emu, dy, w, a, s)
    dx_scalar = run_dgrad(emu, dy, shifted(w), shifted(a), s)
    torch.testing.assert_close(dx_scalar, dx_vec, rtol=0, atol=0)
    _, (dx64, *_) = reference64(x, w, a, s, None, dy)
    assert rel_err(dx_vec, dx64) < TOL[dtype]


@pytest.mark.parametrize("m", [5, 64])
def test_emulated_gemv_fp32_is_ffma_whatever_tf32(emu, m):
    """M <= 64: both GEMVs multiply fp32 with FFMA; the tf32 flag must change nothing (bit-identical)."""
    x, w, a, s, b, dy = make(m, 44, 37, torch.float32, per_channel=False, bias=True)
    y_hi, dx_hi = run_emulated(emu, x, w, a, s, b, dy)[:2]
    y_tf, dx_tf = run_emulated(emu, x, w, a, s, b, dy, tf32=True)[:2]
    torch.testing.assert_close(y_tf, y_hi, rtol=0, atol=0)
    torch.testing.assert_close(dx_tf, dx_hi, rtol=0, atol=0)
    check(run_emulated(emu, x, w, a, s, b, dy), x, w, a, s, b, dy, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [8, 5], ids=["vector", "scalar"])
@pytest.mark.parametrize("m", [1, 65], ids=["gemv", "tiled"])
def test_emulated_merged_weight_rounded_once(emu, dtype, k, m):
    """W + λ·W' is formed in fp32 and rounded once to the input dtype, as the reference's
    merged_weight does (and so the result of the tiled kernel and the GEMVs). Designed so only that
    rounding is visible: W = 1, λ·W' = 0.75 ulp(1) merges to 1 + ulp after rounding (1 + 0.75 ulp in
    fp32), and a difference of two weights of 1 cancels everything else: dx = ulp exactly, not 0.75 ulp
    (same for y). Every product and sum here is exact in fp32."""
    ulp = torch.finfo(dtype).eps
    w = torch.ones(2, k, dtype=dtype)
    a = torch.zeros(2, k, dtype=dtype)
    a[0] = 0.75 * ulp                                  # exact in dtype
    s = torch.tensor([1.0, 3.0])                       # λ per channel; λ[1]·W'[1] = 0
    dy = torch.zeros(m, 2, dtype=dtype)
    dy[:, 0], dy[:, 1] = 1.0, -1.0
    dx = run_dgrad(emu, dy, w, a, s)
    assert torch.equal(dx, torch.full((m, k), ulp, dtype=dtype)), dx[0]
    # forward: y[:, 0] = Σ_k x·(W + λW')[0] with x = (1, -1, 0, ...): = (1 + ulp) - 1 = ulp
    x = torch.zeros(m, k, dtype=dtype)
    x[:, 0], x[:, 1] = 1.0, -1.0
    wf = torch.ones(1, k, dtype=dtype)
    af = torch.zeros(1, k, dtype=dtype)
    af[0, 0] = 0.75 * ulp
    y = torch.full((m, 1), float("nan"), dtype=dtype)
    lam = torch.ones(1)  # held: the kernel reads it through a raw pointer
    emu.emu_forward(_i(m), _i(1), _i(k), _p(x), _i(x.stride(0)), _i(x.stride(1)), _p(wf), _p(af),
                    _p(lam), 0, None, _p(y), DTYPES[dtype], 0)
    assert torch.equal(y, torch.full((m, 1), ulp, dtype=dtype)), y[0]


@pytest.mark.parametrize("m", [5, 70], ids=["gemv", "gemm"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["lam1", "lamN"])
@pytest.mark.parametrize("where,index,value", [
    ("s", (0,), float("inf")), ("s", (0,), float("-inf")), ("x", (0, 0), float("inf")),
    ("x", (2, 39), float("-inf")), ("dy", (0, 0), float("inf")), ("dy", (4, 36), float("-inf"))])
def test_emulated_infinities_land_where_the_paper_puts_them(emu, m, per_channel, where, index, value):
    """±inf in λ, x or dy: y and every gradient have inf / NaN exactly where the paper's autograd graph
    has them, and the finite values agree. K = 40, N = 37 are no tile multiples: a tile's padding is
    0, and 0·inf is NaN, so padded rows or columns must not reach a sum."""
    k, n = 40, 37
    t = {"x": torch.rand(m, k), "w": torch.rand(n, k), "a": torch.rand(n, k),
         "s": torch.rand(n if per_channel else 1), "b": torch.rand(n), "dy": torch.rand(m, n)}
    t = {key: v + 0.1 for key, v in t.items()}  # positive: no inf - inf beyond the one we put
    t[where][index] = value
    leaves = [t[key].clone().requires_grad_(True) for key in ("x", "w", "a", "s", "b")]
    x, w, a, s, b = leaves
    y = torch.nn.functional.linear(x, w + (s if s.numel() == 1 else s.view(-1, 1)) * a, b)
    y.backward(t["dy"])
    want = [y.detach(), x.grad, w.grad, a.grad, s.grad, b.grad]
    got = run_emulated(emu, t["x"], t["w"], t["a"], t["s"], t["b"], t["dy"])
    for label, g, r in zip(("y", "dx", "dW", "dW'", "dλ", "db"), got, want):
        for flags in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(flags(g), flags(r)), (label, flags.__name__)
        finite = torch.isfinite(r)
        assert rel_err(g[finite], r[finite]) < 1e-5, label
