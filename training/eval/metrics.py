"""Plain metrics on arrays: Frechet distance, pairwise and between-sample cosine similarity, distinct neighbours,
pose error, mask IoU, PSNR."""

from __future__ import annotations

import numpy as np


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two N x D feature sets (FID's formula).

    Uses tr(sqrt(Sa Sb)) = tr(sqrt(Sa^1/2 Sb Sa^1/2)), which only needs symmetric eigendecompositions.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two N x D arrays with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each set needs at least two samples")
    cov_a = np.cov(a, rowvar=False)
    cov_b = np.cov(b, rowvar=False)
    eigvals_a, eigvecs_a = np.linalg.eigh(cov_a)
    sqrt_a = (eigvecs_a * np.sqrt(np.clip(eigvals_a, 0.0, None))) @ eigvecs_a.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    mean_term = float(np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2))
    return max(mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt), 0.0)


def pairwise_cosine(embeddings_a: np.ndarray, embeddings_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of ``embeddings_a`` with row i of ``embeddings_b`` (N x D each -> N)."""
    a = np.asarray(embeddings_a, dtype=np.float64)
    b = np.asarray(embeddings_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(norms, 1e-12)


def mean_cross_cosine(embeddings: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of distinct rows of ``embeddings`` (N x D, N >= 2): how alike a set of
    samples is (e.g. identity embeddings of different people; higher = less diverse)."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) < 2:
        raise ValueError(f"need N >= 2 rows of N x D embeddings, got shape {e.shape}")
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    similarity = e @ e.T
    return float((similarity.sum() - np.trace(similarity)) / (len(e) * (len(e) - 1)))


def distinct_neighbour_rate(descriptors: np.ndarray, threshold: float) -> float:
    """Fraction of neighbouring rows (i, i + 1, the last with the first) of face descriptors [N, D] (N >= 2) that are
    at least `threshold` apart: for dlib descriptors and 0.6, how many neighbouring samples are different people."""
    d = np.asarray(descriptors, dtype=np.float64)
    if d.ndim != 2 or len(d) < 2:
        raise ValueError(f"need N >= 2 rows of N x D descriptors, got shape {d.shape}")
    return float(np.mean(np.linalg.norm(d - np.roll(d, -1, axis=0), axis=1) >= threshold))


def pose_error(poses_a: np.ndarray, poses_b: np.ndarray) -> dict[str, float]:
    """Mean absolute angle difference (degrees, wrapped to [-180, 180]) between N x 3 (yaw, pitch, roll) arrays."""
    a = np.asarray(poses_a, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(poses_b, dtype=np.float64).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    diff = np.abs((a - b + 180.0) % 360.0 - 180.0).mean(axis=0)
    return {"yaw": float(diff[0]), "pitch": float(diff[1]), "roll": float(diff[2]), "mean": float(diff.mean())}


def mask_iou(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape; 1.0 when both are empty."""
    a = np.asarray(mask_a, dtype=bool)
    b = np.asarray(mask_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def psnr(image_a: np.ndarray, image_b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape images; ``inf`` when they are identical."""
    a = np.asarray(image_a, dtype=np.float64)
    b = np.asarray(image_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range**2 / mse))
