"""Whole-model pathways: add / merge / linear probing / the paper's API / checkpoints / every error.

A toy ViT with timm's block names runs everywhere; timm's vit_tiny and a small Hugging Face ViTModel
run when those packages are installed (they are in the test extras).
"""
import argparse
import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn

import m2pt_kernels
from m2pt_kernels import (FusedCrossModalLinear, PathwayConfig, add_pathways, mark_only_scales_trainable,
                          merge_pathways, reparameterize_aux_into_target_model)
from m2pt_kernels.baselines import PaperCrossModalReparamLinear
from m2pt_kernels.pathways import (PRESETS, checkpoint_format, is_pathway_state_dict, load_checkpoint, merge_state_dict,
                                   save_checkpoint)

from helpers import rel_err

TIMM_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(a @ v)


class Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), Attn(d)
        self.norm2, self.mlp = nn.LayerNorm(d), Mlp(d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyViT(nn.Module):
    """timm's names: a tokenizer, ``blocks.<i>.attn.qkv`` ..., a head."""

    def __init__(self, d=24, depth=3, in_dim=10, classes=5):
        super().__init__()
        self.embed = nn.Linear(in_dim, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def toy_pair(depth=3, aux_depth=None, d=24):
    target = ToyViT(d=d, depth=depth)
    aux = ToyViT(d=d, depth=aux_depth or depth, in_dim=7, classes=11)  # other tokenizer and head
    return target, aux


def pathway_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, FusedCrossModalLinear)]


def randomize_scales(model, dtype=None):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FusedCrossModalLinear):
                m.cross_modal_scale.copy_(torch.randn_like(m.cross_modal_scale))


# ---------------------------------------------------------------------------- add_pathways
def test_add_pathways_in_place_identity_and_returns_model():
    target, aux = toy_pair()
    x = torch.randn(2, 6, 10)
    y0 = target(x)
    out = add_pathways(target, aux)
    assert out is target
    assert pathway_names(target) == [f"blocks.{i}.{n}" for i in range(3) for n in TIMM_LAYERS]
    assert isinstance(target.head, nn.Linear) and isinstance(target.embed, nn.Linear)
    torch.testing.assert_close(target(x), y0, rtol=0, atol=0)  # λ = 0: the target model exactly
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(x), y0, rtol=0, atol=0)
    for i in range(3):  # paired by name, copied from the aux model
        assert torch.equal(target.blocks[i].attn.qkv.aux_weight, aux.blocks[i].attn.qkv.weight)
        assert target.blocks[i].attn.qkv.aux_weight.data_ptr() != aux.blocks[i].attn.qkv.weight.data_ptr()


def test_training_moves_lambda_leaves_aux_untouched_and_old_optimizer_valid():
    target, aux = toy_pair()
    aux_before = copy.deepcopy(aux.state_dict())
    old_params = list(target.parameters())
    add_pathways(target, aux)
    new_ids = {id(p) for p in target.parameters()}
    assert all(id(p) in new_ids for p in old_params)  # an optimizer built earlier still holds live tensors
    opt = torch.optim.AdamW(target.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(target(torch.randn(4, 6, 10)), torch.randint(0, 5, (4,)))
        loss.backward()
        opt.step()
    lams = torch.cat([target.get_submodule(n).cross_modal_scale.detach() for n in pathway_names(target)])
    assert (lams != 0).all()
    for k, v in aux.state_dict().items():
        assert torch.equal(v, aux_before[k]), k
    assert all(p.grad is None for p in aux.parameters())


def test_aux_as_state_dict_path_wrapped_and_prefixed(tmp_path):
    target, aux = toy_pair()
    ref = add_pathways(copy.deepcopy(target), aux)
    wrapped = {"model": {f"module.{k}": v for k, v in aux.state_dict().items()},
               "optimizer": {"state": {}}, "epoch": 3, "args": argparse.Namespace(lr=0.1)}
    path = tmp_path / "aux.pth"
    torch.save(wrapped, path)
    for source in (aux.state_dict(), {"state_dict": aux.state_dict()}, str(path), path):
        model = add_pathways(copy.deepcopy(target), source)
        for n in pathway_names(ref):
            assert torch.equal(model.get_submodule(n).aux_weight, ref.get_submodule(n).aux_weight), n
    st = tmp_path / "aux.safetensors"
    save_checkpoint(aux.state_dict(), st)
    model = add_pathways(copy.deepcopy(target), st)
    assert torch.equal(model.blocks[2].mlp.fc2.aux_weight, aux.blocks[2].mlp.fc2.weight)


def test_config_names_suffix_regex_preset_exclude_and_options():
    target, aux = toy_pair()
    m = add_pathways(copy.deepcopy(target), aux, PathwayConfig(target_modules=["mlp.fc1"]))
    assert pathway_names(m) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1"]
    m = add_pathways(copy.deepcopy(target), aux, PathwayConfig(target_modules=["blocks.1.attn.qkv"]))
    assert pathway_names(m) == ["blocks.1.attn.qkv"]
    m = add_pathways(copy.deepcopy(target), aux, PathwayConfig(target_modules=r"blocks\.[02]\.attn\.(qkv|proj)"))
    assert pathway_names(m) == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.2.attn.qkv", "blocks.2.attn.proj"]
    m = add_pathways(copy.deepcopy(target), aux, PathwayConfig(target_modules="timm_vit"))
    assert len(pathway_names(m)) == 12
    # suffixes match at a dot boundary only: "fc1" does not match "xfc1"
    m = add_pathways(copy.deepcopy(target), aux, PathwayConfig(target_modules=["c1"] + ["mlp.fc2"]))
    assert pathway_names(m) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2", "blocks.2.mlp.fc2"]
    m = add_pathways(copy.deepcopy(target), aux, PathwayConfig(exclude_modules=("blocks.1",)))
    assert not any(n.startswith("blocks.1.") for n in pathway_names(m)) and len(pathway_names(m)) == 8
    m = add_pathways(copy.deepcopy(target), aux,
                     PathwayConfig(aux_trainable=False, scale_init=0.25, per_channel_scale=True))
    layer = m.blocks[0].mlp.fc1
    assert "aux_weight" in dict(layer.named_buffers()) and not layer.aux_trainable
    assert layer.cross_modal_scale.shape == (48,) and torch.all(layer.cross_modal_scale == 0.25)
    assert not any("aux_weight" in n for n, _ in m.named_parameters())


def test_bf16_target_fp32_aux():
    target, aux = toy_pair()
    target.to(torch.bfloat16)
    add_pathways(target, aux)
    layer = target.blocks[0].attn.qkv
    assert layer.aux_weight.dtype == torch.bfloat16 and layer.cross_modal_scale.dtype == torch.float32
    randomize_scales(target)
    y = target(torch.randn(2, 6, 10, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.cross_modal_scale.grad.dtype == torch.float32
    target.to(torch.float16)
    assert layer.cross_modal_scale.dtype == torch.float32


# ---------------------------------------------------------------------------- merge
@pytest.mark.parametrize("per_channel", [False, True])
def test_merge_pathways_exact_in_float64_and_loads_strict(per_channel):
    target, aux = toy_pair()
    target.double()
    add_pathways(target, aux, PathwayConfig(per_channel_scale=per_channel))
    randomize_scales(target)
    target.eval()
    x = torch.randn(3, 6, 10, dtype=torch.float64)
    with torch.no_grad():
        y_path = target(x)
    out = merge_pathways(target)
    assert out is target and not pathway_names(target)
    assert all(type(target.get_submodule(f"blocks.0.{n}")) is nn.Linear for n in TIMM_LAYERS)
    with torch.no_grad():
        assert rel_err(target(x), y_path) < 1e-12
    fresh = ToyViT().double()
    fresh.load_state_dict(target.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(fresh(x), y_path) < 1e-12


def test_merge_state_dict_equals_merge_pathways_and_handles_paper_format():
    target, aux = toy_pair()
    add_pathways(target, aux)
    randomize_scales(target)
    sd = target.state_dict()
    assert is_pathway_state_dict(sd)
    merged_sd = merge_state_dict(sd)
    assert not is_pathway_state_dict(merged_sd) and is_pathway_state_dict(sd)  # input untouched
    merge_pathways(target)
    assert list(merged_sd) == list(target.state_dict())
    for k, v in target.state_dict().items():
        assert torch.equal(merged_sd[k], v), k
    # the paper's layer: keys weight, bias, cross_modal_scale, aux_weight
    paper = nn.Sequential(PaperCrossModalReparamLinear(8, 4, aux_weight=torch.randn(4, 8)))
    with torch.no_grad():
        paper[0].cross_modal_scale.fill_(0.7)
    plain = nn.Sequential(nn.Linear(8, 4))
    plain.load_state_dict(merge_state_dict(paper.state_dict()), strict=True)
    x = torch.randn(5, 8)
    assert rel_err(plain(x), paper(x).double()) < 1e-6
    assert rel_err(merge_pathways(paper)(x), plain(x).double()) < 1e-6  # the paper's layers merge too


def test_merge_state_dict_bf16_fp32_math():
    w, a = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    sd = {"l.weight": w, "l.aux_weight": a, "l.cross_modal_scale": torch.tensor([0.3])}
    out = merge_state_dict(sd)
    assert list(out) == ["l.weight"]
    assert torch.equal(out["l.weight"], (w.float() + 0.3 * a.float()).to(torch.bfloat16))


def test_loading_a_plain_checkpoint_into_a_pathway_model_says_so_and_honours_strict():
    target, aux = toy_pair()
    plain_sd = {k: torch.randn_like(v) for k, v in target.state_dict().items()}
    add_pathways(target, aux)
    randomize_scales(target)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.warns(UserWarning, match="no pathway for this layer.*plain or merged checkpoint"):
        with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"blocks\.0\.attn\.qkv\.aux_weight"'):
            target.load_state_dict(plain_sd)
    # strict=False: the target's own pretrained weights load, W' and λ keep their values, and the
    # missing keys are returned (torch passes strict=True to every layer: an error there would refuse it)
    with pytest.warns(UserWarning, match="no pathway for this layer"):
        missing, unexpected = target.load_state_dict(plain_sd, strict=False)
    assert not unexpected
    assert set(missing) == {f"{n}.{k}" for n in pathway_names(target) for k in ("aux_weight", "cross_modal_scale")}
    after = target.state_dict()
    for k, v in after.items():
        assert torch.equal(v, plain_sd[k] if k in plain_sd else before[k]), k


def test_merge_errors():
    with pytest.raises(ValueError, match=re.escape("this checkpoint has no pathways (no *.aux_weight / "
                                                   "*.cross_modal_scale keys): it is already merged or a plain model")):
        merge_state_dict(ToyViT().state_dict())
    with pytest.raises(ValueError, match="'l' is incomplete: missing \\['l.cross_modal_scale'\\]"):
        merge_state_dict({"l.weight": torch.zeros(2, 2), "l.aux_weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="already merged or a plain model"):
        merge_pathways(ToyViT())


def test_hooks_survive_add_and_merge_and_their_handles_still_remove_them():
    """Like PEFT's base layer: forward / pre / full backward hooks on a replaced layer fire on its replacement."""
    target, aux = toy_pair()
    calls = []
    fc1 = target.blocks[0].mlp.fc1
    handles = [fc1.register_forward_hook(lambda m, i, o: calls.append(("fwd", type(m).__name__))),
               fc1.register_forward_pre_hook(lambda m, i: calls.append(("pre", type(m).__name__))),
               fc1.register_full_backward_hook(lambda m, gi, go: calls.append(("bwd", type(m).__name__)))]
    x = torch.randn(2, 5, 10)

    def fired():
        calls.clear()
        target(x).sum().backward()
        return sorted(calls)

    add_pathways(target, aux)
    assert fired() == [("bwd", "FusedCrossModalLinear"), ("fwd", "FusedCrossModalLinear"),
                       ("pre", "FusedCrossModalLinear")]
    # a hook registered on the pathway layer itself survives merging too
    fc2 = target.blocks[1].mlp.fc2
    handles.append(fc2.register_forward_hook(lambda m, i, o: calls.append(("fc2", type(m).__name__))))
    merge_pathways(target)
    assert fired() == [("bwd", "Linear"), ("fc2", "Linear"), ("fwd", "Linear"), ("pre", "Linear")]
    for h in handles:
        h.remove()
    assert fired() == []
    # a model that is one pathway layer: the merged layer it returns keeps the hooks
    layer = FusedCrossModalLinear.from_linear(nn.Linear(4, 3), torch.randn(3, 4))
    handle = layer.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    merged = merge_pathways(layer)
    calls.clear()
    merged(torch.randn(2, 4))
    assert calls == ["Linear"]
    handle.remove()
    merged(torch.randn(2, 4))
    assert calls == ["Linear"]


@pytest.mark.parametrize("hook", ["weight_norm", "spectral_norm", "prune"])
def test_merge_folds_a_hook_computed_weight_and_carries_the_other_hooks(hook):
    """A pathway layer whose W a forward pre-hook computes (hook-based weight_norm / spectral_norm, prune) merges
    to the function it computes; that hook is folded in, not carried (the merged nn.Linear has no weight_g /
    weight_orig / mask for it), and the user's own hooks still fire on the merged layer."""
    target, aux = toy_pair()
    add_pathways(target, aux)
    layer = target.blocks[2].mlp.fc1
    with torch.no_grad():
        layer.cross_modal_scale.fill_(0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        if hook == "prune":
            from torch.nn.utils import prune
            prune.l1_unstructured(layer, "weight", amount=0.5)
        else:
            getattr(nn.utils, hook)(layer)
    seen = []
    layer.register_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
    target.eval()
    x = torch.randn(2, 5, 10)
    with torch.no_grad():
        before = target(x)
    target.train()  # merged in train mode: spectral_norm's fold must not run a power iteration
    merge_pathways(target)
    assert not pathway_names(target)
    merged = target.blocks[2].mlp.fc1
    assert type(merged) is nn.Linear and not merged._forward_pre_hooks
    assert merged.weight.requires_grad  # computed from Parameters that train: the merged W trains too
    target.eval()
    with torch.no_grad():
        assert rel_err(target(x), before) < 1e-6
    assert seen == ["FusedCrossModalLinear", "Linear"]


# ---------------------------------------------------------------------------- linear probing
def test_mark_only_scales_trainable():
    target, aux = toy_pair()
    add_pathways(target, aux)
    assert mark_only_scales_trainable(target) is target
    trainable = {n for n, p in target.named_parameters() if p.requires_grad}
    expected = {f"{n}.cross_modal_scale" for n in pathway_names(target)} | {"head.weight", "head.bias"}
    assert trainable == expected
    mark_only_scales_trainable(target, modules_to_save=())
    assert {n for n, p in target.named_parameters() if p.requires_grad} == expected - {"head.weight", "head.bias"}
    target(torch.randn(2, 6, 10)).sum().backward()
    assert target.blocks[0].attn.qkv.weight.grad is None and target.blocks[0].attn.qkv.cross_modal_scale.grad is not None
    with pytest.raises(ValueError, match=r"no module named \['classifier'\].*'head'"):
        mark_only_scales_trainable(target, modules_to_save=("classifier",))
    with pytest.raises(ValueError, match="no pathways"):
        mark_only_scales_trainable(ToyViT())


def test_mark_only_scales_trainable_selects_by_type_not_name():
    target, aux = ToyViT(), ToyViT()
    add_pathways(target, aux, PathwayConfig(target_modules=["embed"], exclude_modules=()))
    target.blocks[0].cross_modal_scale = nn.Parameter(torch.zeros(1))  # a decoy named like λ
    mark_only_scales_trainable(target, modules_to_save=())
    trainable = {n for n, p in target.named_parameters() if p.requires_grad}
    assert trainable == {"embed.cross_modal_scale"}


# ---------------------------------------------------------------------------- the paper's function
def paper_reparameterize(target_model, aux_model, layer_names=TIMM_LAYERS, main_body_name="blocks"):
    """The official M2PT code's loop (zip of blocks, layers built from the aux model's weight)."""
    for t_block, a_block in zip(getattr(target_model, main_body_name), getattr(aux_model, main_body_name)):
        for name in layer_names:
            parent_name, _, child = name.rpartition(".")
            t_parent, a_parent = t_block.get_submodule(parent_name), a_block.get_submodule(parent_name)
            origin, aux_layer = getattr(t_parent, child), getattr(a_parent, child)
            layer = PaperCrossModalReparamLinear(origin.in_features, origin.out_features, origin.bias is not None,
                                                 origin_layer=origin, aux_weight=aux_layer.weight)
            setattr(t_parent, child, layer)


def test_reparameterize_matches_the_paper():
    target, aux = toy_pair()
    ours, theirs = copy.deepcopy(target), copy.deepcopy(target)
    assert reparameterize_aux_into_target_model(ours, aux) is ours
    paper_reparameterize(theirs, aux)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    randomize_scales(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # checkpoints move between the two
    x = torch.randn(2, 6, 10)
    assert rel_err(ours(x), theirs(x).double()) < 1e-5
    back = copy.deepcopy(target)
    reparameterize_aux_into_target_model(back, aux, layer_names=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
                                         main_body_name="blocks", is_aux_trainable=False)
    back.load_state_dict(theirs.state_dict(), strict=True)
    assert rel_err(back(x), theirs(x).double()) < 1e-5
    assert not back.blocks[0].attn.qkv.aux_trainable


def test_reparameterize_on_block_lists_and_errors():
    target, aux = toy_pair()
    reparameterize_aux_into_target_model(target.blocks, aux.blocks, layer_names=("mlp.fc1",), main_body_name=None)
    assert pathway_names(target) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1"]
    target, aux = toy_pair()
    with pytest.raises(ValueError, match="no 'layers'"):
        reparameterize_aux_into_target_model(target, aux, main_body_name="layers")
    with pytest.raises(ValueError, match=r"blocks.<i>.attn.out"):
        reparameterize_aux_into_target_model(target, aux, layer_names=("attn.qkv", "attn.out"))
    target, aux = toy_pair(depth=4, aux_depth=2)
    with pytest.raises(ValueError, match=r"shallower.*blocks\.0-3 \(4 blocks\).*blocks\.0-1 \(2 blocks\)"):
        reparameterize_aux_into_target_model(target, aux)


# ---------------------------------------------------------------------------- errors
def test_error_depth_mismatch_both_ways():
    target, aux = toy_pair(depth=4, aux_depth=2)
    with pytest.raises(ValueError, match=r"shallower than the target.*blocks\.0-3 \(4 blocks\).*blocks\.0-1 \(2 blocks\)"):
        add_pathways(target, aux)
    assert not pathway_names(target)  # nothing changed on error
    target, aux = toy_pair(depth=2, aux_depth=3)
    with pytest.raises(ValueError, match=r"deeper than the target.*\(2 blocks\).*\(3 blocks\)"):
        add_pathways(target, aux)


def test_depth_check_follows_the_selection():
    # a subset of the target's blocks pairs with an auxiliary state_dict holding exactly those blocks
    layers = r"\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    target, aux = toy_pair(depth=3, aux_depth=2)
    add_pathways(target, aux.state_dict(), PathwayConfig(target_modules=r"blocks\.(0|1)" + layers))
    assert pathway_names(target) == [f"blocks.{i}.{n}" for i in (0, 1) for n in TIMM_LAYERS]
    assert torch.equal(target.blocks[1].mlp.fc2.aux_weight, aux.blocks[1].mlp.fc2.weight)
    # ... but not other blocks of the same count
    target, aux = toy_pair(depth=3, aux_depth=2)
    with pytest.raises(ValueError, match=r"shallower.*selected layers are in blocks\.1-2.*not exactly those"):
        add_pathways(target, aux, PathwayConfig(target_modules=r"blocks\.(1|2)" + layers))
    assert not pathway_names(target)


class ToyStages(nn.Module):
    """Swin's nesting: ``stages.<s>.blocks.<i>.attn.qkv``, each stage with its own depth."""

    def __init__(self, depths, d=16):
        super().__init__()
        self.stages = nn.ModuleList(nn.Module() for _ in depths)
        for stage, depth in zip(self.stages, depths):
            stage.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])


def test_depth_check_in_nested_containers():
    target = ToyStages((2, 2))
    with pytest.raises(ValueError, match=r"deeper.*stages\.1\.blocks\.0-1 \(2 blocks\).*stages\.1\.blocks\.0-2 \(3 blocks\)"):
        add_pathways(target, ToyStages((2, 3)))
    with pytest.raises(ValueError, match=r"shallower.*stages\.0-1 \(2 blocks\).*stages\.0-0 \(1 blocks\)"):
        add_pathways(target, ToyStages((2,)))
    assert not pathway_names(target)
    aux = ToyStages((2, 2))
    add_pathways(target, aux)
    assert len(pathway_names(target)) == 4 * 4
    assert torch.equal(target.stages[1].blocks[1].attn.qkv.aux_weight, aux.stages[1].blocks[1].attn.qkv.weight)


def test_error_aux_with_two_matching_sub_models():
    target, aux = toy_pair()
    towers = nn.Module()
    towers.video, towers.audio = aux, ToyViT(d=24)
    with pytest.raises(ValueError, match=r"more than one set of layers.*'audio\.', 'video\.'.*aux\.video"):
        add_pathways(target, towers)
    assert not pathway_names(target)
    add_pathways(target, towers.video)
    assert torch.equal(target.blocks[0].attn.qkv.aux_weight, aux.blocks[0].attn.qkv.weight)


def test_shared_layers():
    # a layer shared under two names can't pair with two auxiliary layers: an error, nothing changed
    target, aux = toy_pair()
    target.blocks[1].mlp.fc1 = target.blocks[0].mlp.fc1
    with pytest.raises(ValueError, match=r"'blocks\.0\.mlp\.fc1' is one module shared under several names "
                                         r"\(\['blocks\.0\.mlp\.fc1', 'blocks\.1\.mlp\.fc1'\]\)"):
        add_pathways(target, aux)
    assert not pathway_names(target)
    add_pathways(target, aux, PathwayConfig(exclude_modules=("head", "mlp.fc1")))
    assert target.blocks[1].mlp.fc1 is target.blocks[0].mlp.fc1
    # merging keeps a shared pathway layer shared, under every name (a whole shared block too)
    target, aux = toy_pair()
    add_pathways(target, aux)
    randomize_scales(target)
    target.blocks[1].mlp.fc1 = target.blocks[0].mlp.fc1
    target.blocks[2] = target.blocks[0]
    x = torch.randn(2, 5, 10)
    want = target(x)
    merge_pathways(target)
    assert not any(isinstance(m, FusedCrossModalLinear) for _, m in target.named_modules(remove_duplicate=False))
    assert target.blocks[1].mlp.fc1 is target.blocks[0].mlp.fc1 and target.blocks[2] is target.blocks[0]
    assert rel_err(target(x), want) < 1e-6


def test_error_missing_or_mis_shaped_aux_layer():
    target, aux = toy_pair()
    sd = {k: v for k, v in aux.state_dict().items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.fc2' has no partner.*'blocks\.1\.mlp\.fc2\.weight'"):
        add_pathways(target, sd)
    target, _ = toy_pair()
    wide = ToyViT(d=32)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv'.*\[72, 24\].*\[96, 32\]"):
        add_pathways(target, wide)
    assert not pathway_names(target)


class Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.backbone = inner

    def forward(self, x):
        return self.backbone(x)


def test_wrapper_prefix_on_either_side_pairs_by_name():
    target, aux = toy_pair()
    wrapped = add_pathways(Wrapped(copy.deepcopy(target)), aux)  # backbone.blocks.0... <- blocks.0...
    assert torch.equal(wrapped.backbone.blocks[2].attn.proj.aux_weight, aux.blocks[2].attn.proj.weight)
    plain = add_pathways(copy.deepcopy(target), Wrapped(aux))  # blocks.0... <- backbone.blocks.0...
    assert torch.equal(plain.blocks[1].mlp.fc1.aux_weight, aux.blocks[1].mlp.fc1.weight)


def test_error_aux_uses_other_layer_names():
    target, aux = toy_pair()
    renamed = {k.replace("blocks.", "layers."): v for k, v in aux.state_dict().items()}
    with pytest.raises(ValueError, match=r"no selected target layer has a same-named partner.*layers\.0\."):
        add_pathways(target, renamed)


def test_error_shallower_aux_behind_a_wrapper_prefix_is_a_depth_error():
    # a wrapper prefix on one side and a shallower aux: the prefix pairs only some layers, and the error
    # is the depth, not "the two models use different layer names"
    target, aux = toy_pair(depth=3, aux_depth=2)
    with pytest.raises(ValueError, match=r"shallower than the target.*backbone\.blocks\.0-2 \(3 blocks\).*"
                                         r"has blocks\.0-1 \(2 blocks\)"):
        add_pathways(Wrapped(target), aux)
    with pytest.raises(ValueError, match=r"shallower than the target.*has blocks\.0-2 \(3 blocks\).*"
                                         r"backbone\.blocks\.0-1 \(2 blocks\)"):
        add_pathways(target, Wrapped(aux))
    assert not pathway_names(target)
    # one layer missing under the right prefix: that layer is named
    target, aux = toy_pair()
    sd = {k: v for k, v in aux.state_dict().items() if k != "blocks.1.mlp.fc2.weight"}
    wrapped = Wrapped(target)
    with pytest.raises(ValueError, match=r"'backbone\.blocks\.1\.mlp\.fc2' has no partner.*"
                                         r"'blocks\.1\.mlp\.fc2\.weight'"):
        add_pathways(wrapped, sd)
    assert not pathway_names(wrapped)


def test_error_shallower_hf_aux_without_the_vit_prefix():
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    target = transformers.ViTForImageClassification(transformers.ViTConfig(num_hidden_layers=3, **small))
    aux = transformers.ViTModel(transformers.ViTConfig(num_hidden_layers=2, **small))
    with pytest.raises(ValueError, match=r"shallower than the target.*vit\.layers\.0-2 \(3 blocks\).*"
                                         r"has layers\.0-1 \(2 blocks\)"):
        add_pathways(target, aux)
    assert not pathway_names(target)


def test_error_aux_on_the_meta_device():
    target, _ = toy_pair()
    with torch.device("meta"):
        aux = ToyViT(in_dim=7, classes=11)
    with pytest.raises(ValueError, match=r"auxiliary 'blocks\.0\.attn\.qkv\.weight' \(partner of "
                                         r"'blocks\.0\.attn\.qkv'\) is on the meta device.*to_empty"):
        add_pathways(target, aux)
    assert not pathway_names(target)
    # both on meta (the structure built before loading a checkpoint into it) is not an error
    with torch.device("meta"):
        empty = ToyViT()
    add_pathways(empty, aux)
    assert len(pathway_names(empty)) == 12 and empty.blocks[0].attn.qkv.aux_weight.is_meta


def test_error_no_match_lists_nearest_names_and_presets():
    target, aux = toy_pair()
    with pytest.raises(ValueError, match=r"no module matches target_modules=\['attn\.qkvv'\].*attn\.qkv.*timm_vit"):
        add_pathways(target, aux, PathwayConfig(target_modules=["attn.qkvv"]))
    with pytest.raises(ValueError, match="fully matches the regex"):
        add_pathways(target, aux, PathwayConfig(target_modules=r"nothing\.here"))
    lonely = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no module of this model matches a preset.*Presets: timm_vit"):
        add_pathways(lonely, lonely)


def test_error_matched_module_not_linear_twice_and_mha():
    target, aux = toy_pair()
    with pytest.raises(TypeError, match=r"'blocks\.0\.norm1' .* is a LayerNorm, not an nn\.Linear"):
        add_pathways(target, aux, PathwayConfig(target_modules=["norm1"]))
    add_pathways(target, aux)
    with pytest.raises(ValueError, match=r"already has pathways \(12 layers, e\.g\. 'blocks\.0\.attn\.qkv'\).*twice"):
        add_pathways(target, aux)
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="out_proj of an nn.MultiheadAttention"):
        add_pathways(mha, copy.deepcopy(mha), PathwayConfig(target_modules=["out_proj"]))


class BiasedQkvAttn(nn.Module):
    """timm's BEiT / EVA / Swin V2 attention: q_bias and v_bias of its own, and ``self.qkv.weight`` read
    into F.linear instead of calling ``self.qkv`` (unless qkv_bias_separate)."""

    def __init__(self, d, qkv_bias=True, qkv_bias_separate=False):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.qkv_bias_separate = qkv_bias_separate
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.randn(d))
            self.register_buffer("k_bias", torch.zeros(d), persistent=False)
            self.v_bias = nn.Parameter(torch.randn(d))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = self.qkv(x) + bias if self.qkv_bias_separate else nn.functional.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v)


def biased_qkv_vit(**kw):
    model = ToyViT()
    for block in model.blocks:
        block.attn = BiasedQkvAttn(24, **kw)
    return model


def test_error_qkv_weight_read_directly_by_its_parent():
    target, aux = biased_qkv_vit(), biased_qkv_vit()
    with pytest.raises(TypeError, match=r"'blocks\.0\.attn\.qkv' is not called by its parent BiasedQkvAttn.*"
                                        r"q_bias.*silently bypassed.*exclude_modules=\('head', 'attn\.qkv'\)"):
        add_pathways(target, aux)
    assert not pathway_names(target)
    with pytest.raises(TypeError, match=r"'blocks\.2\.attn\.qkv' is not called"):
        add_pathways(target, aux, PathwayConfig(target_modules=["blocks.2.attn.qkv"]))
    # leaving it out works, and every remaining pathway is live
    add_pathways(target, aux, PathwayConfig(exclude_modules=("head", "attn.qkv"), scale_init=0.5))
    assert pathway_names(target) == [f"blocks.{i}.{n}" for i in range(3) for n in ("attn.proj", "mlp.fc1", "mlp.fc2")]
    target(torch.randn(2, 6, 10)).sum().backward()
    assert all(target.get_submodule(n).cross_modal_scale.grad is not None for n in pathway_names(target))
    # the same attention calling self.qkv (bias added after, or no q/v bias) is paired as usual
    for kw in (dict(qkv_bias_separate=True), dict(qkv_bias=False)):
        target = add_pathways(biased_qkv_vit(**kw), biased_qkv_vit(**kw), PathwayConfig(scale_init=0.5))
        target(torch.randn(2, 6, 10)).sum().backward()
        assert target.blocks[0].attn.qkv.cross_modal_scale.grad is not None, kw


@pytest.mark.parametrize("arch,kw,qkv", [
    ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2), "blocks.0.attn.qkv"),
    ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=14, depth=2), "blocks.0.attn.qkv"),
    ("swinv2_tiny_window8_256", dict(img_size=32, depths=(1, 1), num_heads=(1, 2), embed_dim=16, window_size=4),
     "layers.0.blocks.0.attn.qkv"),
])
def test_timm_attention_with_q_v_bias_refuses_qkv(arch, kw, qkv):
    timm = pytest.importorskip("timm")
    make = lambda: timm.create_model(arch, pretrained=False, num_classes=4, **kw)  # noqa: E731
    target, aux = make(), make()
    with pytest.raises(TypeError, match=re.escape(f"{qkv!r} is not called by its parent")):
        add_pathways(target, aux)
    assert not pathway_names(target)
    add_pathways(target, aux, PathwayConfig(exclude_modules=("head", "attn.qkv"), scale_init=0.5))
    assert pathway_names(target) and not any(n.endswith("attn.qkv") for n in pathway_names(target))
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    target(x).sum().backward()
    assert all(target.get_submodule(n).cross_modal_scale.grad is not None for n in pathway_names(target))
    target.eval()
    with torch.no_grad():
        want = target(x)
        assert rel_err(merge_pathways(target)(x), want) < 1e-5


def test_error_aux_checkpoint_has_pathways():
    target, aux = toy_pair()
    add_pathways(aux, ToyViT(in_dim=7, classes=11))
    with pytest.raises(ValueError, match=r"has pathways itself.*unmerged M2PT checkpoint.*Merge it first"):
        add_pathways(target, aux.state_dict())
    with pytest.raises(TypeError, match="aux must be an nn.Module, a state_dict or a path"):
        add_pathways(target, 3)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_helpers(tmp_path):
    target, aux = toy_pair()
    add_pathways(target, aux)
    randomize_scales(target)
    sd = target.state_dict()
    for suffix in (".pth", ".pt", ".safetensors"):
        path = tmp_path / f"ckpt{suffix}"
        save_checkpoint(sd, path)
        loaded = load_checkpoint(path)
        assert list(loaded) == list(sd) or set(loaded) == set(sd)
        for k in sd:
            assert torch.equal(loaded[k], sd[k]), (suffix, k)
    nested = tmp_path / "nested.pth"
    torch.save({"module": {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, "epoch": 1}, nested)
    assert set(load_checkpoint(nested)) == set(sd)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown checkpoint format '\.npz'.*\.safetensors"):
        load_checkpoint(tmp_path / "weights.npz")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        save_checkpoint(sd, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()
    # the one suffix check that load / save, `m2pt merge` and the examples share
    assert checkpoint_format(tmp_path / "a.PTH") == ".pth" and checkpoint_format("dir.v1/b.safetensors") == ".safetensors"
    for bad, shown in (("weights", "'(no suffix)'"), ("dir.pth/weights", "'(no suffix)'"), ("w.pth.tmp", "'.tmp'")):
        with pytest.raises(ValueError, match=re.escape(f"unknown checkpoint format {shown} of {bad!r}; use one of .pth")):
            checkpoint_format(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not read"):
        load_checkpoint(tmp_path / "junk.pth")
    # PyTorch's ImageNet example: the state_dict next to tensors of its own (best_acc1)
    torch.save({"epoch": 90, "arch": "vit", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "best_acc1": torch.tensor(81.2), "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "imagenet_example.pth")
    assert set(load_checkpoint(tmp_path / "imagenet_example.pth")) == set(sd)
    torch.save({"epoch": 3, "note": "nothing"}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no tensors found"):
        load_checkpoint(tmp_path / "empty.pth")


def test_timm_pth_tar_checkpoints(tmp_path):
    # timm's train.py writes model_best.pth.tar / last.pth.tar / checkpoint-N.pth.tar with torch.save
    target, aux = toy_pair()
    best = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": aux.state_dict(),
                "optimizer": {"state": {}, "param_groups": []}, "version": 2,
                "args": argparse.Namespace(lr=0.1), "metric": 81.2}, best)
    assert checkpoint_format(best) == ".tar" and checkpoint_format("out/CHECKPOINT-9.PTH.TAR") == ".tar"
    loaded = load_checkpoint(best)
    assert list(loaded) == list(aux.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in aux.state_dict().items())
    add_pathways(target, best)
    assert torch.equal(target.blocks[2].attn.qkv.aux_weight, aux.blocks[2].attn.qkv.weight)
    randomize_scales(target)
    sd = target.state_dict()
    save_checkpoint(sd, tmp_path / "last.pth.tar")
    again = load_checkpoint(tmp_path / "last.pth.tar")
    assert list(again) == list(sd) and all(torch.equal(again[k], v) for k, v in sd.items())


def test_whole_module_under_a_wrapper_key_unwraps_like_a_bare_one(tmp_path):
    """{"model": <nn.Module>, "epoch": 3}: some training scripts torch.save the whole module under a wrapper key."""
    target, aux = toy_pair()
    path = tmp_path / "whole_in_dict.pth"
    torch.save({"model": aux, "epoch": 3}, path)
    loaded = load_checkpoint(path, weights_only=False)
    assert list(loaded) == list(aux.state_dict()) and all(torch.equal(loaded[k], v) for k, v in aux.state_dict().items())
    add_pathways(target, {"model": aux, "epoch": 3})
    assert torch.equal(target.blocks[2].attn.qkv.aux_weight, aux.blocks[2].attn.qkv.weight)


def test_checkpoint_round_trip_through_fresh_pathway_model(tmp_path):
    target, aux = toy_pair()
    add_pathways(target, aux, PathwayConfig(per_channel_scale=True))
    randomize_scales(target)
    save_checkpoint(target.state_dict(), tmp_path / "trained.safetensors")
    fresh = add_pathways(ToyViT(), ToyViT(in_dim=7, classes=11), PathwayConfig(per_channel_scale=True))
    fresh.load_state_dict(load_checkpoint(tmp_path / "trained.safetensors"), strict=True)
    x = torch.randn(2, 6, 10)
    assert torch.equal(fresh(x), target(x))
    plain = ToyViT()
    plain.load_state_dict(merge_state_dict(load_checkpoint(tmp_path / "trained.safetensors")), strict=True)
    assert rel_err(plain(x), target(x).double()) < 1e-5


# ---------------------------------------------------------------------------- Hugging Face name presets
class LegacyHFLayer(nn.Module):
    """transformers 4.x ViTLayer names: attention.attention.{query,key,value}, attention.output.dense, ..."""

    def __init__(self, d):
        super().__init__()
        self.attention = nn.Module()
        self.attention.attention = nn.Module()
        for n in ("query", "key", "value"):
            setattr(self.attention.attention, n, nn.Linear(d, d))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, 2 * d)
        self.output = nn.Module()
        self.output.dense = nn.Linear(2 * d, d)


def test_legacy_hf_vit_preset():
    def make():
        m = nn.Module()
        m.encoder = nn.Module()
        m.encoder.layer = nn.ModuleList([LegacyHFLayer(8) for _ in range(2)])
        m.pooler = nn.Module()
        m.pooler.dense = nn.Linear(8, 8)
        return m
    model = add_pathways(make(), make())
    names = pathway_names(model)
    assert len(names) == 12 and "pooler.dense" not in names
    assert {n.split(".", 3)[3] for n in names} == set(PRESETS["hf_vit_legacy"])


class ClipLayer(nn.Module):
    """Hugging Face CLIP / SigLIP encoder layer names: self_attn.{q,k,v,out}_proj, mlp.fc1/fc2."""

    def __init__(self, d):
        super().__init__()
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, n, nn.Linear(d, d))
        self.mlp = Mlp(d)


def clip_like(depth=2, d=8):
    m = nn.Module()
    m.encoder = nn.Module()
    m.encoder.layers = nn.ModuleList([ClipLayer(d) for _ in range(depth)])
    m.head = nn.Linear(d, 3)
    return m


def test_clip_preset(caplog):
    with caplog.at_level("INFO", logger="m2pt_kernels"):
        model = add_pathways(clip_like(), clip_like())
    names = pathway_names(model)
    assert len(names) == 12 and "head" not in names
    assert {n.split(".", 3)[3] for n in names} == set(PRESETS["hf_clip"])
    assert "preset 'hf_clip'" in caplog.text


def test_preset_must_fit_the_model_whole():
    # only mlp.fc1/fc2 carry a preset's names: an error naming what each preset matched, not 6 of 12 layers
    def partial():
        model = ToyViT()
        for block in model.blocks:
            block.attention = block.attn
            del block.attn
        return model
    target = partial()
    with pytest.raises(ValueError, match=r"no preset fits this model whole \('timm_vit' has mlp\.fc1, mlp\.fc2 but not "
                                         r"attn\.qkv, attn\.proj;.*'hf_clip' has mlp\.fc1, mlp\.fc2 but not "
                                         r"self_attn\.q_proj.*target_modules=\[\.\.\.\]\) explicitly"):
        add_pathways(target, partial())
    assert not pathway_names(target)
    add_pathways(target, partial(),
                 PathwayConfig(target_modules=["attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2"]))
    assert len(pathway_names(target)) == 12
    # a layer kind excluded on purpose keeps the preset
    target, aux = toy_pair()
    add_pathways(target, aux, PathwayConfig(exclude_modules=("head", "attn.qkv")))
    assert pathway_names(target) == [f"blocks.{i}.{n}" for i in range(3) for n in ("attn.proj", "mlp.fc1", "mlp.fc2")]
    # two families in one model: which gets pathways is the user's choice
    def both():
        m = nn.Module()
        m.image, m.text = ToyViT(), clip_like(d=24)
        return m
    target = both()
    with pytest.raises(ValueError, match=r"more than one preset fits this model whole \(timm_vit, hf_clip\)"):
        add_pathways(target, both())
    clip_layers = r"text\.encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)"
    add_pathways(target, both(), PathwayConfig(target_modules=clip_layers))
    assert len(pathway_names(target)) == 12 and all(n.startswith("text.") for n in pathway_names(target))
    # ... and excluding one family's tower leaves the other's preset whole
    target = both()
    add_pathways(target, both(), PathwayConfig(exclude_modules=("head", "text")))
    assert len(pathway_names(target)) == 12 and all(n.startswith("image.blocks.") for n in pathway_names(target))


def test_error_target_with_two_towers_names_the_target():
    """Two towers of the auxiliary's architecture in the target: the error is about the target, not the aux."""
    target = nn.Module()
    target.image, target.video = ToyViT(), ToyViT()
    with pytest.raises(ValueError, match=r"the target holds more than one set of layers .*'image\.', 'video\.'.*"
                                         r"add_pathways\(model\.image, aux\)"):
        add_pathways(target, ToyViT(in_dim=7, classes=11))
    assert not pathway_names(target)


@pytest.mark.parametrize("family", ["CLIP", "Siglip"])
def test_hf_clip_and_siglip_vision_towers_get_every_block_linear(family, caplog):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{family}VisionConfig")(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                            intermediate_size=64, image_size=32, patch_size=8)
    make = lambda: getattr(transformers, f"{family}VisionModel")(config).eval()  # noqa: E731
    target = make()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = target(pixel_values=x).last_hidden_state
    with caplog.at_level("INFO", logger="m2pt_kernels"):
        add_pathways(target, make())
    names = pathway_names(target)
    assert len(names) == 12 and {".".join(n.split(".")[-2:]) for n in names} == set(PRESETS["hf_clip"]), names
    assert "preset 'hf_clip'" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(target(pixel_values=x).last_hidden_state, y0, rtol=0, atol=0)


# ---------------------------------------------------------------------------- real timm / transformers models
def test_timm_vit_tiny_end_to_end(tmp_path):
    timm = pytest.importorskip("timm")
    target = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    aux = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    x = torch.randn(1, 3, 224, 224)
    target.eval()
    with torch.no_grad():
        y0 = target(x)
    add_pathways(target, aux)
    assert len(pathway_names(target)) == 48 and isinstance(target.head, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(target(x), y0, rtol=0, atol=0)
    target.train()
    mark_only_scales_trainable(target)
    opt = torch.optim.SGD([p for p in target.parameters() if p.requires_grad], lr=0.5)
    loss = target(x).logsumexp(-1).sum()
    loss.backward()
    opt.step()
    target.eval()
    with torch.no_grad():
        y_path = target(x)
    assert not torch.equal(y_path, y0)
    ckpt = tmp_path / "merged.safetensors"
    save_checkpoint(merge_state_dict(target.state_dict()), ckpt)
    reloaded = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                 checkpoint_path=str(ckpt)).eval()
    with torch.no_grad():
        assert rel_err(reloaded(x), y_path) < 1e-5
    merge_pathways(target)
    with torch.no_grad():
        assert rel_err(target(x), y_path) < 1e-5


def _tiny_vit_config():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, image_size=32, patch_size=8)


def test_hf_vit_model_end_to_end(tmp_path):
    transformers, cfg = _tiny_vit_config()
    target = transformers.ViTModel(cfg).eval()
    aux = transformers.ViTForImageClassification(cfg)  # prefixed "vit.", other head: pairs by name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = target(x).last_hidden_state
    add_pathways(target, aux)
    names = pathway_names(target)
    linears_per_layer = len(names) // cfg.num_hidden_layers
    assert linears_per_layer == 6 and not any("pooler" in n for n in names)
    with torch.no_grad():
        torch.testing.assert_close(target(x).last_hidden_state, y0, rtol=0, atol=0)
    randomize_scales(target)
    with torch.no_grad():
        y_path = target(x).last_hidden_state
    fresh = transformers.ViTModel(cfg).eval()
    fresh.load_state_dict(merge_state_dict(target.state_dict()), strict=True)
    merge_pathways(target)
    with torch.no_grad():
        assert rel_err(fresh(x).last_hidden_state, y_path) < 1e-5
        assert rel_err(target(x).last_hidden_state, y_path) < 1e-5
    target.save_pretrained(tmp_path / "merged")
    again = transformers.ViTModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert rel_err(again(x).last_hidden_state, y_path) < 1e-5


def test_exports():
    for name in ("FusedCrossModalLinear", "PathwayConfig", "add_pathways", "merge_pathways",
                 "mark_only_scales_trainable", "reparameterize_aux_into_target_model"):
        assert name in m2pt_kernels.__all__ and hasattr(m2pt_kernels, name)


def test_param_groups_split_decay_no_decay_and_scales():
    from m2pt_kernels.pathways import param_groups
    from m2pt_kernels import add_pathways
    from m2pt_kernels.models import vit_for_images

    model = vit_for_images(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    aux = vit_for_images(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=5)
    add_pathways(model, aux)
    model.head.bias.requires_grad_(False)
    groups = param_groups(model, 1e-3, weight_decay=0.1, scale_lr_mult=10.0)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_id) == sum(p.requires_grad for p in model.parameters()), "every trainable parameter once"
    assert id(named["head.bias"]) not in by_id
    scale = by_id[id(named["blocks.0.attn.qkv.cross_modal_scale"])]
    assert scale["lr"] == scale["base_lr"] == 1e-2 and scale["weight_decay"] == 0.0
    assert by_id[id(named["blocks.1.mlp.fc1.weight"])]["weight_decay"] == 0.1
    assert by_id[id(named["tokenizer.pos_embed"])]["weight_decay"] == 0.0
    assert by_id[id(named["blocks.0.norm1.weight"])]["weight_decay"] == 0.0
    assert all(g["params"] for g in groups)


def test_param_groups_no_decay_names_of_timm_and_hugging_face():
    from m2pt_kernels.pathways import param_groups

    model = nn.Module()
    model.embeddings = nn.Module()  # Hugging Face ViT's names
    model.embeddings.position_embeddings = nn.Parameter(torch.randn(1, 5, 4))
    model.embeddings.cls_token = nn.Parameter(torch.randn(1, 1, 4))
    model.embeddings.mask_token = nn.Parameter(torch.randn(1, 1, 4))
    model.position_embedding = nn.Embedding(5, 4)  # CLIP's
    model.reg_token = nn.Parameter(torch.randn(1, 4, 4))  # timm's register and distillation tokens
    model.dist_token = nn.Parameter(torch.randn(1, 1, 4))
    model.relative_position_bias_table = nn.Parameter(torch.randn(9, 2))  # Swin's
    model.fc = nn.Linear(4, 4)
    decay, no_decay = param_groups(model, 1e-3, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and [id(p) for p in decay["params"]] == [id(model.fc.weight)]
    assert len(no_decay["params"]) == 8 and no_decay["weight_decay"] == 0.0


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_merge_pathways_refuses_sharded_layers_and_says_what_to_do():
    """After fully_shard (here a one-process gloo group) the weights are DTensors: merging in place
    is refused, naming the layer, and the full-state_dict route works."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    target, aux = toy_pair()
    plain = copy.deepcopy(target)
    add_pathways(target, aux)
    randomize_scales(target)
    x = torch.randn(2, 5, 10)
    want = target(x)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        fully_shard(target, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv' holds sharded tensors.*merge_state_dict"):
            merge_pathways(target)
        sd = get_model_state_dict(target, options=StateDictOptions(full_state_dict=True))
    finally:
        dist.destroy_process_group()
    plain.load_state_dict(merge_state_dict(sd))
    assert rel_err(plain(x), want) < 1e-5


def test_error_parametrized_target_layer_before_any_change():
    """A weight_norm'ed target layer is refused up front, naming it; the model is left as it was."""
    model = ToyViT()
    nn.utils.parametrizations.weight_norm(model.blocks[1].mlp.fc2)
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(TypeError, match=r"'blocks\.1\.mlp\.fc2' computes its weight on every call"):
        add_pathways(model, ToyViT())
    assert [type(m).__name__ for m in model.modules()] == before


def test_safetensors_checkpoint_gets_the_usual_file_mode(tmp_path):
    """safetensors writes through a 0600 temporary file: a deployed merged model was unreadable to other users."""
    import os
    import stat
    sd = {"w": torch.randn(3, 2)}
    save_checkpoint(sd, tmp_path / "a.safetensors")
    torch.save(sd, tmp_path / "b.pth")
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("a.safetensors") == mode("b.pth")
    old = os.umask(0o077)
    try:
        save_checkpoint(sd, tmp_path / "private.safetensors")
    finally:
        os.umask(old)
    assert mode("private.safetensors") == 0o600


def test_error_target_on_meta_with_an_aux_that_has_values(tmp_path):
    """W' lives on its target's device: on a meta target the auxiliary values were silently dropped (and after
    to_empty W' was uninitialized memory)."""
    _, aux = toy_pair()
    with torch.device("meta"):
        target = ToyViT()
    for source in (aux, aux.state_dict()):
        with pytest.raises(ValueError, match=r"target layer 'blocks\.0\.attn\.qkv' is on the meta device but the "
                                             r"auxiliary 'blocks\.0\.attn\.qkv\.weight' holds values"):
            add_pathways(target, source)
        assert not pathway_names(target)


def test_error_adding_pathways_to_a_wrapped_model(monkeypatch):
    """After DDP the new λ would never be all-reduced; after fully_shard the weights are DTensors."""
    target, aux = toy_pair()
    fake_ddp = type("DistributedDataParallel", (nn.parallel.DistributedDataParallel,), {})
    wrapped = nn.Module.__new__(fake_ddp)
    nn.Module.__init__(wrapped)
    wrapped.module = target
    with pytest.raises(TypeError, match="wrapped in DistributedDataParallel.*Add pathways to the plain model, then wrap"):
        add_pathways(wrapped, aux)
    DTensor = type("DTensor", (torch.Tensor,), {})  # what the check looks for: the type's name, as for merge_pathways
    qkv = target.blocks[1].attn.qkv
    qkv.weight = nn.Parameter(qkv.weight.detach().as_subclass(DTensor))
    with pytest.raises(TypeError, match=r"'blocks\.1\.attn\.qkv' is already sharded .*DTensor"):
        add_pathways(target, aux)
    assert not pathway_names(target)


def test_merge_state_dict_refuses_a_sharded_state_dict():
    target, aux = toy_pair()
    sd = add_pathways(target, aux, PathwayConfig(aux_trainable=False)).state_dict()
    DTensor = type("DTensor", (torch.Tensor,), {})
    sd["blocks.0.mlp.fc1.weight"] = sd["blocks.0.mlp.fc1.weight"].as_subclass(DTensor)
    with pytest.raises(ValueError, match=r"'blocks\.0\.mlp\.fc1\.weight' is a shard \(DTensor.*full_state_dict=True"):
        merge_state_dict(sd)


def test_averaged_model_checkpoint_loads_and_merges(tmp_path):
    """torch.optim.swa_utils.AveragedModel (EMA) state_dicts: module.* keys next to n_averaged."""
    target, aux = toy_pair()
    add_pathways(target, aux, PathwayConfig(scale_init=0.3))
    ema = torch.optim.swa_utils.AveragedModel(target)
    path = tmp_path / "ema.pth"
    torch.save(ema.state_dict(), path)
    sd = load_checkpoint(path)
    assert "n_averaged" not in sd and set(sd) == set(target.state_dict())
    plain = ToyViT()
    plain.load_state_dict(merge_state_dict(sd), strict=True)
    x = torch.randn(2, 6, 10)
    with torch.no_grad():
        assert rel_err(plain(x), target(x)) < 1e-5


@pytest.mark.parametrize("hook", ["weight_norm", "spectral_norm"])
def test_error_hook_based_weight_norm_target(hook):
    """The older hook-based weight_norm / spectral_norm keep W as a plain tensor attribute (no grad_fn after a
    no_grad forward, or right after spectral_norm's registration): refused too, with the matching remedy."""
    model = ToyViT()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        getattr(nn.utils, hook)(model.blocks[0].mlp.fc1)
    with torch.no_grad():
        model(torch.randn(1, 4, 10))
    with pytest.raises(TypeError, match=r"'blocks\.0\.mlp\.fc1' computes its weight on every call.*"
                                        r"remove_weight_norm\(module\) / remove_spectral_norm"):
        add_pathways(model, ToyViT())
    assert not pathway_names(model)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_auxiliary_weight_is_refused_before_anything_changes(value):
    """0·inf is NaN: an auxiliary weight holding inf / NaN would make every output NaN even at λ = 0."""
    target = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    aux = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    with torch.no_grad():
        aux[1].weight[2, 3] = value
    with pytest.raises(ValueError, match=r"add_pathways: the auxiliary '1\.weight' \(partner of '1'\) has 1 non-finite"):
        add_pathways(target, aux, PathwayConfig(target_modules=["0", "1"]))
    assert all(type(m) is nn.Linear for m in target)


def test_param_groups_refuses_bad_numbers_and_a_non_module():
    """lr=nan made every parameter NaN after one step, scale_lr_mult=-10 gave λ a negative learning rate, and
    lr="3e-3" with scale_lr_mult=2 gave λ the lr '3e-33e-3'; param_groups(None) failed inside named_parameters."""
    import numpy as np
    from m2pt_kernels.pathways import param_groups

    target, aux = toy_pair()
    add_pathways(target, aux)
    for kw, shown in ((dict(lr=float("nan")), "lr must be finite and non-negative, got nan; pass e.g. lr=1e-3"),
                      (dict(lr=-1e-3), "lr must be finite and non-negative, got -0.001"),
                      (dict(lr=torch.tensor(float("inf"))), "lr must be finite and non-negative, got inf"),
                      (dict(lr=1e-3, weight_decay=float("inf")), "weight_decay must be finite and non-negative, got inf"),
                      (dict(lr=1e-3, scale_lr_mult=-10), "scale_lr_mult must be finite and non-negative, got -10.0")):
        with pytest.raises(ValueError, match=re.escape(f"param_groups: {shown}")):
            param_groups(target, **kw)
    for kw, name, shown in ((dict(lr="3e-3", scale_lr_mult=2), "lr", "'3e-3' (str)"),
                            (dict(lr=True), "lr", "True (bool)"),
                            (dict(lr=1e-3, weight_decay=None), "weight_decay", "None (NoneType)"),
                            (dict(lr=1e-3, scale_lr_mult="10"), "scale_lr_mult", "'10' (str)")):
        with pytest.raises(TypeError, match=re.escape(f"param_groups: {name} must be a real number, got {shown}; "
                                                      "pass a float (convert")):
            param_groups(target, **kw)
    with pytest.raises(TypeError, match="param_groups: model must be an nn.Module, got NoneType"):
        param_groups(None, 1e-3)
    # numpy scalars, ints and zero are numbers; a one-element tensor lr is what torch's optimizers also take
    groups = param_groups(target, np.float64(1e-3), weight_decay=0, scale_lr_mult=np.int64(10))
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 1e-2] and groups[0]["weight_decay"] == 0.0
    assert all(type(g["lr"]) is float for g in groups)
    groups = param_groups(target, torch.tensor(1e-3), scale_lr_mult=10)
    assert abs(float(groups[2]["lr"]) - 1e-2) < 1e-9
    torch.optim.AdamW(groups)


def test_nested_checkpoint_is_a_pathway_state_dict_and_merges_flat(tmp_path):
    """{"model": sd, "epoch": 3} (the paper's format, which load_checkpoint unwraps) was "not a pathway
    state_dict", and merge_state_dict called it "already merged or a plain model"."""
    target, aux = toy_pair()
    add_pathways(target, aux)
    randomize_scales(target)
    sd = target.state_dict()
    flat = merge_state_dict(sd)
    for ckpt in ({"model": sd, "epoch": 3}, {"state_dict": {f"module.{k}": v for k, v in sd.items()},
                                             "optimizer": {"state": {}, "param_groups": []}}, target):
        assert is_pathway_state_dict(ckpt)
        merged = merge_state_dict(ckpt)
        assert list(merged) == list(flat) and all(torch.equal(merged[k], v) for k, v in flat.items())
    assert not is_pathway_state_dict({"model": flat, "epoch": 3})
    with pytest.raises(ValueError, match="already merged or a plain model"):
        merge_state_dict({"model": flat, "epoch": 3})
    # a flat state_dict keeps its keys as they are (a DDP model's state_dict() keeps module.)
    assert list(merge_state_dict({f"module.{k}": v for k, v in sd.items()})) == [f"module.{k}" for k in flat]
    path = tmp_path / "nested.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    for fn in (is_pathway_state_dict, merge_state_dict):
        for arg in (str(path), path):
            with pytest.raises(TypeError, match=re.escape(f"{fn.__name__}: state_dict must be a state_dict (a mapping "
                                                          f"of names to tensors), got the path {str(path)!r}; read the "
                                                          f"file first: {fn.__name__}(load_checkpoint(path))")):
                fn(arg)
        with pytest.raises(TypeError, match=f"{fn.__name__}: state_dict must be a state_dict .* got NoneType"):
            fn(None)
    assert is_pathway_state_dict(load_checkpoint(path))


def test_save_checkpoint_refuses_what_load_checkpoint_could_not_read_back(tmp_path):
    """Meta tensors were written (and loaded back as meta, or "Cannot copy out of meta tensor" for safetensors),
    an int key wrote a file load_checkpoint refused, {} wrote an empty file, None failed inside .items()."""
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"out{suffix}"
        with pytest.raises(ValueError, match=r"save_checkpoint: 'blocks\.0\.w' is on the meta device \(and 1 more\): it "
                                             r"holds no values .*Load the weights first"):
            save_checkpoint({"a": torch.zeros(2), "blocks.0.w": torch.zeros(2, device="meta"),
                             "b": torch.zeros(2, device="meta")}, path)
        with torch.device("meta"):
            meta_model = ToyViT()
        with pytest.raises(ValueError, match="save_checkpoint: 'embed.weight' is on the meta device"):
            save_checkpoint(meta_model, path)
        with pytest.raises(TypeError, match=r"save_checkpoint: keys must be str .*key 1 is int"):
            save_checkpoint({"w": torch.zeros(2), 1: torch.zeros(2)}, path)
        with pytest.raises(ValueError, match=re.escape(f"save_checkpoint: the state_dict is empty: nothing to write to "
                                                       f"{str(path)!r}")):
            save_checkpoint({}, path)
        with pytest.raises(TypeError, match=r"save_checkpoint: state_dict must be a mapping of names to tensors .*"
                                            r"or an nn.Module, got NoneType"):
            save_checkpoint(None, path)
        assert not path.exists()
    with pytest.raises(TypeError, match=r"save_checkpoint: path must be a file path \(a str or os.PathLike\), got None"):
        save_checkpoint({"w": torch.zeros(2)}, None)
    for fn in (load_checkpoint, checkpoint_format):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: path must be a file path \(a str or os.PathLike\), got "
                                            r"None \(NoneType\); pass the checkpoint file's name"):
            fn(None)


def test_load_checkpoint_names_a_corrupt_or_misnamed_safetensors_file(tmp_path):
    """safetensors' "header too large" did not say which file (the .pth branch already names it)."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"x" * 64)
    with pytest.raises(RuntimeError, match=re.escape(f"load_checkpoint: could not read {str(junk)!r} as a safetensors "
                                                     "file (") + r".*\); is the file complete\?"):
        load_checkpoint(junk)
    misnamed = tmp_path / "misnamed.safetensors"
    torch.save({"w": torch.zeros(2)}, misnamed)
    with pytest.raises(RuntimeError, match=re.escape(f"could not read {str(misnamed)!r} as a safetensors file (")
                       + r".*\): it looks like a torch.save file; rename it to \.pth"):
        load_checkpoint(misnamed)


def test_bad_regex_names_the_option_and_the_pattern():
    """A bad regex in target_modules / exclude_modules was a bare re.error from inside add_pathways."""
    for what in ("target_modules", "exclude_modules"):
        with pytest.raises(ValueError, match=re.escape(f"PathwayConfig.{what}: 'blocks.(' is not a valid regular "
                                                       "expression (missing ), unterminated subpattern")):
            PathwayConfig(**{what: "blocks.("})
        config = PathwayConfig()
        setattr(config, what, "[a")  # changed after construction: add_pathways checks again, before any change
        target, aux = toy_pair()
        with pytest.raises(ValueError, match=re.escape(f"PathwayConfig.{what}: '[a' is not a valid regular expression")):
            add_pathways(target, aux, config)
        assert not pathway_names(target)


def test_whole_model_functions_refuse_a_non_module_and_bad_modules_to_save():
    with pytest.raises(TypeError, match="merge_pathways: model must be an nn.Module, got NoneType"):
        merge_pathways(None)
    with pytest.raises(TypeError, match="mark_only_scales_trainable: model must be an nn.Module, got NoneType"):
        mark_only_scales_trainable(None)
    target, aux = toy_pair()
    add_pathways(target, aux)
    before = {n: p.requires_grad for n, p in target.named_parameters()}
    for bad in (None, [1], 3):
        with pytest.raises(TypeError, match=re.escape(f"mark_only_scales_trainable: modules_to_save must be a module "
                                                      f"name or a list of names, got {bad!r}; pass () to train only λ")):
            mark_only_scales_trainable(target, modules_to_save=bad)
    assert {n: p.requires_grad for n, p in target.named_parameters()} == before


def test_reparameterize_refuses_wrong_argument_types():
    """main_body_name=123 or layer_names=[1] gave "decoding to str: need a bytes-like object", layer_names=None
    "'NoneType' object is not iterable"."""
    target, aux = toy_pair()
    with pytest.raises(TypeError, match=re.escape("reparameterize_aux_into_target_model: main_body_name must be the "
                                                  "name of the target's block list (a str such as 'blocks') or None "
                                                  "(the models are the block lists), got 123 (int)")):
        reparameterize_aux_into_target_model(target, aux, main_body_name=123)
    for bad in ([1], None, ("attn.qkv", b"mlp.fc1")):
        with pytest.raises(TypeError, match=re.escape("reparameterize_aux_into_target_model: layer_names must be a list "
                                                      "of the layer names inside each block (str, e.g. ('attn.qkv', "
                                                      f"'attn.proj', 'mlp.fc1', 'mlp.fc2'), the default), got {bad!r}")):
            reparameterize_aux_into_target_model(target, aux, layer_names=bad)
    with pytest.raises(ValueError, match="reparameterize_aux_into_target_model: layer_names is empty"):
        reparameterize_aux_into_target_model(target, aux, layer_names=[])
    with pytest.raises(TypeError, match="reparameterize_aux_into_target_model: target_model must be an nn.Module, "
                                        "got NoneType"):
        reparameterize_aux_into_target_model(None, aux)
    assert not pathway_names(target)
    reparameterize_aux_into_target_model(target, aux, layer_names=iter(["mlp.fc1"]))  # any iterable of names
    assert pathway_names(target) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1"]
