"""Tokenizers of the paper's four modalities: images, audio spectrograms, video, point clouds.

Every tokenizer maps its modality's input to tokens ``[B, L, embed_dim]`` with the position
embedding already added, so one block stack (``m2pt_kernels.models.VisionTransformer``) serves any
modality and two models of different modalities share the block names the pathway converter pairs.

=====================  =========================  ==========================================
tokenizer              input                      tokens
=====================  =========================  ==========================================
``ImagePatchEmbed``    ``[B, C, H, W]``           ``(H/p)·(W/p)`` patches (conv, stride p)
``AudioPatchEmbed``    ``[B, 1, freq, time]``     AST-style spectrogram patches (stride ≤ p)
``VideoTubeletEmbed``  ``[B, C, T, H, W]``        ``(T/t)·(H/p)·(W/p)`` tubelets (3-D conv)
``PointCloudEmbed``    ``[B, P, 3]``              ``num_groups`` groups: FPS centers + kNN,
                                                  mini-PointNet, position from the centers
=====================  =========================  ==========================================
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import check_size

__all__ = [
    "Tokenizer",
    "ImagePatchEmbed",
    "AudioPatchEmbed",
    "VideoTubeletEmbed",
    "PointCloudEmbed",
    "farthest_point_sample",
    "knn_indices",
    "group_points",
]


def _is_index(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _positive_int(v, name: str, owner: str) -> int:
    """``v`` as an int if it is a positive integer (the package's size rule, ``check_size``)."""
    return check_size(owner, name, v, 1)


def _pair(v, name: str, owner: str) -> tuple[int, int]:
    """An int or a pair of ints (sizes: positive) as a pair, else a ValueError naming the argument."""
    if _is_index(v):
        v = (v, v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a positive integer or a pair of them, got {v!r}") from None
    return _positive_int(a, name, owner), _positive_int(b, name, owner)


def _float_dtype(t: Tensor) -> torch.dtype:
    """The dtype to measure point distances in: fp32 for bf16 / fp16 (whose squared distances round
    to 3 digits, or overflow past 65504 in fp16), the input's own for fp32 / fp64."""
    return torch.promote_types(t.dtype, torch.float32)


class Tokenizer(nn.Module):
    """Base class: ``forward(x) -> [B, num_tokens, embed_dim]`` with position embedding added."""

    embed_dim: int
    num_tokens: int
    modality: str = "generic"

    def _check_shape(self, x: Tensor, expected: tuple, what: str) -> None:
        """``expected``: one entry per dim, ``None`` for any size."""
        ok = x.dim() == len(expected) and all(e is None or s == e for s, e in zip(x.shape, expected))
        if not ok:
            shown = ["B" if i == 0 else ("*" if e is None else e) for i, e in enumerate(expected)]
            raise ValueError(
                f"{type(self).__name__} expects {what} of shape {shown}, got {list(x.shape)}"
            )


class _GridTokenizer(Tokenizer):
    """A conv tokenizer on a fixed grid with a learned position embedding per grid cell."""

    def _init_pos(self, num_tokens: int, embed_dim: int) -> None:
        self.num_tokens = num_tokens
        self.embed_dim = embed_dim
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _tokens(self, feat: Tensor) -> Tensor:
        # feat: [B, D, *grid] -> [B, L, D]
        return feat.flatten(2).transpose(1, 2) + self.pos_embed


class ImagePatchEmbed(_GridTokenizer):
    """Image ``[B, C, H, W]`` -> non-overlapping ``patch_size`` patches (ViT)."""

    modality = "image"

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        name = type(self).__name__
        embed_dim = _positive_int(embed_dim, "embed_dim", name)
        self.img_size, self.patch_size = _pair(img_size, "img_size", name), _pair(patch_size, "patch_size", name)
        self.in_chans = _positive_int(in_chans, "in_chans", name)
        for s, p in zip(self.img_size, self.patch_size):
            if s % p:
                raise ValueError(f"ImagePatchEmbed: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self._init_pos(self.grid[0] * self.grid[1], embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        self._check_shape(x, (None, self.in_chans, *self.img_size), "images")
        return self._tokens(self.proj(x))


class AudioPatchEmbed(_GridTokenizer):
    """Spectrogram ``[B, 1, freq, time]`` -> patches, AST-style (overlapping when ``stride < patch``).

    As in AST, trailing frequency bins or frames that do not fill a last patch (fewer than
    ``stride`` of them past it) reach no token; ``grid`` gives the patches per axis."""

    modality = "audio"

    def __init__(self, n_freq=128, n_time=1024, patch_size=16, stride=10, embed_dim=768):
        super().__init__()
        name = type(self).__name__
        embed_dim = _positive_int(embed_dim, "embed_dim", name)
        self.n_freq, self.n_time = _positive_int(n_freq, "n_freq", name), _positive_int(n_time, "n_time", name)
        self.patch_size, self.stride = _pair(patch_size, "patch_size", name), _pair(stride, "stride", name)
        if any(s > p for s, p in zip(self.stride, self.patch_size)):
            raise ValueError(f"AudioPatchEmbed: stride {self.stride} larger than patch_size {self.patch_size} would "
                             "leave input between patches unseen")
        if self.n_freq < self.patch_size[0] or self.n_time < self.patch_size[1]:
            raise ValueError(f"AudioPatchEmbed: spectrogram ({self.n_freq}, {self.n_time}) smaller than a patch {self.patch_size}")
        self.grid = (
            (self.n_freq - self.patch_size[0]) // self.stride[0] + 1,
            (self.n_time - self.patch_size[1]) // self.stride[1] + 1,
        )
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=self.patch_size, stride=self.stride)
        self._init_pos(self.grid[0] * self.grid[1], embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        self._check_shape(x, (None, 1, self.n_freq, self.n_time), "spectrograms")
        return self._tokens(self.proj(x))


class VideoTubeletEmbed(_GridTokenizer):
    """Video ``[B, C, T, H, W]`` -> tubelets of ``tubelet_size`` frames x ``patch_size`` pixels (3-D conv)."""

    modality = "video"

    def __init__(self, num_frames=16, img_size=224, patch_size=16, tubelet_size=2, in_chans=3, embed_dim=768):
        super().__init__()
        name = type(self).__name__
        embed_dim = _positive_int(embed_dim, "embed_dim", name)
        self.num_frames = _positive_int(num_frames, "num_frames", name)
        self.img_size, self.patch_size = _pair(img_size, "img_size", name), _pair(patch_size, "patch_size", name)
        self.tubelet_size = _positive_int(tubelet_size, "tubelet_size", name)
        self.in_chans = _positive_int(in_chans, "in_chans", name)
        if self.num_frames % self.tubelet_size or any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(
                f"VideoTubeletEmbed: (frames, H, W) = ({self.num_frames}, {self.img_size}) must be multiples of "
                f"(tubelet_size, patch) = ({self.tubelet_size}, {self.patch_size})"
            )
        kernel = (self.tubelet_size, *self.patch_size)
        self.grid = (self.num_frames // kernel[0], self.img_size[0] // kernel[1], self.img_size[1] // kernel[2])
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)
        self._init_pos(self.grid[0] * self.grid[1] * self.grid[2], embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        self._check_shape(x, (None, self.in_chans, self.num_frames, *self.img_size), "videos")
        return self._tokens(self.proj(x))


# --------------------------------------------------------------------------- point clouds

def farthest_point_sample(points: Tensor, num_samples: int, start: str | int = "farthest") -> Tensor:
    """Indices ``[B, num_samples]`` of farthest-point samples of ``points`` ``[B, P, 3]``.

    Each new sample is the point whose distance to the samples chosen so far is largest (ties go to
    the lowest index). Vectorized over batch and points; the loop runs over the samples only.

    ``start`` chooses the first sample:
    - ``"farthest"`` (default): the point farthest from the cloud's centroid. It depends only on
      the set of points, not on their order, so the selected *points* (and their order) are
      invariant to a permutation of the input (barring exact distance ties).
    - an int: that index in every cloud (``0`` is the classic choice of PointNet++ code).

    Distances are measured in fp32 for bf16 / fp16 points, in the points' own dtype otherwise.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"farthest_point_sample expects points of shape [B, P, 3], got {list(points.shape)}")
    B, P, _ = points.shape
    num_samples = check_size("farthest_point_sample", "num_samples", num_samples, 1)
    if not 1 <= num_samples <= P:
        raise ValueError(f"farthest_point_sample: num_samples={num_samples} must be in [1, P={P}]")
    pts = points.detach().to(_float_dtype(points))
    if isinstance(start, str) and start == "farthest":
        centroid = pts.mean(dim=1, keepdim=True)
        current = ((pts - centroid) ** 2).sum(-1).argmax(dim=1)
    elif _is_index(start) and -P <= start < P:
        current = torch.full((B,), int(start) % P, dtype=torch.long, device=points.device)
    else:
        raise ValueError(f"farthest_point_sample: start must be 'farthest' or an index in [0, {P}), got {start!r}")
    idx = torch.empty(B, num_samples, dtype=torch.long, device=points.device)
    min_dist = torch.full((B, P), float("inf"), dtype=pts.dtype, device=points.device)
    batch = torch.arange(B, device=points.device)
    for i in range(num_samples):
        idx[:, i] = current
        last = pts[batch, current].unsqueeze(1)  # [B, 1, 3]
        min_dist = torch.minimum(min_dist, ((pts - last) ** 2).sum(-1))
        current = min_dist.argmax(dim=1)  # first maximum: deterministic
    return idx


def knn_indices(queries: Tensor, points: Tensor, k: int) -> Tensor:
    """Indices ``[B, Q, k]`` of the ``k`` nearest ``points`` ``[B, P, 3]`` to each query ``[B, Q, 3]``,
    nearest first (exact squared distances, no matmul trick; in fp32 for bf16 / fp16 inputs, whose own
    rounding would reorder neighbours, and in the inputs' dtype for fp32 / fp64)."""
    if queries.dim() != 3 or points.dim() != 3 or queries.shape[0] != points.shape[0] \
            or queries.shape[-1] != points.shape[-1] or queries.shape[-1] == 0:
        raise ValueError(f"knn_indices: queries {list(queries.shape)} and points {list(points.shape)} must be "
                         "[B, Q, D] and [B, P, D], D ≥ 1")
    k = check_size("knn_indices", "k", k, 1)
    if not 1 <= k <= points.shape[1]:
        raise ValueError(f"knn_indices: k={k} must be in [1, P={points.shape[1]}]")
    dt = torch.promote_types(_float_dtype(queries), _float_dtype(points))
    q, p = queries.detach().to(dt), points.detach().to(dt)
    d2 = None  # [B, Q, P], one coordinate at a time: no [B, Q, P, D] intermediate (GBs for large scenes)
    for c in range(q.shape[-1]):
        diff = q[..., c].unsqueeze(2) - p[..., c].unsqueeze(1)
        d2 = diff * diff if d2 is None else d2.addcmul_(diff, diff)
    return d2.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(points: Tensor, num_groups: int, group_size: int, start: str | int = "farthest"):
    """Point-MAE grouping: FPS centers ``[B, G, 3]`` and their kNN neighborhoods ``[B, G, k, 3]``
    expressed relative to the center."""
    check_size("group_points", "num_groups", num_groups, 1)
    check_size("group_points", "group_size", group_size, 1)
    centers_idx = farthest_point_sample(points, num_groups, start=start)
    batch = torch.arange(points.shape[0], device=points.device).unsqueeze(1)
    centers = points[batch, centers_idx]  # [B, G, 3]
    nbr = knn_indices(centers, points, group_size)  # [B, G, k]
    neighborhoods = points[batch.unsqueeze(2), nbr] - centers.unsqueeze(2)
    return centers, neighborhoods


class PointCloudEmbed(Tokenizer):
    """Point cloud ``[B, P, 3]`` -> ``num_groups`` tokens, as in Point-MAE.

    FPS picks ``num_groups`` centers, each center's ``group_size`` nearest points form a group
    (coordinates relative to the center), a shared mini-PointNet (per-point MLP, max-pool, concat
    the pooled feature to every point, second MLP, max-pool) turns each group into one token, and an
    MLP of the center coordinates gives its position embedding. Max-pooling makes each token
    independent of the order of points inside its group; with ``fps_start="farthest"`` the whole
    tokenizer is invariant to the order of the input points, barring exact distance ties: in clouds
    where several points are equally far (a regular lattice, voxel-grid coordinates) FPS and kNN take
    the lowest index among them, so the order then picks which of the tied points are used.
    """

    modality = "point_cloud"

    def __init__(self, num_groups=64, group_size=32, embed_dim=384, hidden=128, fps_start="farthest"):
        super().__init__()
        name = type(self).__name__
        embed_dim = _positive_int(embed_dim, "embed_dim", name)
        hidden = _positive_int(hidden, "hidden", name)
        self.num_groups = _positive_int(num_groups, "num_groups", name)
        self.group_size = _positive_int(group_size, "group_size", name)
        if not (_is_index(fps_start) or (isinstance(fps_start, str) and fps_start == "farthest")):
            raise ValueError(f"{name}: fps_start must be 'farthest' or a point index (int), got {fps_start!r}")
        self.fps_start = int(fps_start) if _is_index(fps_start) else fps_start
        self.embed_dim, self.num_tokens = embed_dim, self.num_groups
        self.first_mlp = nn.Sequential(nn.Linear(3, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 2 * hidden))
        self.second_mlp = nn.Sequential(nn.Linear(4 * hidden, 4 * hidden), nn.LayerNorm(4 * hidden), nn.GELU(),
                                        nn.Linear(4 * hidden, embed_dim))
        self.pos_mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        self._check_shape(x, (None, None, 3), "point clouds")
        if x.shape[1] < max(self.num_groups, self.group_size):
            raise ValueError(
                f"PointCloudEmbed needs at least max(num_groups={self.num_groups}, group_size={self.group_size}) "
                f"points per cloud, got {x.shape[1]}"
            )
        if _is_index(self.fps_start) and not -x.shape[1] <= self.fps_start < x.shape[1]:
            raise ValueError(f"PointCloudEmbed: fps_start={self.fps_start} is not a point index of clouds of "
                             f"{x.shape[1]} points")
        centers, groups = group_points(x, self.num_groups, self.group_size, start=self.fps_start)
        feat = self.first_mlp(groups)  # [B, G, k, 2h]
        pooled = feat.amax(dim=2, keepdim=True)
        feat = torch.cat([pooled.expand_as(feat), feat], dim=-1)
        tokens = self.second_mlp(feat).amax(dim=2)  # [B, G, D]
        return tokens + self.pos_mlp(centers)
