"""Data for ``m2pt demo``: synthetic point-cloud shapes (auxiliary modality) and scikit-learn's
bundled handwritten digits (target modality). Nothing is downloaded.

Point clouds are drawn on the fly from a ``torch.Generator``, so a seed fixes every cloud.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "plane")


def _uniform(n: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def _warp(u: Tensor, g: torch.Generator) -> Tensor:
    """Non-uniform sampling: bend a uniform [0, 1) sample by a random power (denser at one end)."""
    gamma = math.exp((torch.rand((), generator=g, dtype=torch.float64).item() - 0.5) * 1.2)
    return u.pow(gamma)


def _shape_points(kind: str, n: int, g: torch.Generator) -> Tensor:
    u, v = _warp(_uniform(n, g), g), _warp(_uniform(n, g), g)
    two_pi = 2 * math.pi
    if kind == "sphere":
        theta, z = two_pi * u, 2 * v - 1
        r = (1 - z * z).clamp_min(0).sqrt()
        return torch.stack([r * theta.cos(), r * theta.sin(), z], -1)
    if kind == "cube":
        face = torch.randint(0, 6, (n,), generator=g)
        a, b = 2 * u - 1, 2 * v - 1
        sign = (face % 2).double() * 2 - 1
        axis = face // 2
        pts = torch.stack([a, b, sign], -1)
        out = torch.empty_like(pts)
        for ax in range(3):  # rotate (a, b, ±1) so the constant coordinate is on axis `ax`
            m = axis == ax
            out[m] = pts[m].roll(ax + 1, dims=-1)
        return out
    if kind == "cylinder":
        theta = two_pi * u
        return torch.stack([theta.cos(), theta.sin(), 2 * v - 1], -1)
    if kind == "cone":
        theta, h = two_pi * u, v.sqrt()  # sqrt: uniform over the lateral surface before warping
        return torch.stack([h * theta.cos(), h * theta.sin(), 1 - 2 * h], -1)
    if kind == "torus":
        theta, phi, R, r = two_pi * u, two_pi * v, 0.75, 0.3
        return torch.stack([(R + r * phi.cos()) * theta.cos(), (R + r * phi.cos()) * theta.sin(), r * phi.sin()], -1)
    if kind == "plane":
        return torch.stack([2 * u - 1, 2 * v - 1, torch.zeros_like(u)], -1)
    raise ValueError(f"unknown shape {kind!r}; choose one of {SHAPES}")


def _random_rotation(g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def point_cloud_batch(batch: int, num_points: int, g: torch.Generator, noise: float = 0.02):
    """``(points [batch, num_points, 3] float32, labels [batch])``: random primitive shapes, each
    randomly rotated, scaled (global and mildly per axis), non-uniformly sampled, jittered with
    Gaussian noise, then centered and scaled into the unit ball (as ModelNet preprocessing)."""
    labels = torch.randint(0, len(SHAPES), (batch,), generator=g)
    clouds = []
    for lab in labels.tolist():
        p = _shape_points(SHAPES[lab], num_points, g)
        scale = 0.7 + 0.6 * torch.rand((), generator=g, dtype=torch.float64)
        aniso = 0.85 + 0.3 * torch.rand(3, generator=g, dtype=torch.float64)
        p = (p * aniso * scale) @ _random_rotation(g).T
        p = p + noise * torch.randn(p.shape, generator=g, dtype=torch.float64)
        p = p - p.mean(0)
        p = p / p.norm(dim=-1).max()
        clouds.append(p)
    return torch.stack(clouds).float(), labels


def load_digits_split(test_fraction: float = 0.5, split_seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as
    ``(x_train [N, 1, 8, 8], y_train, x_test, y_test)``, pixels scaled to [0, 1] then standardized
    with the training set's mean and std; a fixed, stratified split."""
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits_split: test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "m2pt demo needs scikit-learn for its digits data: pip install 'm2pt_kernels[demo]' "
            "(or pip install scikit-learn)"
        ) from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(split_seed)
    train_idx, test_idx = [], []
    for c in range(10):  # stratified split
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    if len(tr) < 2 or len(te) == 0:
        raise ValueError(f"load_digits_split: test_fraction={test_fraction} leaves {len(tr)} training and "
                         f"{len(te)} test images; it needs at least 2 and 1")
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]
