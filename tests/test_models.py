"""m2pt_kernels.models: tokenizer shapes, FPS / kNN against brute force, point-order invariance,
and pathways from a model of one modality into a model of another through the shared block names."""
import importlib.util
import re

import pytest
import torch

from m2pt_kernels.models import (AudioPatchEmbed, ImagePatchEmbed, PointCloudEmbed, VideoTubeletEmbed,
                                 VisionTransformer, farthest_point_sample, group_points, knn_indices,
                                 vit_for_audio, vit_for_images, vit_for_point_clouds, vit_for_video)

D, DEPTH, HEADS = 32, 2, 4
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _small(kind: str, num_classes: int = 5) -> VisionTransformer:
    common = dict(embed_dim=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0, num_classes=num_classes)
    if kind == "image":
        return vit_for_images(img_size=(16, 12), patch_size=4, in_chans=3, **common)
    if kind == "audio":
        return vit_for_audio(n_freq=20, n_time=36, patch_size=8, stride=6, **common)
    if kind == "video":
        return vit_for_video(num_frames=4, img_size=8, patch_size=4, tubelet_size=2, in_chans=3, **common)
    return vit_for_point_clouds(num_groups=8, group_size=6, hidden=16, **common)


INPUTS = {
    "image": (lambda b: torch.randn(b, 3, 16, 12), 4 * 3),
    "audio": (lambda b: torch.randn(b, 1, 20, 36), 3 * 5),  # (20-8)//6+1=3, (36-8)//6+1=5
    "video": (lambda b: torch.randn(b, 3, 4, 8, 8), 2 * 2 * 2),
    "point_cloud": (lambda b: torch.randn(b, 50, 3), 8),
}


@pytest.mark.parametrize("kind", ["image", "audio", "video", "point_cloud"])
def test_tokenizer_and_model_shapes(kind):
    model = _small(kind)
    make, n_tokens = INPUTS[kind]
    x = make(3)
    tokens = model.tokenizer(x)
    assert tokens.shape == (3, n_tokens, D)
    assert model.tokenizer.num_tokens == n_tokens
    assert model.forward_features(x).shape == (3, n_tokens + 1, D)
    out = model(x)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    names = dict(model.named_modules())
    for i in range(DEPTH):
        for lin in BLOCK_LINEARS:
            assert isinstance(names[f"blocks.{i}.{lin}"], torch.nn.Linear)
    assert {"norm", "head", "blocks.0.norm1", "blocks.0.norm2"} <= names.keys()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"ImagePatchEmbed expects images of shape \['B', 3, 16, 12\], got \[2, 3, 16, 16\]"):
        _small("image")(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="PointCloudEmbed"):
        _small("point_cloud")(torch.randn(2, 50, 2))
    with pytest.raises(ValueError, match="at least"):
        _small("point_cloud")(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="embed_dim"):
        VisionTransformer(ImagePatchEmbed(8, 4, 3, 16), embed_dim=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="multiple"):
        ImagePatchEmbed(10, 4, 3, 16)
    with pytest.raises(ValueError, match="stride"):
        AudioPatchEmbed(20, 20, 4, 6, 16)
    with pytest.raises(ValueError, match="multiples"):
        VideoTubeletEmbed(3, 8, 4, 2, 3, 16)


def _fps_brute(points, m, start):
    """One cloud, plain Python: the textbook greedy farthest-point sampling."""
    pts = points.double().tolist()
    d2 = lambda a, b: sum((u - v) ** 2 for u, v in zip(a, b))  # noqa: E731
    chosen = [start]
    while len(chosen) < m:
        best, best_d = None, -1.0
        for j, p in enumerate(pts):
            d = min(d2(p, pts[c]) for c in chosen)
            if d > best_d:  # strict: ties go to the lowest index
                best, best_d = j, d
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("start", ["farthest", 0, 7])
def test_fps_matches_brute_force(start):
    pts = torch.randn(3, 40, 3) * torch.tensor([1.0, 2.0, 0.5])
    idx = farthest_point_sample(pts, 12, start=start)
    assert idx.shape == (3, 12)
    for b in range(3):
        if start == "farthest":
            c = pts[b].double().mean(0)
            s = int(((pts[b].double() - c) ** 2).sum(-1).argmax())
        else:
            s = start
        assert idx[b].tolist() == _fps_brute(pts[b], 12, s)
        assert len(set(idx[b].tolist())) == 12


def test_fps_spreads_points():
    # two tight clusters far apart: FPS must take a point from each before a second from either
    a = torch.randn(1, 30, 3) * 0.01
    b = torch.randn(1, 30, 3) * 0.01 + 10.0
    idx = farthest_point_sample(torch.cat([a, b], 1), 2, start=0)[0].tolist()
    assert (idx[0] < 30) != (idx[1] < 30)
    # the minimum pairwise distance of FPS samples is at least that of the first m points
    pts = torch.rand(2, 200, 3)
    sel = pts[torch.arange(2)[:, None], farthest_point_sample(pts, 16)]
    first = pts[:, :16]
    mind = lambda s: (torch.cdist(s, s) + 1e9 * torch.eye(16)).amin(dim=(1, 2))  # noqa: E731
    assert (mind(sel) > mind(first)).all()


def test_fps_bad_args():
    with pytest.raises(ValueError, match="num_samples"):
        farthest_point_sample(torch.randn(1, 5, 3), 6)
    with pytest.raises(ValueError, match="start"):
        farthest_point_sample(torch.randn(1, 5, 3), 2, start=9)
    with pytest.raises(ValueError, match=r"\[B, P, 3\]"):
        farthest_point_sample(torch.randn(5, 3), 2)


def test_knn_matches_brute_force():
    q, p = torch.randn(2, 7, 3), torch.randn(2, 33, 3)
    idx = knn_indices(q, p, 5)
    assert idx.shape == (2, 7, 5)
    for b in range(2):
        for i in range(7):
            d = [float(((q[b, i].double() - p[b, j].double()) ** 2).sum()) for j in range(33)]
            expected = sorted(range(33), key=lambda j: d[j])[:5]
            assert set(idx[b, i].tolist()) == set(expected)
            got_d = [d[j] for j in idx[b, i].tolist()]
            assert got_d == sorted(got_d)


def _knn_exact(q, p, k):
    """k nearest in float64 of the very same (already rounded) coordinates, nearest first."""
    d = ((q.double().unsqueeze(2) - p.double().unsqueeze(1)) ** 2).sum(-1)
    return d, d.topk(k, dim=-1, largest=False).indices


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 3000.0)])
def test_knn_and_fps_of_low_precision_points_measure_in_fp32(dtype, scale):
    # bf16 squared distances keep 3 digits (neighbours reorder); fp16 ones overflow past 65504
    # (clouds in mm): both must still give the exact neighbourhoods of the rounded coordinates
    pts = (torch.rand(2, 512, 3) * scale).to(dtype)
    q = pts[:, :32]
    idx = knn_indices(q, pts, 16)
    d, expected = _knn_exact(q, pts, 16)
    # compare distances, not indices: exact ties (duplicate rounded points) may go either way
    assert torch.equal(d.gather(-1, idx), d.gather(-1, expected))
    got = farthest_point_sample(pts, 16, start=0)
    for b in range(2):  # each greedy step takes a farthest point, up to fp32 rounding (ties may go either way)
        p64 = pts[b].double()
        for i in range(1, 16):
            md = torch.cdist(p64, p64[got[b, :i]]).amin(dim=1) ** 2
            assert md[got[b, i]] >= md.max() * (1 - 1e-5), (b, i)


def test_fps_and_knn_keep_float64():
    # a near tie that fp32 rounding resolves the wrong way: the exact second sample is point 3
    pts = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [1 + 1e-9, 0, 0], [0, 1 + 2e-9, 0]]], dtype=torch.float64)
    assert farthest_point_sample(pts, 2, start=0)[0].tolist() == [0, 3]
    assert knn_indices(pts[:, 1:2], pts, 2)[0, 0].tolist() == [1, 2]


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="ImagePatchEmbed: patch_size must be a positive integer, got 0"):
        ImagePatchEmbed(224, 0)
    with pytest.raises(ValueError, match="ImagePatchEmbed: patch_size must be a positive integer or a pair"):
        ImagePatchEmbed(224, 16.0)
    with pytest.raises(ValueError, match="AudioPatchEmbed: stride must be a positive integer, got 0"):
        AudioPatchEmbed(stride=0)
    with pytest.raises(ValueError, match="VideoTubeletEmbed: tubelet_size must be a positive integer, got 0"):
        VideoTubeletEmbed(tubelet_size=0)
    with pytest.raises(ValueError, match="PointCloudEmbed: group_size"):
        PointCloudEmbed(num_groups=8, group_size=0)
    with pytest.raises(ValueError, match="PointCloudEmbed: fps_start must be 'farthest' or a point index"):
        PointCloudEmbed(fps_start="random")
    # widths: a zero-width model used to build, a float width to fail inside torch.empty
    for make in (lambda e: ImagePatchEmbed(32, 8, embed_dim=e), lambda e: AudioPatchEmbed(32, 32, embed_dim=e),
                 lambda e: VideoTubeletEmbed(2, 16, 8, embed_dim=e), lambda e: PointCloudEmbed(4, 4, embed_dim=e)):
        for bad, error in ((0, ValueError), (16.0, TypeError)):
            with pytest.raises(error, match=f"Embed: embed_dim must be a positive integer, got {bad}"):
                make(bad)
    with pytest.raises(ValueError, match="PointCloudEmbed: hidden must be a positive integer, got 0"):
        PointCloudEmbed(4, 4, embed_dim=8, hidden=0)
    tok = PointCloudEmbed(num_groups=4, group_size=4, embed_dim=8, hidden=4, fps_start=60)
    with pytest.raises(ValueError, match="PointCloudEmbed: fps_start=60 is not a point index of clouds of 50"):
        tok(torch.randn(1, 50, 3))
    np = pytest.importorskip("numpy")
    img = ImagePatchEmbed(np.int64(16), (np.int64(8), 4), 3, 8)  # NumPy ints are sizes too
    assert img.img_size == (16, 16) and img.patch_size == (8, 4) and img.num_tokens == 8
    assert PointCloudEmbed(np.int64(4), 4, 8, 4, fps_start=np.int64(1))(torch.randn(1, 9, 3)).shape == (1, 4, 8)


VIT_BAD_SIZES = [  # (argument, value, error, message): each used to build, or fail later with a raw error
    ("mlp_ratio", "4", TypeError,
     r"mlp_ratio must be a real number \(the MLP width over embed_dim, e.g. 4.0\), got str '4'"),
    ("mlp_ratio", True, TypeError, "mlp_ratio must be a real number"),
    ("mlp_ratio", -1, ValueError, r"mlp_ratio must be a positive finite number \(the MLP .*\), got -1"),
    ("mlp_ratio", float("nan"), ValueError, "mlp_ratio must be a positive finite number"),
    ("mlp_ratio", 0.01, ValueError,
     r"mlp_ratio=0.01 gives an MLP of int\(8 \* 0.01\) = 0 units; use mlp_ratio ≥ 1/8"),
    ("depth", -1, ValueError, "depth must be a positive integer, got -1"),
    ("depth", 0, ValueError, "depth must be a positive integer, got 0"),
    ("depth", 2.0, TypeError, r"depth must be a positive integer, got 2.0 \(float\)"),
    ("num_classes", -1, ValueError, "num_classes must be a non-negative integer, got -1"),
    ("num_classes", 2.5, TypeError, r"num_classes must be a non-negative integer, got 2.5 \(float\)"),
    ("num_heads", 0, ValueError, "num_heads must be a positive integer, got 0"),
    ("num_heads", -2, ValueError, "num_heads must be a positive integer, got -2"),
    ("num_heads", 2.0, TypeError, r"num_heads must be a positive integer, got 2.0 \(float\)"),
    ("num_heads", 3, ValueError, "embed_dim=8 is not divisible by num_heads=3; use a num_heads that divides embed_dim"),
]


def test_vit_sizes_are_checked_up_front():
    small = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2, num_classes=3)
    for arg, value, exc, message in VIT_BAD_SIZES:
        with pytest.raises(exc, match=f"^VisionTransformer: {message}"):
            vit_for_images(**{**small, arg: value})
    from m2pt_kernels.models import Attention, Block, Mlp
    with pytest.raises(TypeError, match="Block: mlp_ratio must be a real number .* got str '4'"):
        Block(2, 1, mlp_ratio="4")  # was int(2 * "4"): a 44-wide MLP (44,444,444 at embed_dim 8)
    with pytest.raises(ValueError, match="Attention: num_heads must be a positive integer, got 0"):
        Attention(8, 0)  # was a ZeroDivisionError
    with pytest.raises(ValueError, match="Attention: embed_dim=8 is not divisible by num_heads=3"):
        Attention(8, 3)
    with pytest.raises(TypeError, match=r"Mlp: hidden must be a positive integer, got 2.5 \(float\)"):
        Mlp(8, 2.5)
    # still accepted: no head for num_classes=0 (the features), NumPy integers and floats
    x = torch.randn(2, 1, 8, 8)
    assert vit_for_images(**{**small, "num_classes": 0})(x).shape == (2, 8)
    np = pytest.importorskip("numpy")
    model = vit_for_images(**{**small, "depth": np.int64(2), "num_heads": np.int64(4), "mlp_ratio": np.float64(1.5)})
    assert len(model.blocks) == 2 and model.blocks[0].attn.num_heads == 4
    assert model.blocks[0].mlp.fc1.out_features == 12
    assert model(x).shape == (2, 3)


def test_point_helpers_need_int_counts():
    """A float count used to fail inside torch ("empty()/topk() must be int"), True to count as 1."""
    pts = torch.randn(2, 10, 3)
    for bad in (2.0, "2", True, None):
        got = re.escape(f"got {bad!r} ({type(bad).__name__})")
        with pytest.raises(TypeError, match=f"farthest_point_sample: num_samples must be a positive integer, {got}"):
            farthest_point_sample(pts, bad)
        with pytest.raises(TypeError, match=f"knn_indices: k must be a positive integer, {got}"):
            knn_indices(pts, pts, bad)
    with pytest.raises(TypeError, match=r"group_points: group_size must be a positive integer, got 2.0 \(float\)"):
        group_points(pts, 2, 2.0)
    with pytest.raises(TypeError, match=r"group_points: num_groups must be a positive integer, got 2.0 \(float\)"):
        group_points(pts, 2.0, 2)
    np = pytest.importorskip("numpy")
    assert farthest_point_sample(pts, np.int64(3)).shape == (2, 3)
    assert knn_indices(pts, pts, np.int64(2)).shape == (2, 10, 2)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1e-4, 0.9999])
def test_digits_split_rejects_a_fraction_that_empties_a_side(fraction):
    pytest.importorskip("sklearn")
    from m2pt_kernels.demo_data import load_digits_split
    with pytest.raises(ValueError, match="load_digits_split: test_fraction"):
        load_digits_split(test_fraction=fraction)


def test_group_points_are_relative_neighbourhoods():
    pts = torch.randn(2, 30, 3)
    centers, groups = group_points(pts, 4, 5, start=0)
    assert centers.shape == (2, 4, 3) and groups.shape == (2, 4, 5, 3)
    assert torch.equal(centers[:, 0], pts[:, 0])
    assert torch.allclose(groups[:, :, 0], torch.zeros(2, 4, 3))  # nearest neighbour of a center is itself


def test_point_tokenizer_is_invariant_to_point_order():
    torch.manual_seed(0)
    tok = PointCloudEmbed(num_groups=8, group_size=6, embed_dim=D, hidden=16, fps_start="farthest").eval()
    pts = torch.randn(2, 64, 3)
    perm = torch.randperm(64)
    with torch.no_grad():
        a, b = tok(pts), tok(pts[:, perm])
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    # with a fixed start index the centers depend on which point comes first
    tok0 = PointCloudEmbed(num_groups=8, group_size=6, embed_dim=D, hidden=16, fps_start=0).eval()
    tok0.load_state_dict(tok.state_dict())
    with torch.no_grad():
        c, d = tok0(pts), tok0(pts[:, perm])
    assert not torch.allclose(c, d, atol=1e-3)


def test_model_is_deterministic_and_batch_independent():
    model = _small("point_cloud").eval()
    x = torch.randn(4, 50, 3)
    with torch.no_grad():
        full = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(full, single, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("m2pt_kernels.pathways") is None,
                    reason="m2pt_kernels.pathways not in the tree yet")
@pytest.mark.parametrize("aux_kind,target_kind", [("point_cloud", "image"), ("audio", "video"), ("video", "point_cloud")])
def test_aux_of_one_modality_gives_pathways_to_another(aux_kind, target_kind):
    from m2pt_kernels.layers import FusedCrossModalLinear
    from m2pt_kernels.pathways import add_pathways, merge_pathways

    target, aux = _small(target_kind), _small(aux_kind, num_classes=3)
    target.eval()  # deterministic forward (no dropout anyway); λ=0 must reproduce the plain model
    x = INPUTS[target_kind][0](2)
    with torch.no_grad():
        before = target(x)
    returned = add_pathways(target, aux)
    assert returned is target
    names = dict(target.named_modules())
    aux_names = dict(aux.named_modules())
    for i in range(DEPTH):
        for lin in BLOCK_LINEARS:
            layer = names[f"blocks.{i}.{lin}"]
            assert isinstance(layer, FusedCrossModalLinear), f"blocks.{i}.{lin} is {type(layer).__name__}"
            assert torch.equal(layer.aux_weight, aux_names[f"blocks.{i}.{lin}"].weight)
    assert type(names["head"]) is torch.nn.Linear
    assert not any(isinstance(m, FusedCrossModalLinear) for n, m in names.items() if n.startswith("tokenizer"))
    with torch.no_grad():
        assert torch.allclose(target(x), before, atol=1e-6)  # λ = 0: unchanged
        for n, p in target.named_parameters():
            if n.endswith("cross_modal_scale"):
                p.fill_(0.3)
        with_pathways = target(x)
    merge_pathways(target)
    assert not any(isinstance(m, FusedCrossModalLinear) for m in target.modules())
    with torch.no_grad():
        assert torch.allclose(target(x), with_pathways, atol=1e-5)
    plain = _small(target_kind)
    plain.load_state_dict(target.state_dict(), strict=True)
