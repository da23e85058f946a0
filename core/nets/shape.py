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
def colors_from_views(vertices: np.ndarray, normals: np.ndarray, cameras: torch.Tensor, images: np.ndarray,
                      depths: np.ndarray, fallback: np.ndarray, depth_tolerance: float = 0.03,
                      min_weight: float = 0.05) -> np.ndarray:
    """[V, 3] RGB in [0, 1] at the vertices, taken from rendered views: each vertex is projected into every view
    (camera labels [N, 25], uint8 images [N, S, S, 3], ray depths [N, R, R] in world units) and its colours are
    averaged with weight cos^2 between its normal (either sign) and the direction to the camera, over the views
    where its distance to the camera is within `depth_tolerance` of the rendered depth (not hidden). Vertices with
    a total weight below `min_weight` keep `fallback` [V, 3]. The final images carry what the super-resolution adds
    (a style, detail), which the colour features at the surface do not."""
    cameras = cameras.detach().float().cpu()
    points = torch.from_numpy(np.asarray(vertices, np.float32))
    unit_normals = torch.nn.functional.normalize(torch.from_numpy(np.asarray(normals, np.float32)), dim=-1)
    cam2world, intrinsics = cameras[:, :16].reshape(-1, 4, 4), cameras[:, 16:25].reshape(-1, 3, 3)
    relative = points[None] - cam2world[:, None, :3, 3]  # [N, V, 3], camera -> vertex
    in_camera = relative @ cam2world[:, :3, :3]  # rows times R = R^T applied to each vector (OpenCV camera axes)
    z = in_camera[..., 2].clamp_min(1e-6)
    u = intrinsics[:, None, 0, 0] * in_camera[..., 0] / z + intrinsics[:, None, 0, 2]
    v = intrinsics[:, None, 1, 1] * in_camera[..., 1] / z + intrinsics[:, None, 1, 2]
    grid = torch.stack([u * 2 - 1, v * 2 - 1], dim=-1)[:, :, None]  # [N, V, 1, 2], align_corners=False
    pixels = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    colours = torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", align_corners=False)[..., 0]  # [N, 3, V]
    depth = torch.nn.functional.grid_sample(torch.from_numpy(np.asarray(depths, np.float32))[:, None], grid,
                                            mode="nearest", align_corners=False)[:, 0, :, 0]  # [N, V]
    distance = relative.norm(dim=-1)
    inside = (in_camera[..., 2] > 1e-6) & (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    visible = inside & (distance <= depth + depth_tolerance)
    cosine = (unit_normals[None] * -relative / distance.clamp_min(1e-9)[..., None]).sum(-1).abs()
    weight = visible.float() * cosine ** 2  # [N, V]
    total = weight.sum(0)
    blended = (colours * weight[:, None]).sum(0) / total.clamp_min(1e-9)  # [3, V]
    result = np.array(fallback, dtype=np.float32, copy=True)
    seen = (total >= min_weight).numpy()
    result[seen] = blended.t().clamp(0, 1).numpy()[seen]
    return result


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
