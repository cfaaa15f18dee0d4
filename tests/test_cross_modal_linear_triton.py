"""Triton backend of cross_modal_linear: both kernel orientations and several tile configs against
the float64 reference, split-M, empty / degenerate inputs, determinism, and what it allocates.

Runs on the CPU under TRITON_INTERPRET=1 (conftest) or on a GPU; configs are forced with
``config_override`` so the small test shapes still span several tiles.
"""
import contextlib
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from m2pt_kernels.ops import cross_modal_linear_reference as reference_backend

from conftest import device_for_tests, fused_backends
from helpers import GRAD_NAMES, check_against_reference, make_inputs, rel_err, run_backend, tolerance

pytestmark = pytest.mark.skipif("triton" not in fused_backends(), reason="triton backend not available")

if "triton" in fused_backends():
    from m2pt_kernels.ops import cross_modal_linear_triton as triton_backend

DEVICE = device_for_tests()


def _gemm(bm, bc, br, swap, group=2):
    return dict(BLOCK_M=bm, BLOCK_C=bc, BLOCK_R=br, GROUP_M=group, SWAP_AB=swap)


def _wg(bn, bk, bm, group=2):
    return dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, GROUP_N=group)


# (name, gemm meta, wgrad meta): both orientations, square and rectangular tiles, grouping 1/2/4.
CONFIGS = [
    ("plain16", _gemm(16, 16, 16, False), _wg(16, 16, 16)),
    ("swap32x16", _gemm(32, 16, 32, True, group=1), _wg(32, 16, 32, group=1)),
    ("swap16x32", _gemm(16, 32, 16, True, group=4), _wg(16, 32, 16, group=4)),
]

# (leads, K, N, options): M = 1, odd, several tiles; K and N never tile multiples.
CASES = [
    ((1,), 19, 13, dict(bias=True, per_channel=False, aux_trainable=True)),
    ((7,), 33, 17, dict(bias=False, per_channel=True, aux_trainable=False)),
    ((2, 19), 40, 37, dict(bias=True, per_channel=True, aux_trainable=True, non_contiguous=True)),
    ((45,), 24, 20, dict(bias=True, per_channel=False, aux_trainable=False, non_contiguous=True,
                         strided_weight=True)),
]


make_inputs = functools.partial(make_inputs, device=DEVICE)
run_triton = functools.partial(run_backend, "triton")


check_against_reference = functools.partial(check_against_reference, "triton", device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("name,gemm,wg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_against_float64(name, gemm, wg, case, dtype):
    lead, k, n, opts = CASES[case]
    inputs = make_inputs(lead, k, n, dtype, **opts)
    with triton_backend.config_override(gemm=gemm, wgrad=wg):
        check_against_reference(inputs, dtype)


def test_interpreter_default_config():
    """No override: the interpreter's own small config (on a GPU: autotuning)."""
    check_against_reference(make_inputs((3, 5), 21, 18, torch.float32, per_channel=True), torch.float32)


@pytest.mark.parametrize("kind", ["gemm", "wgrad"])
def test_every_autotune_config_is_correct(kind):
    """Each config the GPU autotuner may pick, run as-is (one or two tiles here)."""
    configs = triton_backend.GEMM_CONFIGS if kind == "gemm" else triton_backend.WGRAD_CONFIGS
    assert kind != "gemm" or {c.kwargs["SWAP_AB"] for c in configs} == {False, True}
    for config in configs:
        inputs = make_inputs((37,), 40, 65, torch.float16, per_channel=True)
        with triton_backend.config_override(**{kind: dict(config.kwargs)}):
            check_against_reference(inputs, torch.float16)


@pytest.mark.parametrize("split_m", [1, 2, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_probe_split_m(split_m, with_bias):
    """λ-only (and db) wgrad: G is never written, M split over programs, partials summed."""
    x, w, a, s, b = make_inputs((3, 23), 26, 21, torch.float32, per_channel=split_m == 2,
                                weight_trainable=False, aux_trainable=False)
    b.requires_grad_(with_bias)
    with triton_backend.config_override(gemm=CONFIGS[0][1], wgrad=CONFIGS[0][2], split_m=split_m):
        check_against_reference((x, w, a, s, b), torch.float32)


@pytest.mark.parametrize("per_channel", [False, True])
def test_scale_in_half_precision(per_channel):
    """λ stored in bf16 (a model cast with .to(torch.bfloat16)): read in fp32, dλ comes back in bf16."""
    x, w, a, s, b = make_inputs((2, 9), 21, 14, torch.float16, per_channel=per_channel)
    s = s.detach().to(torch.bfloat16).requires_grad_(True)
    check_against_reference((x, w, a, s, b), torch.float16)


def test_strided_bias_and_scale():
    """b and λ as strided views (every other element of a larger buffer)."""
    x, w, a, _, _ = make_inputs((5, 3), 18, 22, torch.float32)
    s = torch.randn(44, device=DEVICE)[::2].requires_grad_(True)
    b = torch.randn(66, device=DEVICE)[::3].requires_grad_(True)
    assert s.stride(0) == 2 and b.stride(0) == 3
    with triton_backend.config_override(gemm=CONFIGS[2][1], wgrad=CONFIGS[2][2]):
        check_against_reference((x, w, a, s, b), torch.float32)


def test_scale_only_no_dgrad():
    """x frozen too: only dλ is computed (no dgrad launch)."""
    x, w, a, s, b = make_inputs((9,), 21, 14, torch.bfloat16, weight_trainable=False, aux_trainable=False,
                                bias=False)
    x.requires_grad_(False)
    check_against_reference((x, w, a, s, b), torch.bfloat16)


def test_bias_only_grad():
    x, w, a, s, b = make_inputs((9,), 21, 14, torch.float16, weight_trainable=False, aux_trainable=False)
    x.requires_grad_(False)
    s.requires_grad_(False)
    check_against_reference((x, w, a, s, b), torch.float16)


@pytest.mark.parametrize("flags", [(True, True, True, True), (False, False, True, True), (True, False, False, False)])
def test_empty_m(flags):
    """M = 0: empty y and dx, zero weight gradients, no kernel crash."""
    x = torch.randn(0, 12, device=DEVICE)
    w, a = torch.randn(10, 12, device=DEVICE), torch.randn(10, 12, device=DEVICE)
    s, b = torch.randn(10, device=DEVICE), torch.randn(10, device=DEVICE)
    y = triton_backend.forward(x, w, a, s, b)
    assert y.shape == (0, 10) and y.dtype == x.dtype
    dy = torch.randn(0, 10, device=DEVICE)
    assert triton_backend.dgrad(dy, w, a, s).shape == (0, 12)
    got = triton_backend.wgrad(dy, x, a, s, *flags)
    want = reference_backend.wgrad(dy, x, a, s, *flags)
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if g is not None:
            assert g.shape == r.shape and g.dtype == r.dtype and torch.equal(g, r)


def test_empty_m_through_the_op():
    inputs = make_inputs((0, 3), 12, 10, torch.float32)
    check_against_reference(inputs, torch.float32)


def test_degenerate_k_zero():
    """K = 0: y is the bias, G is empty, dλ is zero."""
    x = torch.randn(4, 0, device=DEVICE)
    w = a = torch.randn(6, 0, device=DEVICE)
    s, b = torch.randn(1, device=DEVICE), torch.randn(6, device=DEVICE)
    assert torch.equal(triton_backend.forward(x, w, a, s, b), b.expand(4, 6))
    dw, daux, ds, db = triton_backend.wgrad(torch.ones(4, 6, device=DEVICE), x, a, s, True, True, True, True)
    assert dw.shape == daux.shape == (6, 0) and torch.equal(ds, torch.zeros(1, device=DEVICE))
    assert torch.equal(db, torch.full((6,), 4.0, device=DEVICE))


# (how to set it, whether TF32 is then allowed): the legacy API, and torch's newer fp32_precision
# (after which torch.get_float32_matmul_precision() raises "mix of the legacy and new APIs").
PRECISION_SETTINGS = [
    ("torch.set_float32_matmul_precision('highest')", False),
    ("torch.set_float32_matmul_precision('high')", True),
    ("torch.set_float32_matmul_precision('medium')", True),
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'tf32'", True),
    ("torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
    ("torch.set_float32_matmul_precision('high'); torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
]


@pytest.mark.parametrize("setting,tf32", PRECISION_SETTINGS)
def test_fp32_precision_follows_torch_setting(setting, tf32, restore_fp32_precision):
    """Both kernels' fp32 dots follow the setting, whichever of torch's two APIs set it."""
    if "fp32_precision" in setting and not restore_fp32_precision:
        pytest.skip("this torch has no fp32_precision API")
    from m2pt_kernels.bench import fp32_matmul_precision_name
    from m2pt_kernels.ops import cross_modal_linear_cuda as cuda_backend

    exec(setting, {"torch": torch})
    assert triton_backend._precision(torch.float32) == ("tf32" if tf32 else "ieee")
    assert cuda_backend._allow_tf32(torch.float32) is tf32
    assert cuda_backend._allow_tf32(torch.bfloat16) is False  # no fp32 dots to set
    name = fp32_matmul_precision_name()  # what results files record: never raises, never stale
    assert name in (("high", "medium", "fp32_precision=tf32") if tf32 else ("highest", "fp32_precision=ieee")), name


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("split_m", [1, 3])
def test_deterministic(split_m, per_channel):
    """Two runs give bitwise-equal outputs and gradients (no atomics; fixed reduction order)."""
    inputs = make_inputs((41,), 29, 23, torch.bfloat16, per_channel=per_channel, weight_trainable=split_m == 1,
                         aux_trainable=split_m == 1)
    dy = torch.randn(41, 23, device=DEVICE, dtype=torch.bfloat16)
    runs = []
    with triton_backend.config_override(gemm=CONFIGS[1][1], wgrad=CONFIGS[1][2], split_m=split_m):
        for _ in range(2):
            for t in inputs:
                if t is not None:
                    t.grad = None
            y, grads = run_triton(inputs, dy)
            runs.append([y.detach().clone()] + [g.clone() for g in grads if g is not None])
    assert len(runs[0]) == len(runs[1]) >= 3
    for first, second in zip(*runs):
        assert torch.equal(first, second)


_INF = float("inf")


def _nonfinite(t):
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


@pytest.mark.parametrize("per_channel", [False, True], ids=["lam1", "lamN"])
@pytest.mark.parametrize("where,index,value", [
    ("lam", (0,), _INF), ("lam", (0,), -_INF), ("x", (0, 0), _INF), ("x", (2, 19), -_INF),
    ("dy", (0, 0), _INF), ("dy", (4, 17), -_INF)])
@pytest.mark.parametrize("name,gemm,wg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_infinities_land_where_the_reference_puts_them(name, gemm, wg, where, index, value, per_channel):
    """±inf in λ, x or dy: y and every gradient have inf / NaN exactly where the reference (the paper's
    math) has them, and the finite values agree. K = 20 and N = 18 are no tile multiples: a tile's
    padding is 0, and 0·inf is NaN, so padded rows or columns must not reach a sum (the merged weight's
    padded rows for λ = ±inf, G's padded rows and columns in dλ)."""
    m, k, n = 5, 20, 18
    t = {"x": torch.rand(m, k), "w": torch.rand(n, k), "a": torch.rand(n, k),
         "lam": torch.rand(n if per_channel else 1), "b": torch.rand(n), "dy": torch.rand(m, n)}
    t = {key: (v + 0.1).to(DEVICE) for key, v in t.items()}  # positive: no inf - inf beyond the one we put
    t[where][index] = value
    outs = {}
    for backend in ("reference", "triton"):
        leaves = [t[key].clone().requires_grad_(True) for key in ("x", "w", "a", "lam", "b")]
        override = (triton_backend.config_override(gemm=gemm, wgrad=wg) if backend == "triton"
                    else contextlib.nullcontext())
        with override:
            y, grads = run_backend(backend, leaves, t["dy"])
        outs[backend] = [y.detach()] + grads
    for label, got, want in zip(("y",) + GRAD_NAMES, outs["triton"], outs["reference"]):
        assert torch.equal(_nonfinite(got), _nonfinite(want)), label
        finite = torch.isfinite(want)
        assert rel_err(got[finite], want[finite]) < tolerance(torch.float32, DEVICE), label


# ------------------------------------------------------------------ the wgrad finalize kernel

# Small blocks so the tiny test shapes run every loop of the finalize kernel more than once.
FINALIZE_TINY = dict(BLOCK_N=16, BLOCK_T=2, SCALAR_T=2, SCALAR_C=4, num_warps=1)


@pytest.fixture
def nan_workspace(monkeypatch):
    """The wgrad partial buffers start as NaN (they are torch.empty in the backend): any value the
    finalize kernel reads that the wgrad kernel did not write makes dλ / db NaN."""
    made = []

    def workspace(shape, device):
        made.append(torch.full(shape, float("nan"), device=device, dtype=torch.float32))
        return made[-1]

    monkeypatch.setattr(triton_backend, "_workspace", workspace)
    return made


def _wgrad_inputs(m, k, n, dtype, per_channel, scale_dtype=torch.float32):
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    a = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    s = torch.randn(n if per_channel else 1, device=DEVICE).to(scale_dtype)
    return dy, x, a, s


def _check_wgrad(dy, x, a, s, flags):
    got = triton_backend.wgrad(dy, x, a, s, *flags)
    want = reference_backend.wgrad(dy.double(), x.double(), a.double(), s.double(), *flags)
    for name, g, r, dtype in zip(("dW", "dW'", "dλ", "db"), got, want, (a.dtype, a.dtype, s.dtype, dy.dtype)):
        assert (g is None) == (r is None), name
        if g is not None:
            assert g.dtype == dtype and g.shape == r.shape, (name, g.dtype, g.shape, r.shape)
            tol = max(tolerance(dy.dtype, DEVICE), tolerance(dtype, DEVICE))
            assert rel_err(g, r) < tol, (name, rel_err(g, r))
    return got


@pytest.mark.parametrize("mode", ["full", "probe", "probe_split3"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_channel", [False, True], ids=["lam1", "lamN"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_finalize_against_float64(dtype, per_channel, bias, mode, nan_workspace, monkeypatch):
    """dλ (λ [1]: summed over channels too) and db from the finalize kernel vs float64: M = 1 and a
    shape with several finalize programs (N = 300 > 2·128; 4 k-tiles, 5 n-tiles); the default
    finalize blocks and tiny ones (several k-tile and n-tile blocks); split-M."""
    flags = (True, mode == "full", True, bias) if mode == "full" else (False, False, True, bias)
    split = 3 if mode == "probe_split3" else 1
    # λ in bf16 with fp16 activations: dλ is cast to λ's dtype, db to dy's
    scale_dtype = torch.bfloat16 if dtype == torch.float16 else torch.float32
    for finalize in (dict(triton_backend.FINALIZE_META), FINALIZE_TINY):
        monkeypatch.setattr(triton_backend, "FINALIZE_META", finalize)
        for m, k, n in ((1, 19, 13), (3, 64, 300)):
            inputs = _wgrad_inputs(m, k, n, dtype, per_channel, scale_dtype)
            with triton_backend.config_override(wgrad=_wg(64, 16, 16), split_m=split):
                _check_wgrad(*inputs, flags)
    assert len(nan_workspace) == 4 * (1 + bias)


def test_finalize_reads_only_the_rows_the_autotuned_config_wrote(monkeypatch, nan_workspace):
    """The partials are sized for the smallest BLOCK_K; the autotuner picks BLOCK_K = 32 here (half
    the k-tile rows). The second, cached call benchmarks nothing, so the rows past the chosen
    config's stay NaN -- checked, so this test can fail -- and dλ must still be right."""
    import triton

    calls = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        calls.append(1)
        return [100.0 - len(calls)] * 3  # the later config wins

    tuned = triton_backend.autotuned(triton_backend._wgrad_kernel,
                                     [triton.Config(_wg(16, 16, 16)), triton.Config(_wg(16, 32, 16))],
                                     do_bench=fake_bench)
    monkeypatch.setattr(triton_backend, "_wgrad_tuned", tuned)
    monkeypatch.setattr(triton_backend, "_meta", lambda kind, dtype: None)
    for per_channel in (True, False):
        for call in range(2):
            inputs = _wgrad_inputs(7, 70, 37, torch.float16, per_channel)
            _check_wgrad(*inputs, (True, False, True, True))
            dlam_part = nan_workspace[-2]
            assert dlam_part.shape == (1, 5, 37)  # cdiv(70, 16) rows
            written = triton.cdiv(70, 32)
            columns = 37 if per_channel else triton.cdiv(37, 16)  # λ [1]: one value per n-tile
            assert not dlam_part[:, :written, :columns].isnan().any()
            if call == 1:
                assert dlam_part[:, written:].isnan().all() and dlam_part[:, :, columns:].isnan().all()
    assert tuned.best_config.kwargs["BLOCK_K"] == 32 and len(calls) == 2  # λ's shape is not in the key


def test_finalize_uses_the_config_this_call_launched(monkeypatch, nan_workspace):
    """The autotuner's ``best_config`` is one attribute shared by every caller: another thread's
    launch (one autograd thread per GPU) can overwrite it between this call's launch and its
    finalize. The finalize must use the config that this call's launch ran with (here, after each
    launch, best_config is switched to the other BLOCK_K, as the other thread would)."""
    import triton

    configs = [triton.Config(_wg(16, 16, 16)), triton.Config(_wg(16, 32, 16))]
    tuned = triton_backend.autotuned(triton_backend._wgrad_kernel, configs,
                                     do_bench=lambda kernel_call, quantiles: kernel_call() or [1.0] * 3)
    run = tuned.run

    def run_then_other_thread(*args, **kwargs):
        out = run(*args, **kwargs)
        tuned.best_config = next(c for c in configs if c is not tuned.best_config)
        return out

    monkeypatch.setattr(tuned, "run", run_then_other_thread)
    monkeypatch.setattr(triton_backend, "_wgrad_tuned", tuned)
    monkeypatch.setattr(triton_backend, "_meta", lambda kind, dtype: None)
    for per_channel in (True, False):
        for _ in range(2):  # tuning, then cached
            _check_wgrad(*_wgrad_inputs(7, 70, 37, torch.float16, per_channel), (True, False, True, True))


class _FakeCudaTensor:
    is_cuda = True
    device = "cuda:0"

    def __init__(self, element_size):
        self._size = element_size

    def element_size(self):
        return self._size


@pytest.mark.parametrize("capability,smem", [((8, 0), 166912), ((8, 9), 101376), ((9, 0), 232448)])
@pytest.mark.parametrize("elem", [4, 2], ids=["fp32", "bf16"])
def test_configs_are_pruned_for_the_device(monkeypatch, capability, smem, elem):
    """Configs whose operand staging alone exceeds the GPU's shared memory are not timed, SWAP_AB
    (for wgmma) only on Hopper; the deterministic configs and at least one of every kind remain."""
    monkeypatch.setattr(triton_backend, "_device_limits", lambda device: (smem, capability))
    dtype = torch.float32 if elem == 4 else torch.bfloat16
    for kind, configs, fixed in (("gemm", triton_backend.GEMM_CONFIGS, triton_backend.DETERMINISTIC_GEMM),
                                 ("wgrad", triton_backend.WGRAD_CONFIGS, triton_backend.DETERMINISTIC_WGRAD)):
        kept = triton_backend.prune_for_device(kind, configs, _FakeCudaTensor(elem))
        assert kept and all(triton_backend.smem_lower_bound(kind, c, elem) <= smem for c in kept)
        assert fixed[dtype] in kept
        assert any(c.kwargs.get("SWAP_AB") for c in kept) == (kind == "gemm" and capability >= (9, 0))
        dropped = [c for c in configs if c not in kept]
        assert all(triton_backend.smem_lower_bound(kind, c, elem) > smem or c.kwargs.get("SWAP_AB")
                   for c in dropped)
    # nothing fits: the least demanding config stays (triton then says what is missing)
    tiny = triton_backend.prune_for_device("gemm", triton_backend.GEMM_CONFIGS[:2], _FakeCudaTensor(4))
    assert len(tiny) == 1 or smem >= 196608
    assert triton_backend.prune_for_device("gemm", triton_backend.GEMM_CONFIGS, torch.empty(1)) \
        == triton_backend.GEMM_CONFIGS  # CPU tensors (tests): all


def test_autotune_key_tells_gpu_models_apart(monkeypatch):
    """Triton's autotune cache ignores the device: the key's M_BUCKET carries the compute capability,
    so a config tuned on an H100 is not reused on an sm_86 card (where it may not fit)."""
    caps = {"cuda:0": (9, 0), "cuda:1": (8, 6)}
    monkeypatch.setattr(triton_backend, "_device_limits", lambda device: (0, caps[device]))

    class Fake(_FakeCudaTensor):
        def __init__(self, device):
            super().__init__(2)
            self.device = device

    h100, rtx = (triton_backend._tune_bucket(197, Fake(d)) for d in ("cuda:0", "cuda:1"))
    assert h100 != rtx and h100 == 256 * 1000 + 90 and rtx == 256 * 1000 + 86
    assert triton_backend._tune_bucket(197, torch.empty(1)) == triton_backend._tune_bucket(256, torch.empty(1))
    assert triton_backend._tune_bucket(257, torch.empty(1)) == 512 * 1000  # CPU (interpreter): no capability


def test_deterministic_mode_uses_fixed_configs(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the GPU path launches one fixed config per
    kernel and dtype (the autotuner's pick could differ between processes and with it dλ's
    rounding); otherwise it autotunes. Overrides and the interpreter still come first."""
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert triton_backend._meta("gemm", torch.float32) is None
        torch.use_deterministic_algorithms(True)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for kind, table in (("gemm", triton_backend.DETERMINISTIC_GEMM), ("wgrad", triton_backend.DETERMINISTIC_WGRAD)):
                meta = triton_backend._meta(kind, dtype)
                config = table[dtype]
                assert meta == dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        with triton_backend.config_override(gemm=CONFIGS[0][1]):
            assert triton_backend._meta("gemm", torch.float32) == CONFIGS[0][1]
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ------------------------------------------------------------------ how many launches wgrad makes

_NO_LAUNCH = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
              torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
              torch.ops.aten.empty_like.default}


class _Launches(TorchDispatchMode):
    """Device work a call issues: Triton launches (through ``count_triton``) and every aten op that
    is neither a view nor an uninitialized allocation (fills, reductions, casts, copies), outside
    the Triton launches (the interpreter copies argument storages with aten ops)."""

    def __init__(self):
        super().__init__()
        self.log = []
        self._in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_triton and not func.is_view and func not in _NO_LAUNCH:
            self.log.append(str(func))
        return func(*args, **(kwargs or {}))

    def count_triton(self, monkeypatch, name):
        probe, fn = self, getattr(triton_backend, name)

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    probe.log.append(name)
                    probe._in_triton += 1
                    try:
                        return fn[grid](*args, **kwargs)
                    finally:
                        probe._in_triton -= 1
                return launch

            def __getattr__(self, attr):  # best_config, configs of an autotuner
                return getattr(fn, attr)

        monkeypatch.setattr(triton_backend, name, Counted())


@pytest.fixture
def launches(monkeypatch):
    probe = _Launches()
    for name in ("_wgrad_kernel", "_wgrad_tuned", "_finalize_kernel", "_merged_gemm_kernel"):
        probe.count_triton(monkeypatch, name)
    return probe


def test_launch_probe_counts_torch_work(launches):
    """The probe is able to fail: the reference wgrad and wgrad's db-only path are torch ops."""
    dy, x, a, s = _wgrad_inputs(6, 40, 24, torch.bfloat16, per_channel=False)
    launches.log.clear()
    with launches:
        reference_backend.wgrad(dy, x, a, s, True, True, True, True)
    assert len(launches.log) >= 4, launches.log
    launches.log.clear()
    with launches:
        triton_backend.wgrad(dy, x, a, s, False, False, False, True)  # Σ dy in fp32, cast to bf16
    assert len(launches.log) == 2 and "_wgrad_kernel" not in launches.log, launches.log


@pytest.mark.parametrize("per_channel", [False, True], ids=["lam1", "lamN"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flags", [
    (True, True, True, True),     # full fine-tuning
    (True, False, True, False),   # aux frozen, no bias
    (False, True, False, False),  # only dW': no finalize
    (False, False, True, True),   # linear probing: λ and b (split over M below)
])
def test_wgrad_launch_count(flags, scale_dtype, per_channel, launches):
    """wgrad is the wgrad kernel plus one finalize launch when dλ or db is wanted; nothing else
    (no zero-fill, no torch sums or casts). Before the finalize kernel: 4-7 launches."""
    dy, x, a, s = _wgrad_inputs(6, 40, 24, torch.bfloat16, per_channel, scale_dtype)
    for split in (1, 3):
        launches.log.clear()
        with triton_backend.config_override(wgrad=CONFIGS[0][2], split_m=split):
            with launches:
                got = triton_backend.wgrad(dy, x, a, s, *flags)
        want = ["_wgrad_kernel"] + (["_finalize_kernel"] if flags[2] or flags[3] else [])
        assert launches.log == want, launches.log
        assert [g is not None for g in got] == list(flags)


def test_wgrad_launch_count_autotuned(monkeypatch, launches):
    """The GPU launch path (autotuner, here with a fake timer): after the first call has tuned,
    a call is one autotuned wgrad launch and one finalize launch."""
    import triton

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        return [1.0] * 3

    tuned = triton_backend.autotuned(triton_backend._wgrad_kernel,
                                     [triton.Config(_wg(16, 16, 16)), triton.Config(_wg(16, 32, 16))],
                                     do_bench=fake_bench)
    monkeypatch.setattr(triton_backend, "_wgrad_tuned", tuned)
    launches.count_triton(monkeypatch, "_wgrad_tuned")
    monkeypatch.setattr(triton_backend, "_meta", lambda kind, dtype: None)
    dy, x, a, s = _wgrad_inputs(6, 40, 24, torch.float16, per_channel=False)
    triton_backend.wgrad(dy, x, a, s, True, True, True, True)  # tunes
    launches.log.clear()  # (Triton launches are logged with or without the mode entered)
    with launches:
        triton_backend.wgrad(dy, x, a, s, True, True, True, True)
    assert launches.log == ["_wgrad_tuned", "_finalize_kernel"], launches.log


# ------------------------------------------------------------------ what the launchers allocate


class _Allocations(TorchDispatchMode):
    """Every tensor an aten op creates with fresh, non-empty storage (views and in-place ops, e.g.
    the interpreter's set_/copy_ of argument storages, share their inputs' storage and are skipped)."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0 \
                    and t.untyped_storage().data_ptr() not in seen:
                self.created.append((str(func), t))
        return out

    def weight_sized(self, numel):
        return [(f, tuple(t.shape)) for f, t in self.created if t.numel() >= numel]


def _alloc_inputs(dtype=torch.float32):
    m, n, k = 6, 24, 40  # M < N, K: only weight-shaped tensors reach N·K elements
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype)
    a = torch.randn(n, k, device=DEVICE, dtype=dtype)
    s = torch.randn(n, device=DEVICE)
    b = torch.randn(n, device=DEVICE, dtype=dtype)
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    return x, w, a, s, b, dy


def test_allocation_probe_sees_the_reference_merge():
    """The probe is able to fail: the reference backend forms W + λW' (weight-sized) in forward."""
    x, w, a, s, b, dy = _alloc_inputs()
    with _Allocations() as probe:
        reference_backend.forward(x, w, a, s, b)
    assert probe.weight_sized(w.numel()), probe.created


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("swap", [False, True])
def test_forward_and_dgrad_allocate_only_their_output(dtype, swap):
    x, w, a, s, b, dy = _alloc_inputs(dtype)
    with triton_backend.config_override(gemm=_gemm(16, 16, 16, swap)):
        with _Allocations() as probe:
            y = triton_backend.forward(x, w, a, s, b)
        assert [t.data_ptr() for _, t in probe.created] == [y.data_ptr()], probe.created
        with _Allocations() as probe:
            dx = triton_backend.dgrad(dy, w, a, s)
        assert [t.data_ptr() for _, t in probe.created] == [dx.data_ptr()], probe.created


@pytest.mark.parametrize("flags", [
    (True, True, True, True),     # full fine-tuning
    (True, False, True, True),    # aux frozen
    (False, True, False, False),  # only dW'
    (False, False, True, True),   # linear probing: λ and b
    (False, False, True, False),  # λ only
])
@pytest.mark.parametrize("split_m", [1, 3])
def test_wgrad_allocates_only_requested_gradients(flags, split_m):
    x, w, a, s, b, dy = _alloc_inputs()
    with triton_backend.config_override(gemm=CONFIGS[0][1], wgrad=CONFIGS[0][2], split_m=split_m):
        with _Allocations() as probe:
            grads = triton_backend.wgrad(dy, x, a, s, *flags)
    for g, flag in zip(grads, flags):
        assert (g is not None) == flag
    big = {t.data_ptr() for _, t in probe.created if t.numel() >= w.numel()}
    assert big == {g.data_ptr() for g in grads[:2] if g is not None}, probe.weight_sized(w.numel())
    want = reference_backend.wgrad(dy.double(), x.double(), a.double(), s.double(), *flags)
    for g, r in zip(grads, want):
        if g is not None:
            assert rel_err(g, r) < 1e-4


def test_autotuned_launch_path(monkeypatch):
    """The GPU path (autotuner picks the config) run under the interpreter with a fake timer that
    prefers the last config: the swapped GEMM and the larger BLOCK_K wgrad, benchmarked after a
    smaller BLOCK_K config has filled more rows of the dλ partials."""
    import triton

    calls = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        calls.append(1)
        return [100.0 - len(calls)] * 3

    gemm_configs = [triton.Config(_gemm(16, 16, 16, False)), triton.Config(_gemm(16, 32, 16, True))]
    wgrad_configs = [triton.Config(_wg(16, 16, 16)), triton.Config(_wg(16, 32, 16))]
    gemm = triton_backend.autotuned(triton_backend._merged_gemm_kernel, gemm_configs, do_bench=fake_bench)
    wgrad = triton_backend.autotuned(triton_backend._wgrad_kernel, wgrad_configs, do_bench=fake_bench)
    monkeypatch.setattr(triton_backend, "_gemm_tuned", gemm)
    monkeypatch.setattr(triton_backend, "_wgrad_tuned", wgrad)
    monkeypatch.setattr(triton_backend, "_meta", lambda kind, dtype: None)
    for weight_trainable in (True, False):  # full wgrad, then the λ-only variant
        inputs = make_inputs((2, 19), 70, 37, torch.float16, per_channel=True,
                             weight_trainable=weight_trainable, aux_trainable=weight_trainable)
        check_against_reference(inputs, torch.float16)
    assert gemm.best_config.kwargs["SWAP_AB"] and wgrad.best_config.kwargs["BLOCK_K"] == 32
    assert len(calls) >= 8, "the fake timer was not used: nothing was autotuned"


# ------------------------------------------------------------------ GPU compilation, without a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU tests compile the kernels for real; "
                    "this ahead-of-time check uses triton's internal compile API, which changes between versions")
def test_kernels_compile_for_hopper_and_ampere():
    """The interpreter never runs triton's compiler: compile the kernels (both orientations, the
    λ-only variant, bf16 / fp32 TF32 / fp32 IEEE, the finalize kernel for λ [1] and [N]) for sm_90
    and sm_80 ahead of time, in a
    subprocess with the interpreter off, and check Hopper gets wgmma with the merged weight as the
    register operand under SWAP_AB."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("ok ") == 12 + 20, done.stdout


def _compile_ahead_of_time():
    """Run as a script (see the test above): compile for GPU targets with no GPU present."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from m2pt_kernels.ops import cross_modal_linear_triton as tb

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def compile_for(fn, values, config, cap):
        # the runtime's specialization: ints equal to 1 become constants, multiples of 16 and
        # (fresh) tensors are marked 16-divisible
        signature, constants, attrs = {}, dict(config.kwargs), {}
        for i, name in enumerate(fn.arg_names):
            value = constants.get(name, values.get(name))
            if name in constants or isinstance(value, (bool, str)) or value == 1:
                signature[name], constants[name] = "constexpr", value
            elif isinstance(value, torch.dtype):
                signature[name], attrs[(i,)] = "*" + types[value], [["tt.divisibility", 16]]
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return triton.compile(ASTSource(fn, signature, constants, attrs),
                              target=GPUTarget("cuda", cap, 64 if cap >= 90 else 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))

    def gemm(dtype, lam_on_r, precision, m=1576, n=3072, k=768):
        nc, r = (k, n) if lam_on_r else (n, k)
        wr, wc = (k, 1) if lam_on_r else (1, k)
        return dict(a_ptr=dtype, w_ptr=dtype, aux_ptr=dtype, lam_ptr=torch.float32, bias_ptr=dtype, c_ptr=dtype,
                    M=m, NC=nc, R=r, stride_am=r, stride_ar=1, stride_wr=wr, stride_wc=wc, stride_ur=wr,
                    stride_uc=wc, stride_lam=1, stride_bias=0 if lam_on_r else 1, stride_cm=nc, stride_cc=1,
                    M_BUCKET=2048, LAM_ON_R=lam_on_r, HAS_BIAS=not lam_on_r, PRECISION=precision, UPCAST=False)

    def wgrad(dtype, need_w, precision, m=1576, n=3072, k=768):
        return dict(dy_ptr=dtype, x_ptr=dtype, aux_ptr=dtype, lam_ptr=torch.float32, dw_ptr=dtype, daux_ptr=dtype,
                    dlam_part_ptr=torch.float32, db_part_ptr=torch.float32, M=m, N=n, K=k, stride_dym=n,
                    stride_dyn=1, stride_xm=k, stride_xk=1, stride_un=k, stride_uk=1, stride_lam=1,
                    stride_part_split=12 * n, SPLIT_M=1 if need_w else 4, M_BUCKET=2048, NEED_W=need_w,
                    NEED_AUX=need_w, NEED_SCALE=True, NEED_BIAS=True, SCALAR_LAM=not need_w,
                    PRECISION=precision, UPCAST=False)

    def finalize(out_dtype, scale_dtype, scalar, split, bias=True, n=768, k_tiles=48):
        return dict(dlam_part_ptr=torch.float32, db_part_ptr=torch.float32, dscale_ptr=scale_dtype,
                    db_ptr=out_dtype, N=n, SPLIT_M=split, K_TILES=k_tiles, N_TILES=n // 128,
                    stride_part_split=k_tiles * n,
                    NEED_SCALE=True, NEED_BIAS=bias, SCALAR_LAM=scalar)

    finalize_meta = dict(tb.FINALIZE_META)
    finalize_config = triton.Config(finalize_meta, num_warps=finalize_meta.pop("num_warps"), num_stages=1)
    plain, swapped = tb.GEMM_CONFIGS[0], tb.GEMM_CONFIGS[6]
    assert not plain.kwargs["SWAP_AB"] and swapped.kwargs["SWAP_AB"]
    jobs = [  # (cap, kernel, values, config, expect the merged operand in registers)
        (90, tb._merged_gemm_kernel, gemm(torch.bfloat16, False, "tf32"), plain, False),
        (90, tb._merged_gemm_kernel, gemm(torch.bfloat16, False, "tf32"), swapped, True),
        (90, tb._merged_gemm_kernel, gemm(torch.float16, True, "tf32"), swapped, True),
        (90, tb._merged_gemm_kernel, gemm(torch.float32, True, "ieee"), tb.GEMM_CONFIGS[2], None),
        (90, tb._wgrad_kernel, wgrad(torch.bfloat16, True, "tf32"), tb.WGRAD_CONFIGS[0], None),
        (90, tb._wgrad_kernel, wgrad(torch.float32, False, "tf32"), tb.WGRAD_CONFIGS[2], None),
        (80, tb._merged_gemm_kernel, gemm(torch.bfloat16, False, "tf32"), plain, None),
        (80, tb._merged_gemm_kernel, gemm(torch.float32, True, "tf32"), swapped, None),
        (80, tb._wgrad_kernel, wgrad(torch.float16, False, "tf32"), tb.WGRAD_CONFIGS[2], None),
        (90, tb._finalize_kernel, finalize(torch.bfloat16, torch.float32, True, 1), finalize_config, None),
        (90, tb._finalize_kernel, finalize(torch.bfloat16, torch.bfloat16, False, 4, bias=False), finalize_config,
         None),
        (80, tb._finalize_kernel, finalize(torch.float16, torch.bfloat16, True, 3), finalize_config, None),
    ]
    for cap, fn, values, config, merged_in_registers in jobs:
        kernel = compile_for(fn, values, config, cap)
        ttgir = kernel.asm["ttgir"]
        if cap >= 90 and values.get("PRECISION", "ieee") != "ieee":  # (the finalize kernel has no dot)
            assert "ttng.warp_group_dot " in ttgir, "no wgmma on sm_90"
        if merged_in_registers is not None:  # the left wgmma operand: registers (tensor) or smem (memdesc)
            dots = [line.split("} : ", 1)[1] for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
            assert dots and all(d.startswith("tensor<") == merged_in_registers for d in dots), (config, dots)
        print(f"ok sm_{cap} {fn.__name__} {config} shared={kernel.metadata.shared}", flush=True)

    # The deterministic configs (and the fp32 fallbacks) must fit every sm_80+ GPU's shared memory,
    # sm_86 / sm_89's 99 KiB included; and the pruning's estimate must be a lower bound.
    limit = {80: 166912, 86: 101376, 90: 232448}
    fits = []
    for cap in (86, 80):
        for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "tf32")):
            for lam_on_r in (False, True):
                fits.append((cap, tb._merged_gemm_kernel, "gemm", gemm(dtype, lam_on_r, precision),
                             tb.DETERMINISTIC_GEMM[dtype]))
            fits.append((cap, tb._wgrad_kernel, "wgrad", wgrad(dtype, True, precision), tb.DETERMINISTIC_WGRAD[dtype]))
        fits.append((cap, tb._merged_gemm_kernel, "gemm", gemm(torch.float32, False, "ieee"), tb.GEMM_CONFIGS[-1]))
    for cap, fn, kind, values, config in fits:
        shared = compile_for(fn, values, config, cap).metadata.shared
        elem = 4 if values[fn.arg_names[0]] == torch.float32 else 2
        assert tb.smem_lower_bound(kind, config, elem) <= shared <= limit[cap], (cap, fn.__name__, config, shared)
        print(f"ok fits sm_{cap} {fn.__name__} {values['PRECISION']} {config} shared={shared}", flush=True)


if __name__ == "__main__":
    _compile_ahead_of_time()


def test_autotuner_times_configs_briefly(monkeypatch):
    """The autotuned launchers time each config with 5 + 20 ms (triton's default, 25 + 100 ms, makes
    a new shape's 35 configs cost seconds of scarce GPU time); the timer is triton's do_bench."""
    import triton.testing
    seen = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: seen.append(kw) or [1.0, 1.0, 1.0])
    for tuned in (triton_backend._gemm_tuned, triton_backend._wgrad_tuned):
        assert tuned.do_bench is triton_backend._tune_bench
        assert tuned.do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0, 1.0, 1.0]
    assert seen == [dict(warmup=5, rep=20, quantiles=(0.5, 0.2, 0.8))] * 2
