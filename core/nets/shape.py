"""Meshes from EG3D / PanoHead generators: density lattice -> marching cubes -> coloured GLB in the world frame.

Follows the official `gen_samples.py --shapes` procedure (raw, pre-softplus sigma; borders of width 30*N/256 set to
-1000 so the surface closes; marching cubes at level 10 for trained models) but samples an ideal lattice,
index [ix, iy, iz] = world (ix, iy, iz) * vs - box/2 with vs = box/(N-1), and keeps vertices in world coordinates
(+y up, the face looks toward +z, the glTF frame) instead of the official PLY's voxel axes
(X, Y, Z) = (world z, world y, -world x). See shared/reference/README.md section 5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.mesh import DEFAULT_FACE_BUDGET, export_glb, mesh_from_density_grid

OFFICIAL_LEVEL = 10.0
DEFAULT_CHUNK = 2**18


def lattice_axis(resolution: int, box_warp: float) -> torch.Tensor:
    """[N] float32 coordinates of the lattice along one axis: arange(N) * box/(N-1) - box/2."""
    return torch.arange(resolution, dtype=torch.float32) * (box_warp / (resolution - 1)) + (-box_warp / 2)


@torch.no_grad()
def query_points(generator, planes: torch.Tensor, points: torch.Tensor, chunk_size: int = DEFAULT_CHUNK):
    """Raw sigma [M] and features [M, C] at world points [M, 3] for one set of planes [1, 3, C, P, P], in chunks."""
    sigmas, features = [], []
    for start in range(0, points.shape[0], chunk_size):
        chunk = points[start : start + chunk_size].to(planes.device)[None]
        directions = torch.zeros_like(chunk)
        directions[..., 2] = -1
        out = generator.query_planes(planes, chunk, directions)
        sigmas.append(out["sigma"][0, :, 0].float().cpu())
        features.append(out["rgb"][0].float().cpu())
    return torch.cat(sigmas), torch.cat(features)


@torch.no_grad()
def density_lattice(generator, planes: torch.Tensor, resolution: int, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """[N, N, N] raw sigma on the ideal lattice over the generator's box, indexed [ix, iy, iz]."""
    axis = lattice_axis(resolution, generator.rendering_kwargs["box_warp"])
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    sigma, _ = query_points(generator, planes, points, chunk_size)
    return sigma.reshape(resolution, resolution, resolution).numpy()


def border_width(resolution: int) -> int:
    """Width of the border `gen_samples.py` sets to -1000: int(30 * N / 256)."""
    return int(30 * resolution / 256)


def mesh_from_lattice(sigma: np.ndarray, box_warp: float, level: float = OFFICIAL_LEVEL, pad: int | None = None):
    """(vertices [V, 3] in world coordinates, faces [F, 3]) of the `level` surface of an [ix, iy, iz] lattice.

    The borders (width `pad`, default `border_width(N)`) are set to -1000 first, as the official script does.
    """
    sigma = np.array(sigma, dtype=np.float32, copy=True)
    pad = border_width(sigma.shape[0]) if pad is None else pad
    if pad > 0:
        sigma[:pad], sigma[-pad:] = -1000, -1000
        sigma[:, :pad], sigma[:, -pad:] = -1000, -1000
        sigma[:, :, :pad], sigma[:, :, -pad:] = -1000, -1000
    half = box_warp / 2
    return mesh_from_density_grid(sigma, level, (-half, -half, -half), (half, half, half))


@torch.no_grad()
def vertex_colors(generator, planes: torch.Tensor, ws: torch.Tensor, vertices: np.ndarray,
                  chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """[V, 3] RGB in [0, 1] at the vertices: EG3D's first three features; PanoHead's features through `torgb`."""
    _, features = query_points(generator, planes, torch.from_numpy(np.asarray(vertices, np.float32)), chunk_size)
    if generator.torgb is None:
        rgb = features[:, :3]
    else:  # torgb is a 1x1 modulated convolution: apply it to the vertex features laid out as a V x 1 image
        image = features.t().reshape(1, -1, features.shape[0], 1).to(planes.device)
        rgb = generator.torgb(image, ws[:1, -1], fused_modconv=False).float().cpu()[0, :, :, 0].t()
        rgb = (rgb + 1) / 2
    return rgb.clamp(0, 1).numpy()


@torch.no_grad()
def extract_mesh(generator, ws: torch.Tensor, resolution: int = 128, level: float = OFFICIAL_LEVEL,
                 noise_mode: str = "const", chunk_size: int = DEFAULT_CHUNK):
    """(vertices [V, 3] world, faces [F, 3], colours [V, 3] in [0, 1]) of the generator's shape for ws[:1]."""
    planes = generator.generate_planes(ws[:1], noise_mode=noise_mode)
    sigma = density_lattice(generator, planes, resolution, chunk_size)
    vertices, faces = mesh_from_lattice(sigma, generator.rendering_kwargs["box_warp"], level)
    return vertices, faces, vertex_colors(generator, planes, ws, vertices, chunk_size)


def export_shape_glb(path: str | Path, generator, ws: torch.Tensor, resolution: int = 128,
                     level: float = OFFICIAL_LEVEL, metadata: Any = None,
                     face_budget: int = DEFAULT_FACE_BUDGET) -> Path:
    """Extract the shape of ws[:1] and write it as a coloured GLB (metres, +y up, face toward +z)."""
    vertices, faces, colors = extract_mesh(generator, ws, resolution, level)
    return export_glb(path, vertices, faces, vertex_colors=colors, metadata=metadata, face_budget=face_budget)
