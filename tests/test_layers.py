"""FusedCrossModalLinear: the drop-in layer against float64 math, the paper's layer, the eval cache."""
import contextlib
import copy
import importlib
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import m2pt_kernels
from m2pt_kernels import FusedCrossModalLinear, use_backend
from m2pt_kernels.baselines import PaperCrossModalReparamLinear

from helpers import linear_math, rel_err

IN, OUT = 33, 17  # not multiples of any tile


def make_layer(bias=True, per_channel=False, aux_trainable=True, dtype=torch.float32, lam=None):
    lin = nn.Linear(IN, OUT, bias=bias, dtype=dtype)
    aux = nn.Linear(IN, OUT, bias=True, dtype=dtype)
    layer = FusedCrossModalLinear.from_linear(lin, aux, aux_trainable=aux_trainable, per_channel_scale=per_channel)
    if lam is not None:
        with torch.no_grad():
            layer.cross_modal_scale.copy_(lam)
    return lin, aux, layer


def ref64(layer, x):
    return linear_math(*(t.detach().double() if t is not None else None for t in
                         (x, layer.weight, layer.aux_weight, layer.cross_modal_scale, layer.bias)))


def test_not_an_nn_linear_but_looks_like_one():
    lin, aux, layer = make_layer()
    assert not isinstance(layer, nn.Linear)
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.weight is lin.weight and layer.bias is lin.bias  # Parameters reused: optimizers stay valid
    assert layer.aux_weight is not aux.weight
    assert layer.aux_weight.data_ptr() != aux.weight.data_ptr()  # copied, never aliased
    assert layer.cross_modal_scale.shape == (1,) and layer.cross_modal_scale.dtype == torch.float32
    r = repr(layer)
    assert "in_features=33" in r and "out_features=17" in r and "aux=trainable" in r and "scale=0" in r


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_identity_at_lambda_zero(bias, per_channel):
    lin, _, layer = make_layer(bias=bias, per_channel=per_channel)
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("aux_trainable", [True, False])
def test_forward_and_gradients_against_float64(bias, per_channel, aux_trainable):
    lam = torch.randn(OUT if per_channel else 1)
    _, _, layer = make_layer(bias=bias, per_channel=per_channel, aux_trainable=aux_trainable, lam=lam)
    x = torch.randn(4, 7, IN, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = {"x": x, "weight": layer.weight, "aux_weight": layer.aux_weight,
              "cross_modal_scale": layer.cross_modal_scale, "bias": layer.bias}
    ref = {k: v.detach().double().requires_grad_(v.requires_grad) if v is not None else None
           for k, v in leaves.items()}
    y_ref = F.linear(ref["x"], ref["weight"] + ref["cross_modal_scale"].view(-1, 1) * ref["aux_weight"], ref["bias"])
    y_ref.backward(dy.double())
    assert rel_err(y, y_ref) < 1e-4
    for k, v in leaves.items():
        if v is None:
            continue
        if not v.requires_grad:
            assert v.grad is None, k
            continue
        assert v.grad is not None and v.grad.shape == v.shape and v.grad.dtype == v.dtype, k
        assert rel_err(v.grad, ref[k].grad) < 1e-4, k


def test_frozen_aux_is_a_saved_buffer_not_a_parameter():
    _, _, layer = make_layer(aux_trainable=False)
    assert "aux_weight" in dict(layer.named_buffers())
    assert "aux_weight" not in dict(layer.named_parameters())
    assert set(layer.state_dict()) == {"weight", "bias", "aux_weight", "cross_modal_scale"}
    assert "frozen" in repr(layer)
    _, _, layer = make_layer(aux_trainable=True)
    assert "aux_weight" in dict(layer.named_parameters())


def test_training_moves_lambda_and_leaves_aux_model_untouched():
    lin, aux, layer = make_layer()
    before = {k: v.clone() for k, v in aux.state_dict().items()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(8, IN)
        loss = (layer(x) - torch.randn(8, OUT)).pow(2).mean()
        loss.backward()
        opt.step()
    assert layer.cross_modal_scale.abs().item() > 0
    assert not torch.equal(layer.aux_weight.detach(), before["weight"])  # W' trained (a copy) ...
    for k, v in aux.state_dict().items():  # ... but the auxiliary model itself is untouched
        assert torch.equal(v, before[k]), k
    assert aux.weight.grad is None


def test_constructor_aux_weight_and_zero_default():
    w_aux = torch.randn(OUT, IN, dtype=torch.float64)
    layer = FusedCrossModalLinear(IN, OUT, aux_weight=w_aux, scale_init=0.5, per_channel_scale=True)
    assert layer.aux_weight.dtype == torch.float32 and torch.equal(layer.aux_weight.detach(), w_aux.float())
    assert layer.cross_modal_scale.shape == (OUT,) and torch.all(layer.cross_modal_scale == 0.5)
    empty = FusedCrossModalLinear(IN, OUT, bias=False, aux_trainable=False, per_channel_scale=True)
    assert torch.equal(empty.aux_weight, torch.zeros(OUT, IN)) and empty.bias is None
    empty.load_state_dict(layer.state_dict(), strict=False)
    assert torch.equal(empty.aux_weight, layer.aux_weight.detach())


def test_from_linear_accepts_tensor_and_casts_to_target():
    lin = nn.Linear(IN, OUT, dtype=torch.bfloat16)
    aux = torch.randn(OUT, IN, dtype=torch.float64)
    layer = FusedCrossModalLinear.from_linear(lin, aux)
    assert layer.aux_weight.dtype == torch.bfloat16 and layer.cross_modal_scale.dtype == torch.float32
    assert aux.dtype == torch.float64  # the source is not changed


def test_bad_inputs_name_the_problem():
    lin = nn.Linear(IN, OUT)
    with pytest.raises(ValueError, match=r"\[17, 33\].*\[17, 32\]"):
        FusedCrossModalLinear.from_linear(lin, nn.Linear(32, OUT))
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedCrossModalLinear.from_linear(nn.Conv2d(3, 3, 1), lin)
    with pytest.raises(TypeError, match="torch.Tensor or an nn.Linear"):
        FusedCrossModalLinear.from_linear(lin, [1, 2])
    _, _, layer = make_layer()
    with pytest.raises(ValueError, match="already has a pathway"):
        FusedCrossModalLinear.from_linear(layer, lin)
    with pytest.raises(ValueError, match="last dim"):
        layer(torch.randn(2, IN + 1))
    with torch.no_grad(), pytest.raises(TypeError, match="x is float64 but weight is float32"):
        layer(torch.randn(2, IN, dtype=torch.float64))
    # the eval path under autocast checks its inputs too (it used to reach F.linear's own errors)
    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="FusedCrossModalLinear: x has shape .* last dim"):
            layer(torch.randn(2, IN + 1))
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got int64"):
            layer(torch.ones(2, IN, dtype=torch.int64))
        assert layer(torch.randn(2, IN, dtype=torch.float16)).dtype == torch.bfloat16  # autocast casts x
        x8 = torch.randn(2, IN).to(torch.float8_e4m3fn)  # autocast casts float8 too, as the training path does
        assert rel_err(layer(x8), ref64(layer, x8.float())) < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(layer.train()(x8), ref64(layer, x8.float())) < 2e-2
    layer.eval()
    with pytest.raises(TypeError, match="x is float8_e4m3fn; the op computes"):
        layer(torch.randn(2, IN).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("parametrization", ["weight_norm", "spectral_norm_bias"])
def test_from_linear_refuses_a_computed_weight(parametrization):
    """A parametrized W would be snapshotted into a new leaf: its originals (in the user's optimizer)
    would silently stop training."""
    lin = nn.Linear(IN, OUT)
    if parametrization == "weight_norm":
        lin = nn.utils.parametrizations.weight_norm(lin)
        what = "weight"
    else:
        torch.nn.utils.parametrize.register_parametrization(lin, "bias", nn.Identity())
        what = "bias"
    with pytest.raises(TypeError, match=rf"ParametrizedLinear\.{what} is computed on every call.*"
                                        rf"remove_parametrizations\(module, '{what}'\)"):
        FusedCrossModalLinear.from_linear(lin, torch.randn(OUT, IN))


def test_from_linear_refuses_a_pruned_weight_naming_prune_remove():
    from torch.nn.utils import prune
    lin = prune.l1_unstructured(nn.Linear(IN, OUT), "weight", amount=0.5)
    with pytest.raises(TypeError, match=r"Linear\.weight is computed on every call.*torch\.nn\.utils\.prune\.remove"
                                        r"\(module, 'weight'\)"):
        FusedCrossModalLinear.from_linear(lin, torch.randn(OUT, IN))


def test_meta_target_with_real_aux_and_meta_aux_are_refused():
    """A meta target keeps W' on meta: a real auxiliary weight would be dropped (after to_empty W' held
    uninitialized memory); a meta auxiliary weight holds no values (torch said 'Cannot copy out of meta tensor')."""
    real, meta = torch.ones(OUT, IN), torch.ones(OUT, IN, device="meta")
    lin_meta = nn.Linear(IN, OUT, device="meta")
    for make in (lambda: FusedCrossModalLinear.from_linear(lin_meta, real),
                 lambda: FusedCrossModalLinear.from_linear(lin_meta, nn.Linear(IN, OUT)),
                 lambda: FusedCrossModalLinear(IN, OUT, aux_weight=real, device="meta")):
        with pytest.raises(ValueError, match=r"target weight is on the meta device but .* holds values.*"
                                             r"Materialize the target first.*build both on meta"):
            make()
    for make in (lambda: FusedCrossModalLinear.from_linear(nn.Linear(IN, OUT), meta),
                 lambda: FusedCrossModalLinear.from_linear(nn.Linear(IN, OUT), nn.Linear(IN, OUT, device="meta")),
                 lambda: FusedCrossModalLinear(IN, OUT, aux_weight=meta)):
        with pytest.raises(ValueError, match=r"is on the meta device: it holds no values.*Load the auxiliary"):
            make()
    # both on meta: shapes only, the pathways come from a checkpoint later
    assert FusedCrossModalLinear.from_linear(lin_meta, meta).aux_weight.is_meta
    assert FusedCrossModalLinear(IN, OUT, aux_weight=meta, device="meta").aux_weight.is_meta


def test_from_linear_needs_an_nn_linear_and_a_plain_aux():
    class Conv1D(nn.Module):  # Hugging Face GPT-2's layer: weight [in, out], transposed
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(IN, IN))

    for linear in (nn.Embedding(OUT, IN), Conv1D()):
        with pytest.raises(TypeError, match=rf"from_linear: linear must be an nn.Linear .*got {type(linear).__name__}"):
            FusedCrossModalLinear.from_linear(linear, torch.zeros(linear.weight.shape))

    class MyLinear(nn.Linear):
        pass

    assert FusedCrossModalLinear.from_linear(MyLinear(IN, OUT), torch.zeros(OUT, IN)).in_features == IN
    for aux in (nn.ReLU(), nn.Embedding(IN, OUT)):  # no weight; a 2-D weight of another layout
        with pytest.raises(TypeError, match=rf"aux must be an nn.Linear \(or its weight tensor\), got {type(aux).__name__}"):
            FusedCrossModalLinear.from_linear(nn.Linear(IN, OUT), aux)
    paper = PaperCrossModalReparamLinear(IN, OUT, aux_weight=torch.ones(OUT, IN))
    ours = FusedCrossModalLinear(IN, OUT, aux_weight=torch.ones(OUT, IN), scale_init=1.0)
    for aux in (ours, paper):  # its weight alone is not W + λ·W'
        with pytest.raises(ValueError, match=rf"aux \({type(aux).__name__}\) has a pathway itself.*Merge it first"):
            FusedCrossModalLinear.from_linear(nn.Linear(IN, OUT), aux)
    with pytest.raises(ValueError, match="already has a pathway.*merge it first"):  # an nn.Linear with a pathway
        FusedCrossModalLinear.from_linear(paper, torch.zeros(OUT, IN))


def test_constructor_checks_sizes_bias_and_aux_weight():
    """int(2.7) built a layer of size 2, bias='False' built a bias, -1 reached torch.empty; aux_weight=nn.Linear
    was told 'a torch.Tensor or an nn.Linear'. Integer-like sizes and bool-like flags are still accepted."""
    for kwargs, error, match in [
        ({"in_features": 2.7}, TypeError, r"in_features must be a non-negative integer, got 2.7 \(float\)"),
        ({"in_features": "4"}, TypeError, r"in_features must be a non-negative integer, got '4' \(str\)"),
        ({"out_features": True}, TypeError, r"out_features must be a non-negative integer, got True"),
        ({"out_features": -1}, ValueError, r"out_features must be a non-negative integer, got -1"),
        ({"bias": "False"}, TypeError, r"bias must be True or False, got 'False' \(str\)"),
        ({"aux_weight": nn.Linear(IN, OUT)}, TypeError,
         r"aux_weight must be a torch.Tensor \(use FusedCrossModalLinear.from_linear\(linear, aux_linear\) for a "
         r"module\), got Linear"),
        ({"aux_weight": [[0.0] * IN] * OUT}, TypeError, r"aux_weight must be a torch.Tensor \(use .*got list"),
    ]:
        args = {"in_features": IN, "out_features": OUT, **kwargs}
        with pytest.raises(error, match=rf"^FusedCrossModalLinear: {match}"):
            FusedCrossModalLinear(args.pop("in_features"), args.pop("out_features"), **args)
    np = pytest.importorskip("numpy")
    layer = FusedCrossModalLinear(np.int64(IN), np.int32(OUT), bias=np.bool_(False))
    assert (layer.in_features, layer.out_features) == (IN, OUT) and type(layer.in_features) is int
    assert layer.bias is None and FusedCrossModalLinear(IN, OUT, bias=torch.tensor(True)).bias is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: initializing zero-element tensors is a no-op
        assert FusedCrossModalLinear(0, OUT, bias=1).weight.shape == (OUT, 0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_constructor_and_from_linear_refuse_a_non_finite_aux(bad):
    """0·inf is NaN: the layer computed NaN from its first step even at λ = 0."""
    aux = torch.randn(OUT, IN)
    aux[3, 4] = bad
    with pytest.raises(ValueError, match=r"^FusedCrossModalLinear: aux_weight has 1 non-finite value"):
        FusedCrossModalLinear(IN, OUT, aux_weight=aux)
    for a in (aux, nn.Linear(IN, OUT)):
        if isinstance(a, nn.Module):
            with torch.no_grad():
                a.weight[0, 0] = bad
        with pytest.raises(ValueError, match=r"^FusedCrossModalLinear.from_linear: the auxiliary weight has 1 "
                                             r"non-finite value"):
            FusedCrossModalLinear.from_linear(nn.Linear(IN, OUT), a)


# ---------------------------------------------------------------------------- merge
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_merge_is_exact(bias, per_channel):
    _, aux, layer = make_layer(bias=bias, per_channel=per_channel, lam=torch.randn(OUT if per_channel else 1))
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == layer.weight.dtype
    assert (merged.bias is None) == (not bias)
    if bias:  # the target's bias, never the auxiliary one; a copy
        assert torch.equal(merged.bias, layer.bias) and merged.bias is not layer.bias
    x = torch.randn(6, IN, dtype=torch.float64)
    assert rel_err(merged.double()(x), ref64(layer, x)) < 1e-6
    w_ref = (layer.weight.double() + layer.cross_modal_scale.double().view(-1, 1) * layer.aux_weight.double())
    assert torch.equal(merged.weight.detach(), w_ref.float())  # fp32 math on fp64-exact values: one rounding


def test_merge_bf16_is_computed_in_fp32_and_cast_once():
    _, _, layer = make_layer(dtype=torch.bfloat16, lam=torch.tensor([0.37]))
    merged = layer.merge()
    w32 = layer.weight.float() + 0.37 * layer.aux_weight.float()
    assert merged.weight.dtype == torch.bfloat16
    assert torch.equal(merged.weight.detach(), w32.to(torch.bfloat16))


def test_merged_state_dict_loads_into_plain_linear():
    _, _, layer = make_layer(lam=torch.tensor([0.8]))
    plain = nn.Linear(IN, OUT)
    plain.load_state_dict(layer.merge().state_dict(), strict=True)
    x = torch.randn(5, IN)
    assert rel_err(plain(x), ref64(layer, x)) < 1e-5


# ---------------------------------------------------------------------------- eval cache
def test_eval_uses_plain_gemm_and_caches(monkeypatch):
    _, _, layer = make_layer(lam=torch.tensor([0.3]))
    layer.eval()
    calls = []
    real = m2pt_kernels.layers.merged_weight

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(m2pt_kernels.layers, "merged_weight", counting)
    monkeypatch.setattr(m2pt_kernels.layers, "cross_modal_linear",
                        lambda *a, **k: pytest.fail("fused op called where no grad is needed"))
    x = torch.randn(4, IN)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert len(calls) == 1 and torch.equal(y1, y2)
    assert rel_err(y1, ref64(layer, x)) < 1e-5
    # x needing grad (e.g. saliency maps) with frozen layer params: still the plain GEMM, correct dx
    for p in layer.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    merged = layer.weight + 0.3 * layer.aux_weight
    assert rel_err(xg.grad, merged.sum(0).expand_as(xg)) < 1e-5


def _assert_fresh(layer, x):
    with torch.no_grad():
        y = layer(x)
    assert rel_err(y, ref64(layer, x)) < 1e-5


@pytest.mark.parametrize("what", ["weight", "aux_weight", "cross_modal_scale", "bias"])
@pytest.mark.parametrize("aux_trainable", [True, False])
def test_eval_cache_sees_in_place_updates(what, aux_trainable):
    _, _, layer = make_layer(aux_trainable=aux_trainable, lam=torch.tensor([0.5]))
    layer.eval()
    x = torch.randn(3, IN)
    _assert_fresh(layer, x)
    with torch.no_grad():
        getattr(layer, what).add_(0.25)
    _assert_fresh(layer, x)


def test_eval_cache_sees_optimizer_step_load_state_dict_and_to():
    _, _, layer = make_layer(lam=torch.tensor([0.5]))
    x = torch.randn(3, IN)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    for _ in range(2):
        layer.eval()
        _assert_fresh(layer, x)
        layer.train()
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    layer.eval()
    _assert_fresh(layer, x)
    _, _, other = make_layer(lam=torch.tensor([-1.5]))
    layer.load_state_dict(other.state_dict())
    _assert_fresh(layer, x)
    layer.to(torch.float64)
    _assert_fresh(layer, x.double())
    layer.float()
    _assert_fresh(layer, x)
    layer.weight = nn.Parameter(torch.randn(OUT, IN))  # a new tensor object
    _assert_fresh(layer, x)
    layer.cross_modal_scale.data = torch.tensor([2.0])  # new storage through .data: detected
    _assert_fresh(layer, x)
    layer.cross_modal_scale.data.fill_(3.0)  # in place through .data: documented, needs clear
    layer.clear_merged_cache()
    _assert_fresh(layer, x)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=True),
], ids=["adamw_fused", "sgd_fused", "adam_foreach"])
def test_eval_cache_sees_steps_of_fused_optimizers(make_opt):
    # fused optimizer kernels do not bump version counters: the cache also keys on optimizer steps
    _, _, layer = make_layer(lam=torch.tensor([0.5]))
    layer.eval()  # trained in eval mode: no train()/eval() switch clears the cache
    x = torch.randn(3, IN)
    opt = make_opt(list(layer.parameters()))
    for _ in range(2):
        _assert_fresh(layer, x)
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    _assert_fresh(layer, x)


def test_no_cache_kept_in_train_mode_or_when_disabled():
    _, _, layer = make_layer(lam=torch.tensor([0.5]))
    with torch.no_grad():
        layer(torch.randn(2, IN))
    assert layer._cache is None  # train mode: merged each call, nothing kept
    layer.eval()
    layer.cache_merged_weight = False
    with torch.no_grad():
        layer(torch.randn(2, IN))
    assert layer._cache is None


def test_fast_input_check_under_autocast_accepts_mixed_dtypes():
    """The eval path under autocast sees bf16 activations and fp32 weights on every layer after the first:
    the fast check must accept them (the full, error-reporting path costs several times more per call)."""
    check = importlib.import_module("m2pt_kernels.ops.cross_modal_linear")._valid_fast
    _, _, layer = make_layer()
    w, a, s, b = layer.weight, layer.aux_weight, layer.cross_modal_scale, layer.bias
    for x in (torch.randn(2, IN, dtype=torch.bfloat16), torch.randn(2, IN), torch.randn(2, IN).to(torch.float8_e5m2)):
        assert check(x, w, a, s, b, autocast=True)
    assert not check(torch.randn(2, IN, dtype=torch.bfloat16), w, a, s, b)  # without autocast: dtypes must agree
    for bad in (torch.randn(2, IN, dtype=torch.float64), torch.ones(2, IN, dtype=torch.int64), torch.randn(2, IN + 1)):
        assert not check(bad, w, a, s, b, autocast=True)
    assert not check(torch.randn(2, IN), w, a, s, b.double(), autocast=True)  # autocast leaves float64 alone


def test_layer_built_under_inference_mode_runs_in_eval():
    """Inference tensors track no version counter: the merged weight is not cached for them (it used to
    raise), and an in-place change inside inference_mode is seen on the next call."""
    with torch.inference_mode():
        layer = FusedCrossModalLinear(IN, OUT, aux_weight=torch.randn(OUT, IN), scale_init=0.5).eval()
        x = torch.randn(3, IN)
        assert rel_err(layer(x), ref64(layer, x)) < 1e-5
        layer.cross_modal_scale.fill_(-2.0)
        assert rel_err(layer(x), ref64(layer, x)) < 1e-5
    assert layer._cache is None
    with torch.no_grad():
        assert rel_err(layer(x), ref64(layer, x)) < 1e-5


def test_meta_device_layer_and_autocast():
    """Shape / FLOP counting on meta tensors, also under autocast (autocast has no meta device type)."""
    layer = FusedCrossModalLinear(IN, OUT, device="meta")
    x = torch.randn(4, IN, device="meta")
    with torch.no_grad():
        assert layer(x).shape == (4, OUT)
    half = FusedCrossModalLinear(IN, OUT, device="meta", dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = half(torch.randn(4, IN, device="meta", dtype=torch.bfloat16, requires_grad=True))
        y.sum().backward()
        with pytest.raises(ValueError, match="x on meta, weight on cpu"):
            make_layer()[2](x)
    assert y.shape == (4, OUT) and half.cross_modal_scale.grad.shape == (1,)


@pytest.mark.parametrize("per_channel", [False, True])
def test_reset_parameters_after_meta_construction(per_channel):
    """to_empty() + reset_parameters(), as for nn.Linear and FSDP2's meta init: λ comes back to
    scale_init and a W' built as zeros to zeros (they used to keep uninitialized memory)."""
    layer = FusedCrossModalLinear(IN, OUT, scale_init=0.25, per_channel_scale=per_channel, device="meta")
    assert "scale=per-channel" in repr(layer) if per_channel else "scale=[1] (meta)" in repr(layer)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in (layer.weight, layer.bias, layer.aux_weight, layer.cross_modal_scale):
            t.fill_(float("nan"))
    layer.reset_parameters()
    assert torch.all(layer.cross_modal_scale == 0.25) and torch.equal(layer.aux_weight.detach(), torch.zeros(OUT, IN))
    assert torch.isfinite(layer.weight).all() and layer.weight.abs().max() <= 1 / IN ** 0.5
    assert torch.isfinite(layer.bias).all()
    # a W' copied from an auxiliary model, or loaded into a layer built without one, is data: left alone
    _, aux, copied = make_layer()
    copied.reset_parameters()
    assert torch.equal(copied.aux_weight.detach(), aux.weight.detach()) and torch.all(copied.cross_modal_scale == 0)
    loaded = FusedCrossModalLinear(IN, OUT)
    loaded.load_state_dict(copied.state_dict())
    loaded.reset_parameters()
    assert torch.equal(loaded.aux_weight.detach(), aux.weight.detach())


def test_inference_mode_then_grad_mode():
    _, _, layer = make_layer(lam=torch.tensor([0.5]))
    layer.eval()
    x = torch.randn(3, IN)
    with torch.inference_mode():
        y = layer(x)
    assert rel_err(y, ref64(layer, x)) < 1e-5
    for p in layer.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()  # an inference tensor must not be saved for backward
    assert xg.grad is not None


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lambda_stays_fp32_under_casts(dtype):
    _, _, layer = make_layer(lam=torch.tensor([0.123456789]))
    layer.cross_modal_scale.grad = torch.tensor([0.987654321])
    layer.to(dtype)
    assert layer.weight.dtype == dtype and layer.aux_weight.dtype == dtype
    assert layer.cross_modal_scale.dtype == torch.float32
    assert layer.cross_modal_scale.item() == torch.tensor(0.123456789).item()  # no rounding through bf16
    assert layer.cross_modal_scale.grad.dtype == torch.float32
    layer.half().bfloat16()
    assert layer.cross_modal_scale.dtype == torch.float32
    layer.double()
    assert layer.cross_modal_scale.dtype == torch.float64
    seq = nn.Sequential(FusedCrossModalLinear(IN, OUT)).to(dtype)
    assert seq[0].cross_modal_scale.dtype == torch.float32


def test_lambda_stays_fp32_on_assign_loads_and_under_a_parametrization():
    layer = FusedCrossModalLinear(IN, OUT, scale_init=0.3)
    sd = {k: (v.bfloat16() if k == "cross_modal_scale" else v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd, assign=True)
    assert layer.cross_modal_scale.dtype == torch.float32 and isinstance(layer.cross_modal_scale, nn.Parameter)
    assert layer.cross_modal_scale.item() == torch.tensor(0.3).bfloat16().item()
    torch.nn.utils.parametrize.register_parametrization(layer, "cross_modal_scale", nn.Tanh())
    layer.half()
    assert layer.weight.dtype == torch.float16
    assert layer.parametrizations.cross_modal_scale.original.dtype == torch.float32


def test_scale_follows_casts_when_asked():
    """keep_scale_fp32 = False (FSDP2 over a model cast to bf16 needs one dtype per group)."""
    _, _, layer = make_layer(lam=torch.tensor([0.25]))
    layer.keep_scale_fp32 = False
    layer.to(torch.bfloat16)
    assert layer.cross_modal_scale.dtype == layer.weight.dtype == torch.bfloat16
    x = torch.randn(5, IN, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert layer.cross_modal_scale.grad.dtype == torch.bfloat16
    assert rel_err(layer(x), ref64(layer, x)) < 2e-2


@pytest.mark.parametrize("aux_trainable", [False, True])
def test_mixed_precision_parameters_with_a_frozen_aux_buffer(aux_trainable):
    """What FSDP2's MixedPrecisionPolicy(param_dtype=bf16) hands the forward: W, b, λ (and a trainable
    W') cast to bf16, a frozen W' (a buffer) left in fp32. The layer computes with W' in W's dtype."""
    _, _, layer = make_layer(aux_trainable=aux_trainable, lam=torch.tensor([0.6]))
    for name in ("weight", "bias", "cross_modal_scale") + (("aux_weight",) if aux_trainable else ()):
        layer._parameters[name] = nn.Parameter(layer._parameters[name].detach().bfloat16())
    assert (layer.aux_weight.dtype == torch.bfloat16) == aux_trainable
    x = torch.randn(2, 7, IN, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref64(layer, x)) < 2e-2
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16 and layer.cross_modal_scale.grad is not None
    layer.eval()
    with torch.no_grad():
        assert rel_err(layer(x), ref64(layer, x)) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_layer_against_float64(dtype):
    _, _, layer = make_layer(dtype=dtype, lam=torch.tensor([0.7]))
    x = torch.randn(5, IN, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and rel_err(y, ref64(layer, x)) < 2e-2
    y.float().sum().backward()
    assert layer.cross_modal_scale.grad.dtype == torch.float32
    layer.eval()
    with torch.no_grad():
        assert rel_err(layer(x), ref64(layer, x)) < 2e-2


def test_autocast_cpu_bf16():
    _, _, layer = make_layer(lam=torch.tensor([0.4]))
    x = torch.randn(4, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        layer.eval()
        with torch.no_grad():
            y_eval = layer(x)
    assert y.dtype == torch.bfloat16 and y_eval.dtype == torch.bfloat16
    assert rel_err(y, ref64(layer, x)) < 2e-2 and rel_err(y_eval, ref64(layer, x)) < 2e-2
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert layer.cross_modal_scale.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------- paper checkpoints
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("aux_trainable", [True, False])
def test_paper_checkpoint_round_trip(bias, aux_trainable):
    paper = PaperCrossModalReparamLinear(IN, OUT, bias=bias, aux_weight=torch.randn(OUT, IN),
                                         is_aux_trainable=aux_trainable)
    with torch.no_grad():
        paper.cross_modal_scale.fill_(0.6)
    ours = FusedCrossModalLinear(IN, OUT, bias=bias, aux_trainable=aux_trainable)
    ours.load_state_dict(paper.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(paper.state_dict())
    x = torch.randn(3, 4, IN)
    assert rel_err(ours(x), paper(x).double()) < 1e-5
    back = PaperCrossModalReparamLinear(IN, OUT, bias=bias, aux_weight=torch.zeros(OUT, IN))
    back.load_state_dict(ours.state_dict(), strict=True)
    assert rel_err(back(x), paper(x).double()) < 1e-6
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    again = FusedCrossModalLinear(IN, OUT, bias=bias, aux_trainable=aux_trainable)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again(x), ours(x))


def test_paper_layer_checks_its_arguments():
    """The paper's replica: a [1, 4] origin weight was broadcast into [3, 4]; a string flag, a list or an
    integer aux_weight failed with torch's internal errors."""
    with pytest.raises(ValueError, match=r"^PaperCrossModalReparamLinear: origin_layer's weight has shape \[1, 4\], "
                                         r"expected .*\[3, 4\]"):
        PaperCrossModalReparamLinear(4, 3, origin_layer=nn.Linear(4, 1))
    with pytest.raises(TypeError, match=r"origin_layer must be an nn.Linear .*got Embedding"):
        PaperCrossModalReparamLinear(4, 3, origin_layer=nn.Embedding(3, 4))
    with pytest.raises(TypeError, match=r"is_aux_trainable must be True or False, got 'False'"):
        PaperCrossModalReparamLinear(4, 3, is_aux_trainable="False")
    with pytest.raises(TypeError, match=r"aux_weight must be a torch.Tensor of shape \[3, 4\].*got list"):
        PaperCrossModalReparamLinear(4, 3, aux_weight=[[0.0] * 4] * 3)
    with pytest.raises(TypeError, match=r"aux_weight must be floating point, got int64"):
        PaperCrossModalReparamLinear(4, 3, aux_weight=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"aux_weight has shape \[4, 3\], expected \[3, 4\]"):
        PaperCrossModalReparamLinear(4, 3, aux_weight=torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"in_features must be a non-negative integer, got 2.7"):
        PaperCrossModalReparamLinear(2.7, 3)


def test_paper_layer_takes_the_origin_layers_bias():
    """With an origin layer the layer computes the origin's function at λ = 0: its bias when it has one
    (bias=False dropped it), none when it has none (bias=True kept a random one)."""
    x = torch.randn(5, 4)
    for bias in (True, False):
        for origin in (nn.Linear(4, 3), nn.Linear(4, 3, bias=False)):
            layer = PaperCrossModalReparamLinear(4, 3, bias=bias, origin_layer=origin)
            assert (layer.bias is not None) == (origin.bias is not None)
            torch.testing.assert_close(layer(x), origin(x), rtol=0, atol=0)
    # default keys, as the paper's checkpoints have them
    assert set(PaperCrossModalReparamLinear(4, 3).state_dict()) == {"weight", "bias", "aux_weight", "cross_modal_scale"}
    assert set(PaperCrossModalReparamLinear(4, 3, bias=False).state_dict()) == {"weight", "aux_weight",
                                                                                  "cross_modal_scale"}


def test_copy_and_pickle_with_cache():
    _, _, layer = make_layer(lam=torch.tensor([0.5]))
    layer.eval()
    x = torch.randn(2, IN)
    with torch.no_grad():
        layer(x)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.weight.add_(1.0)
        assert rel_err(clone(x), ref64(clone, x)) < 1e-5
    buf = io.BytesIO()
    torch.save(layer, buf)


class _Doubled(nn.Module):
    def forward(self, t):
        return 2 * t


@pytest.mark.parametrize("aux_trainable", [True, False])
@pytest.mark.parametrize("name", ["weight", "aux_weight", "cross_modal_scale", "bias"])
def test_forward_reads_parametrized_and_substituted_tensors(name, aux_trainable):
    """The forward reads W, W', λ, b from the module's dicts; whatever moves a name out of them
    (a parametrization, here of one tensor at a time) or swaps the tensors in them
    (functional_call) must still be honoured."""
    from torch.nn.utils import parametrize
    from torch.func import functional_call

    _, _, layer = make_layer(aux_trainable=aux_trainable, lam=torch.randn(1))
    x = torch.randn(3, IN)
    expect = ref64(layer, x)
    parametrize.register_parametrization(layer, name, _Doubled())
    y = layer(x)
    assert rel_err(y, ref64(layer, x)) < 1e-5  # ref64 reads layer.<name>: the parametrized tensor
    assert rel_err(y, expect) > 1e-2  # which changed the output

    _, _, layer = make_layer(aux_trainable=aux_trainable, lam=torch.randn(1))
    swapped = {"weight": torch.randn(OUT, IN), "aux_weight": torch.randn(OUT, IN),
               "cross_modal_scale": torch.randn(1), "bias": torch.randn(OUT)}
    y = functional_call(layer, swapped, (x,))
    expect = linear_math(x.double(), *(swapped[k].double() for k in ("weight", "aux_weight", "cross_modal_scale", "bias")))
    assert rel_err(y, expect) < 1e-5



@pytest.mark.parametrize("aux_trainable", [True, False])
def test_torch_func_grad_and_per_sample_grads_of_the_layer(aux_trainable):
    """``functional_call`` + ``torch.func.grad`` (meta-learning, influence functions) and
    ``vmap(grad(...))`` per-sample gradients (DP-SGD) through the layer, W' trainable or a buffer,
    against plain autograd on the layer."""
    from torch.func import functional_call, grad, vmap

    _, _, layer = make_layer(aux_trainable=aux_trainable, per_channel=True, lam=torch.randn(OUT))
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = dict(layer.named_buffers())
    x, dy = torch.randn(4, 3, IN), torch.randn(4, 3, OUT)

    def loss(p, xi, dyi):
        return (functional_call(layer, {**p, **buffers}, (xi,)) * dyi).sum()

    grads = grad(loss)(params, x, dy)
    (layer(x) * dy).sum().backward()
    assert set(grads) == {k for k, _ in layer.named_parameters()}
    for k, p in layer.named_parameters():
        assert rel_err(grads[k], p.grad) < 1e-5, k
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, dy)
    for i in range(4):
        layer.zero_grad(set_to_none=True)
        (layer(x[i]) * dy[i]).sum().backward()
        for k, p in layer.named_parameters():
            assert rel_err(per_sample[k][i], p.grad) < 1e-5, (i, k)


def test_vmap_model_ensemble_of_layers():
    """``stack_module_state`` + ``vmap`` over stacked layers, with and without gradients (the eval
    cache keys on data pointers, which batched tensors lack: it must not be used under vmap)."""
    from torch.func import functional_call, stack_module_state, vmap

    layers = [make_layer(lam=torch.randn(1))[2] for _ in range(3)]
    params, buffers = stack_module_state(layers)
    x = torch.randn(5, IN)
    call = lambda p, b, xx: functional_call(layers[0], {**p, **b}, (xx,))
    for grad_mode in (True, False):
        layers[0].train(grad_mode)
        with torch.set_grad_enabled(grad_mode):
            ys = vmap(call, in_dims=(0, 0, None))(params, buffers, x)
        for i, layer in enumerate(layers):
            assert rel_err(ys[i], ref64(layer, x)) < 1e-5, (grad_mode, i)

# ---------------------------------------------------------------------------- backends, compile, checkpointing
def test_triton_backend_small():
    if "triton" not in m2pt_kernels.available_backends():
        pytest.skip("triton backend not available here")
    try:
        importlib.import_module("m2pt_kernels.ops.cross_modal_linear_triton")
    except Exception as exc:  # the backend is written by another engineer
        pytest.skip(f"triton backend module not importable: {exc}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, _, layer = make_layer(per_channel=True, lam=torch.randn(OUT))
    layer.to(device)
    ref_layer = copy.deepcopy(layer)
    x = torch.randn(5, IN, device=device)
    dy = torch.randn(5, OUT, device=device)
    with use_backend("triton"):
        y = layer(x)
    y.backward(dy)
    with use_backend("reference"):
        y_ref = ref_layer(x)
    y_ref.backward(dy)
    assert rel_err(y, y_ref) < 1e-3
    for name in ("weight", "aux_weight", "cross_modal_scale", "bias"):
        assert rel_err(getattr(layer, name).grad, getattr(ref_layer, name).grad) < 1e-3, name


def test_non_reentrant_activation_checkpointing():
    _, _, layer = make_layer(lam=torch.tensor([0.3]))
    x = torch.randn(4, IN, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.weight, layer.cross_modal_scale, layer.aux_weight)]
    for t in (x, layer.weight, layer.cross_modal_scale, layer.aux_weight):
        t.grad = None
    layer(x).square().sum().backward()
    for g, t in zip(grads, (x, layer.weight, layer.cross_modal_scale, layer.aux_weight)):
        assert rel_err(g, t.grad) < 1e-6


@pytest.mark.slow
def test_compile_fullgraph_training_and_eval():
    _, _, layer = make_layer(lam=torch.tensor([0.3]))
    x = torch.randn(4, IN)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert rel_err(y, ref64(layer, x)) < 1e-5
    assert layer.cross_modal_scale.grad is not None
    layer.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), ref64(layer, x)) < 1e-5


@pytest.mark.parametrize("mode", ["train", "eval_warm_cache", "eval_no_grad"])
def test_jit_trace_follows_the_parameters(mode):
    """torch.jit.trace records W + λ·W' and F.linear on the parameters, never the eval cache nor the
    autograd Function (which a trace can't save): the trace passes its own check, saves, loads, and a
    new state_dict reaches it (a trace that baked the cached merged weight in as a constant ignored it)."""
    import warnings
    _, _, layer = make_layer(lam=torch.tensor([0.3]))
    model = nn.Sequential(layer, nn.GELU())
    x = torch.randn(2, 5, IN)
    if mode != "train":
        model.eval()
        with torch.no_grad():
            model(x)  # fills the merged-weight cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        with torch.no_grad() if mode == "eval_no_grad" else contextlib.nullcontext():
            traced = torch.jit.trace(model, x)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new)
    loaded.load_state_dict(new)
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < 1e-6
    if mode == "train":  # the traced graph trains: λ gets its gradient
        loaded(x).sum().backward()
        model(x).sum().backward()
        lam = dict(loaded.named_parameters())["0.cross_modal_scale"]
        assert rel_err(lam.grad, layer.cross_modal_scale.grad) < 1e-5


def test_jit_script_says_merge_first():
    _, _, layer = make_layer()
    for module in (layer, nn.Sequential(nn.Identity(), layer)):
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*merge_pathways"):
            torch.jit.script(module)
    x = torch.randn(3, IN)
    assert rel_err(torch.jit.script(layer.merge())(x), ref64(layer, x)) < 1e-5


def test_fx_symbolic_trace_names_the_leaf_module_remedy():
    _, _, layer = make_layer(lam=torch.tensor([0.3]))
    model = nn.Sequential(layer, nn.GELU())
    for mode in (model.train, model.eval):
        with pytest.raises(TypeError, match=r"torch\.fx Proxy.*leaf module.*register_notrace_module"):
            torch.fx.symbolic_trace(mode())

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, FusedCrossModalLinear) or super().is_leaf_module(m, qualname)

    gm = torch.fx.GraphModule(model, Tracer().trace(model))
    x = torch.randn(4, IN)
    with torch.no_grad():
        layer.cross_modal_scale.fill_(-0.7)  # the graph calls the module: it follows its parameters
        assert rel_err(gm(x), F.gelu(ref64(layer, x)).float()) < 1e-5


@pytest.mark.parametrize("option,value,error", [
    ("scale_init", float("nan"), ValueError), ("scale_init", float("inf"), ValueError),
    ("scale_init", "0.1", TypeError), ("aux_trainable", "False", TypeError), ("per_channel_scale", 2, TypeError)])
def test_bad_pathway_options_are_refused_everywhere(option, value, error):
    """A NaN / inf λ would make every output non-finite from the first step; a string flag would be
    true whatever it says. Each constructor names itself and the option; add_pathways checks a config
    changed after construction before it changes the model."""
    from m2pt_kernels.pathways import PathwayConfig
    lin, aux = nn.Linear(IN, OUT), nn.Linear(IN, OUT)
    with pytest.raises(error, match=rf"^FusedCrossModalLinear: {option}"):
        FusedCrossModalLinear(IN, OUT, **{option: value})
    with pytest.raises(error, match=rf"^FusedCrossModalLinear\.from_linear: {option}"):
        FusedCrossModalLinear.from_linear(lin, aux, **{option: value})
    with pytest.raises(error, match=rf"^PathwayConfig: {option}"):
        PathwayConfig(**{option: value})
    config = PathwayConfig(target_modules=["0"])
    setattr(config, option, value)
    model = nn.Sequential(lin)
    with pytest.raises(error, match=rf"^add_pathways: {option}"):
        m2pt_kernels.add_pathways(model, nn.Sequential(aux), config)
    assert model[0] is lin


def test_pathway_options_accept_numpy_and_torch_scalars():
    np = pytest.importorskip("numpy")
    layer = FusedCrossModalLinear(IN, OUT, aux_trainable=np.bool_(False), scale_init=np.float32(0.5),
                                  per_channel_scale=torch.tensor(True))
    assert not layer.aux_trainable and layer.per_channel_scale
    assert layer.cross_modal_scale.dtype == torch.float32 and torch.all(layer.cross_modal_scale == 0.5)
    # sizes as nn.Linear takes them (0-d integer tensors too), an integer tensor λ
    layer = FusedCrossModalLinear(torch.tensor(IN), np.int64(OUT), scale_init=torch.tensor(1))
    assert (layer.in_features, layer.out_features) == (IN, OUT) and type(layer.in_features) is int
    assert torch.all(layer.cross_modal_scale == 1.0)
    with pytest.raises(TypeError, match=r"in_features must be a non-negative integer, got tensor\(True\)"):
        FusedCrossModalLinear(torch.tensor(True), OUT)  # operator.index would make it 1


def test_fake_tensor_mode_builds_layers():
    """Shapes only (FakeTensorMode, as torch.export / compile tooling builds modules): nothing to check
    for finiteness, and no data-dependent error."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        layer = FusedCrossModalLinear(IN, OUT, aux_weight=torch.randn(OUT, IN))
        other = FusedCrossModalLinear.from_linear(nn.Linear(IN, OUT), nn.Linear(IN, OUT))
        assert layer(torch.randn(2, IN)).shape == other(torch.randn(2, IN)).shape == (2, OUT)
