"""The PyTorch training stack around a model with pathways (single process).

- torch.compile(fullgraph=True): no graph break, compiled == eager (forward and every gradient),
  for each backend (reference; triton under the Triton interpreter on the CPU).
- torch.autocast + torch.amp.GradScaler: the pathway layer behaves like ``nn.Linear`` (output and
  gradient dtypes, values, unscale, a step skipped on inf/nan with the same scale update).
- activation checkpointing (use_reentrant=False) around the blocks: same gradients.
- gradient accumulation: micro-batches == one large batch; the no-grad merged-weight cache is reused
  across micro-batches and invalidated by the optimizer step (every optimizer implementation).
- checkpoint round trip mid-training (model + optimizer): the next step is bitwise identical.

The model is the tiny image ViT of tests/dist_worker.py (width 32, depth 2) with pathways on
attn.qkv, attn.proj, mlp.fc1, mlp.fc2.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import m2pt_kernels
import m2pt_kernels.layers as layers_mod
from m2pt_kernels.layers import FusedCrossModalLinear

import dist_worker as w
from helpers import TOL, rel_err

HAS_CUDA = torch.cuda.is_available()


def _triton_usable() -> tuple[bool, str]:
    try:
        import m2pt_kernels.ops.cross_modal_linear_triton  # noqa: F401
    except Exception as exc:  # triton missing or the backend broken: say why
        return False, f"m2pt_kernels.ops.cross_modal_linear_triton cannot be imported: {exc}"
    ok, why = m2pt_kernels.backend_status()["triton"]
    return ok, why


def _grads(model: nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _pathway_layers(model):
    return [m for m in model.modules() if isinstance(m, FusedCrossModalLinear)]


class MergedLinear(nn.Linear):
    """What the paper's layer does, for λ [1] or [N]: ``F.linear(x, W + λ·W', b)`` on an nn.Linear."""

    def forward(self, x):
        return F.linear(x, self.weight + self.cross_modal_scale.view(-1, 1) * self.aux_weight, self.bias)


def as_nn_linear_baseline(model: nn.Module) -> nn.Module:
    """A deep copy where every pathway layer is an ``nn.Linear`` materializing ``W + λ·W'``."""
    base = copy.deepcopy(model)
    for name, m in list(base.named_modules()):
        if isinstance(m, FusedCrossModalLinear):
            lin = MergedLinear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight, lin.bias, lin.cross_modal_scale = m.weight, m.bias, m.cross_modal_scale
            if m.aux_trainable:
                lin.aux_weight = m.aux_weight
            else:
                lin.register_buffer("aux_weight", m.aux_weight)
            parent = base.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], lin)
    return base


# ============================================================================ torch.compile
COMPILE_CASES = [
    # backend, compiler, aux_trainable, per_channel
    ("reference", "inductor", False, False),
    ("reference", "aot_eager", True, True),
    ("triton", "aot_eager", True, True),  # inductor adds nothing around the opaque custom op here
]


@pytest.mark.parametrize("backend,compiler,aux_trainable,per_channel", COMPILE_CASES)
def test_compile_fullgraph_matches_eager(backend, compiler, aux_trainable, per_channel):
    if backend == "triton":
        ok, why = _triton_usable()
        if not ok:
            pytest.skip(why)
    torch._dynamo.reset()
    model = w.build_model(aux_trainable, per_channel, depth=1)
    x, y = w.global_batch(0)
    with m2pt_kernels.use_backend(backend):
        if backend == "reference":  # cheap: count graphs and breaks explicitly
            explained = torch._dynamo.explain(model)(x)
            assert explained.graph_break_count == 0, explained.break_reasons
            assert explained.graph_count == 1
            torch._dynamo.reset()
        _loss(model, x, y).backward()
        eager_out, eager_grads = model(x).detach(), _grads(model)
        model.zero_grad(set_to_none=True)
        compiled = torch.compile(model, fullgraph=True, backend=compiler)  # a graph break is an error
        out = compiled(x)
        F.cross_entropy(out, y).backward()
    assert rel_err(out, eager_out) < TOL[torch.float32]
    grads = _grads(model)
    assert set(grads) == set(eager_grads)
    assert any(k.endswith("cross_modal_scale") for k in grads)
    assert any(k.endswith("aux_weight") for k in grads) == aux_trainable
    for k, g in eager_grads.items():
        assert rel_err(grads[k], g) < TOL[torch.float32], k
    torch._dynamo.reset()


def test_compile_no_grad_path_traces_the_fused_op():
    """In eval/no_grad the layer's Python-side cache is not traced: fullgraph compile still works."""
    torch._dynamo.reset()
    model = w.build_model(False, True, depth=1).eval()
    x, _ = w.global_batch(1)
    with torch.no_grad():
        eager = model(x)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(out, eager) < TOL[torch.float32]
    torch._dynamo.reset()


# ============================================================================ autocast + GradScaler
def _amp_dtypes_cpu():
    return [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", _amp_dtypes_cpu(), ids=str)
@pytest.mark.parametrize("aux_trainable,per_channel", [(False, False), (True, True)])
def test_autocast_layer_behaves_like_nn_linear(dtype, aux_trainable, per_channel):
    _autocast_layer_case("cpu", dtype, aux_trainable, per_channel)


def _autocast_layer_case(device, dtype, aux_trainable, per_channel):
    layer = FusedCrossModalLinear(48, 40, aux_weight=torch.randn(40, 48) / 7, aux_trainable=aux_trainable,
                                  scale_init=0.3, per_channel_scale=per_channel, device=device)
    with torch.no_grad():
        layer.cross_modal_scale.uniform_(0.1, 0.9)
    base = as_nn_linear_baseline(nn.Sequential(layer))[0]
    x = torch.randn(3, 5, 48, device=device)
    dy = torch.randn(3, 5, 40, device=device)
    outs = {}
    for name, m in (("fused", layer), ("nn.Linear", base)):
        m.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            out = m(x)
        out.backward(dy.to(out.dtype))
        outs[name] = (out, {n: p.grad for n, p in m.named_parameters()})
    (out, grads), (ref_out, ref_grads) = outs["fused"], outs["nn.Linear"]
    plain = nn.Linear(48, 40, device=device)
    with torch.autocast(device, dtype=dtype):
        assert plain(x).dtype == dtype
    assert out.dtype == ref_out.dtype == dtype
    assert rel_err(out, ref_out) < TOL[dtype]
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        assert grads[k].dtype == g.dtype == torch.float32, k  # grads in the parameters' dtype
        assert rel_err(grads[k], g) < TOL[dtype], k
    # and the oracle in float64
    x64 = x.double()
    merged = layer.weight.double() + layer.cross_modal_scale.double().view(-1, 1) * layer.aux_weight.double()
    assert rel_err(out, F.linear(x64, merged, layer.bias.double())) < TOL[dtype]
    # no-grad / eval path under autocast: same dtype as nn.Linear
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        assert layer.eval()(x).dtype == dtype


@pytest.mark.parametrize("dtype", _amp_dtypes_cpu(), ids=str)
def test_grad_scaler_matches_nn_linear(dtype):
    _grad_scaler_case("cpu", dtype)


def _grad_scaler_case(device, dtype):
    model = w.build_model(True, True, device=device)
    base = as_nn_linear_baseline(model)
    x, y = w.global_batch(0, device)
    results = {}
    for name, m in (("fused", model), ("nn.Linear", base)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=1)
        # a finite step: scale, backward, unscale_, step, update
        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(m(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        unscaled = _grads(m)
        scaler.step(opt)
        scaler.update()
        scale_after_good = scaler.get_scale()
        opt.zero_grad(set_to_none=True)
        # a non-finite step: skipped, scale backed off
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        bad = x.clone()
        bad[0, 0, 0, 0] = float("inf")
        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(m(bad), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        skipped = all(torch.equal(p, before[n]) for n, p in m.named_parameters())
        results[name] = (unscaled, scale_after_good, scaler.get_scale(), skipped)
    (g, s_good, s_bad, skipped), (g_ref, s_good_ref, s_bad_ref, skipped_ref) = results["fused"], results["nn.Linear"]
    for k, ref in g_ref.items():
        assert rel_err(g[k], ref) < TOL[dtype], k
    assert s_good == s_good_ref == 2.0 ** 11  # grew after a finite step (growth_interval=1)
    assert s_bad == s_bad_ref == 2.0 ** 10  # halved after the inf step
    assert skipped and skipped_ref


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_and_grad_scaler_cuda(dtype):
    _autocast_layer_case("cuda", dtype, False, False)
    _autocast_layer_case("cuda", dtype, True, True)
    _grad_scaler_case("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_inductor_cuda(backend):
    if backend == "triton" and not _triton_usable()[0]:
        pytest.skip(_triton_usable()[1])
    torch._dynamo.reset()
    model = w.build_model(True, True, device="cuda", depth=1)
    x, y = w.global_batch(0, "cuda")
    with m2pt_kernels.use_backend(backend):
        _loss(model, x, y).backward()
        eager_out, eager_grads = model(x).detach(), _grads(model)
        model.zero_grad(set_to_none=True)
        out = torch.compile(model, fullgraph=True)(x)
        F.cross_entropy(out, y).backward()
    tol = 1e-3  # TF32 may be on in the surrounding ops
    assert rel_err(out, eager_out) < tol
    for k, g in eager_grads.items():
        assert rel_err(model.get_parameter(k).grad, g) < tol, k
    torch._dynamo.reset()


# ============================================================================ activation checkpointing
class Checkpointed(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


@pytest.mark.parametrize("aux_trainable,per_channel", [(False, True), (True, False)])
def test_activation_checkpointing_same_gradients(aux_trainable, per_channel):
    model = w.build_model(aux_trainable, per_channel)
    x, y = w.global_batch(0)
    _loss(model, x, y).backward()
    ref = _grads(model)
    ckpt = copy.deepcopy(model)
    ckpt.zero_grad(set_to_none=True)
    ckpt.blocks = nn.Sequential(*[Checkpointed(b) for b in ckpt.blocks])
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in _pathway_layers(ckpt)]
    _loss(ckpt, x, y).backward()
    for h in hooks:
        h.remove()
    # recomputed in backward (non-reentrant checkpointing stops early once every saved tensor is back,
    # so the last linear of a block may not run again)
    assert len(calls) > len(_pathway_layers(ckpt)), "the blocks were not recomputed in backward"
    grads = {k.replace(".block.", "."): g for k, g in _grads(ckpt).items()}
    assert set(grads) == set(ref)
    for k, g in ref.items():
        assert rel_err(grads[k], g) < 1e-6, k


# ============================================================================ gradient accumulation
def test_gradient_accumulation_equals_one_large_batch():
    model = w.build_model(True, True)
    x, y = w.global_batch(0)
    _loss(model, x, y).backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    micro = 4
    for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
        (_loss(model, xs, ys) / micro).backward()
    grads = _grads(model)
    for k, g in ref.items():
        assert rel_err(grads[k], g) < 1e-5, k


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
    "sgd_foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
}
# torch's fused optimizer kernels (fused=True: _fused_adamw_, _fused_sgd_, ...) update parameters in
# place WITHOUT bumping their autograd version counters; the layer's merged-weight cache therefore also
# keys on a global optimizer-step counter (torch.optim's step post hook), so they are covered here too.


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_merged_weight_cache_reused_across_micro_batches_and_invalidated_by_step(opt_name, monkeypatch):
    model = w.build_model(False, False).eval()  # no dropout: eval mode trains the same; no mode switch below
    n_layers = len(_pathway_layers(model))
    merges = []
    real_merged_weight = layers_mod.merged_weight

    def counting(*args, **kwargs):
        merges.append(1)
        return real_merged_weight(*args, **kwargs)

    monkeypatch.setattr(layers_mod, "merged_weight", counting)
    x, y = w.global_batch(0)
    probe, _ = w.global_batch(1)

    with torch.no_grad():  # micro-batches through the no-grad path: one merge per layer, then reuse
        before = [model(xs) for xs in probe.chunk(4)]
    assert len(merges) == n_layers
    with torch.no_grad():
        before_again = torch.cat([model(xs) for xs in probe.chunk(4)])
    assert len(merges) == n_layers, "the merged weight was recomputed although nothing changed"
    assert torch.equal(before_again, torch.cat(before))

    opt = OPTIMIZERS[opt_name]([p for p in model.parameters() if p.requires_grad])
    _loss(model, x, y).backward()  # grad-enabled forward: the fused op, no merge
    opt.step()
    opt.zero_grad(set_to_none=True)

    with torch.no_grad():
        after = torch.cat([model(xs) for xs in probe.chunk(4)])
    assert len(merges) == 2 * n_layers, "the optimizer step did not invalidate the merged-weight cache"
    fresh = model(probe).detach()  # grad enabled: the fused op on the current weights
    assert rel_err(after, fresh) < TOL[torch.float32]
    assert rel_err(after, torch.cat(before)) > 1e-3, "stale output after the optimizer step"


# ============================================================================ checkpoint round trip
@pytest.mark.parametrize("aux_trainable,per_channel", [(False, False), (True, True)])
def test_checkpoint_round_trip_resumes_bitwise(aux_trainable, per_channel, tmp_path):
    def make(seed):
        model = w.build_model(aux_trainable, per_channel, seed=seed)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                        weight_decay=0.05)

    model, opt = make(1234)
    for step in range(2):
        x, y = w.global_batch(step)
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    keys = set(model.state_dict())
    assert any(k.endswith("aux_weight") for k in keys) and any(k.endswith("cross_modal_scale") for k in keys)

    fresh, fresh_opt = make(999)  # different initial weights: everything must come from the file
    probe = w.global_batch(5)[0]
    with torch.no_grad():  # fills fresh's merged-weight cache with its pre-load weights
        fresh.eval()(probe)
    state = torch.load(path, weights_only=True)
    fresh.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optimizer"])
    with torch.no_grad():  # the no-grad path must not serve a weight merged before the load
        assert torch.equal(fresh(probe), model.eval()(probe))
    model.train()
    fresh.train()

    x, y = w.global_batch(2)
    losses = []
    for m, o in ((model, opt), (fresh, fresh_opt)):
        loss = _loss(m, x, y)
        loss.backward()
        o.step()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (k, p), (k2, q) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(p, q), f"{k} differs after the resumed step"
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
