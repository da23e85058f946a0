"""Meshes for the browser: density grid -> marching cubes, decimation, GLB in the glTF frame.

Frame contract: every caller passes vertices in its model's world frame with +y up and the face looking toward +z
(the EG3D / PanoHead world frame, and glTF's own). `export_glb` only centres, scales to metres, decimates, adds
normals and RGBA uint8 vertex colours, and writes provenance into the glTF `asset.extras`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from core.provenance import Provenance

DEFAULT_FACE_BUDGET = 100_000


def mesh_from_density_grid(
    density: np.ndarray,
    level: float,
    bounds_min: Sequence[float],
    bounds_max: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes on a grid indexed [ix, iy, iz] over the lattice bounds_min..bounds_max (inclusive).

    Returns (vertices in world coordinates, faces) with faces wound so that normals point out of the dense region.
    Raises ValueError when the level does not cross the grid (nothing to mesh).
    """
    from skimage.measure import marching_cubes

    density = np.asarray(density, dtype=np.float32)
    if density.ndim != 3 or min(density.shape) < 2:
        raise ValueError(f"density must be a 3-D grid of at least 2 per side, got shape {density.shape}")
    if not (density.min() < level < density.max()):
        raise ValueError(
            f"level {level} does not cross the density range [{density.min():.3g}, {density.max():.3g}]: no surface"
        )
    lo = np.asarray(bounds_min, dtype=np.float64)
    hi = np.asarray(bounds_max, dtype=np.float64)
    spacing = (hi - lo) / (np.asarray(density.shape) - 1)
    # skimage orients faces toward increasing values; we want outward = toward decreasing density.
    vertices, faces, _, _ = marching_cubes(density, level=level, spacing=tuple(spacing))
    return (vertices + lo).astype(np.float32), faces[:, ::-1].astype(np.int64)


def _cells_touching(count: int, coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each fine index 0..count-1, the coarse cells (between coarse[c] and coarse[c+1]) whose closure holds it:
    (lower, upper), equal except on a coarse plane, where the point is shared by two cells (clipped at the ends;
    -1 outside the coarse range)."""
    index = np.arange(count)
    upper = np.searchsorted(coarse, index, side="right") - 1
    lower = np.searchsorted(coarse, index, side="left") - 1
    lower = np.where(np.isin(index, coarse), lower, upper)
    cells = len(coarse) - 1
    outside = (index < coarse[0]) | (index > coarse[-1])
    upper, lower = np.clip(upper, 0, cells - 1), np.clip(lower, 0, cells - 1)
    return np.where(outside, -1, lower), np.where(outside, -1, upper)


def sparse_density_lattice(
    density: Callable[[np.ndarray], np.ndarray],
    axis: np.ndarray,
    level: float,
    pad: int = 0,
    fill: float = -1000.0,
    coarse_step: int = 4,
) -> np.ndarray:
    """[N, N, N] lattice (index [ix, iy, iz] = (axis[ix], axis[iy], axis[iz])) of `density(points [M, 3]) -> [M]`
    for marching cubes at `level`, evaluated only where the surface can be.

    The border of width `pad` is `fill` without evaluation (the official shape script overwrites it anyway). The
    rest is first evaluated on a coarse sub-lattice (every `coarse_step`-th point, the last interior one included);
    every coarse cell whose corners straddle `level` (a cell touching the border also counts the border's `fill`),
    and its 26 neighbours, is then evaluated at every lattice point. The other cells lie on one side of the level
    at all their corners and are filled with a corner value of that side. Marching cubes then sees the same values
    wherever the full lattice crosses the level, so it gives the same mesh, provided no part of the surface fits
    inside a coarse cell's neighbourhood without touching its corners (detail thinner than about `coarse_step`
    lattice steps and away from any other surface). `coarse_step` 1 evaluates every interior point.
    """
    axis = np.asarray(axis, np.float32)
    n = len(axis)
    lattice = np.full((n, n, n), fill, np.float32)
    lo, hi = pad, n - pad  # interior [lo, hi)
    if hi - lo < 1:
        return lattice
    if coarse_step <= 1 or hi - lo <= 2 * coarse_step:
        interior = axis[lo:hi]
        points = np.stack(np.meshgrid(interior, interior, interior, indexing="ij"), -1).reshape(-1, 3)
        lattice[lo:hi, lo:hi, lo:hi] = np.asarray(density(points), np.float32).reshape((hi - lo,) * 3)
        return lattice
    coarse = np.unique(np.append(np.arange(lo, hi, coarse_step), hi - 1))
    grid = axis[coarse]
    points = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    values = np.asarray(density(points), np.float32).reshape((len(coarse),) * 3)

    above = values > level
    corners = [above[i:len(coarse) - 1 + i, j:len(coarse) - 1 + j, k:len(coarse) - 1 + k]
               for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    any_above, all_above = np.logical_or.reduce(corners), np.logical_and.reduce(corners)
    mixed = any_above & ~all_above
    if pad > 0:  # cells on the interior's boundary also meet the border's fill value
        boundary = np.zeros_like(mixed)
        boundary[[0, -1]], boundary[:, [0, -1]], boundary[:, :, [0, -1]] = True, True, True
        mixed |= boundary & ((any_above) if fill <= level else ~all_above)
    padded = np.pad(mixed, 1)
    cells = mixed.shape[0]
    selected = np.logical_or.reduce([padded[i:i + cells, j:j + cells, k:k + cells]
                                     for i in range(3) for j in range(3) for k in range(3)])

    lower, upper = _cells_touching(n, coarse)
    inside = lower >= 0
    exact = np.zeros((n, n, n), bool)
    for cx in (lower, upper):
        for cy in (lower, upper):
            for cz in (lower, upper):
                exact |= (selected[np.ix_(np.maximum(cx, 0), np.maximum(cy, 0), np.maximum(cz, 0))]
                          & inside[:, None, None] & inside[None, :, None] & inside[None, None, :])
    # one side everywhere else: a corner value of the cell's side (the cell's max when above, else its min)
    corner_values = [values[i:len(coarse) - 1 + i, j:len(coarse) - 1 + j, k:len(coarse) - 1 + k]
                     for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    side_value = np.where(all_above, np.maximum.reduce(corner_values), np.minimum.reduce(corner_values))
    block = np.ix_(lower[lo:hi], lower[lo:hi], lower[lo:hi])
    lattice[lo:hi, lo:hi, lo:hi] = side_value[block]
    lattice[np.ix_(coarse, coarse, coarse)] = values
    exact[np.ix_(coarse, coarse, coarse)] = False
    ix, iy, iz = np.nonzero(exact)
    if len(ix):
        lattice[ix, iy, iz] = np.asarray(density(np.stack([axis[ix], axis[iy], axis[iz]], -1)), np.float32)
    return lattice


def _rgba_uint8(colors: np.ndarray, count: int) -> np.ndarray:
    colors = np.asarray(colors)
    if colors.shape[0] != count or colors.shape[1] not in (3, 4):
        raise ValueError(f"vertex_colors must have shape ({count}, 3|4), got {colors.shape}")
    if colors.dtype != np.uint8:
        colors = np.clip(np.rint(np.asarray(colors, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    if colors.shape[1] == 3:
        colors = np.concatenate([colors, np.full((count, 1), 255, np.uint8)], axis=1)
    else:
        colors = colors.copy()
        colors[:, 3] = 255  # an alpha of 0 makes the mesh invisible in most viewers
    return colors


def decimate(
    vertices: np.ndarray, faces: np.ndarray, face_budget: int, vertex_colors: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quadric decimation to at most `face_budget` faces; colours follow the nearest original vertex."""
    if len(faces) <= face_budget:
        return vertices, faces, vertex_colors
    import fast_simplification

    target_reduction = 1.0 - face_budget / len(faces)
    new_vertices, new_faces = fast_simplification.simplify(
        np.asarray(vertices, np.float32), np.asarray(faces, np.int64), target_reduction=target_reduction
    )
    if len(new_faces) > face_budget:  # the simplifier can stop a little above its target
        new_vertices, new_faces = fast_simplification.simplify(
            new_vertices.astype(np.float32), new_faces, target_count=face_budget
        )
        new_faces = new_faces[:face_budget]
    new_colors = None
    if vertex_colors is not None:
        _, nearest = cKDTree(vertices).query(new_vertices)
        new_colors = vertex_colors[nearest]
    return new_vertices, new_faces, new_colors


def export_glb(
    path: str | Path,
    vertices: np.ndarray,
    faces: np.ndarray,
    vertex_colors: np.ndarray | None = None,
    metadata: Provenance | dict[str, Any] | None = None,
    face_budget: int = DEFAULT_FACE_BUDGET,
    head_height_m: float = 0.25,
) -> Path:
    """Write a GLB: centred on its bounding box, scaled so its height (y extent) is `head_height_m` metres,
    decimated to `face_budget` faces, with vertex normals and RGBA uint8 vertex colours (grey when none)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
        raise ValueError(f"vertices must have shape (V, 3) with V > 0, got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError(f"faces must have shape (F, 3) with F > 0, got {faces.shape}")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError("faces index vertices out of range")
    if face_budget < 4:
        raise ValueError(f"face_budget must be at least 4, got {face_budget}")
    colors = _rgba_uint8(vertex_colors, len(vertices)) if vertex_colors is not None else None

    vertices, faces, colors = decimate(vertices, faces, face_budget, colors)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    height = hi[1] - lo[1]
    scale = head_height_m / height if height > 0 else 1.0
    vertices = (vertices - (lo + hi) / 2.0) * scale

    if colors is None:
        colors = np.tile(np.array([[200, 200, 200, 255]], np.uint8), (len(vertices), 1))
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=colors, process=False)

    extras = metadata.as_dict() if isinstance(metadata, Provenance) else dict(metadata or {})
    extras["units"] = "metres"

    def add_asset_extras(tree: dict) -> None:
        tree["asset"]["extras"] = extras

    data = trimesh.exchange.gltf.export_glb(
        trimesh.Scene(mesh), include_normals=True, tree_postprocessor=add_asset_extras
    )
    path = Path(path)
    path.write_bytes(data)
    return path


def read_glb_asset_extras(path: str | Path) -> dict[str, Any]:
    """The `asset.extras` object of a GLB file (empty dict when absent)."""
    import json
    import struct

    data = Path(path).read_bytes()
    magic, _, _ = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF":
        raise ValueError(f"{path} is not a GLB file")
    chunk_length, chunk_type = struct.unpack_from("<I4s", data, 12)
    if chunk_type != b"JSON":
        raise ValueError(f"{path}: first GLB chunk is not JSON")
    tree = json.loads(data[20 : 20 + chunk_length])
    return tree.get("asset", {}).get("extras", {})
