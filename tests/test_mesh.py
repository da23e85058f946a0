"""GLB export: frame, scale, decimation, colours, normals, provenance; marching cubes on a density grid."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from core.mesh import export_glb, mesh_from_density_grid, read_glb_asset_extras
from core.provenance import Provenance


def _head_like_density(n: int = 64) -> tuple[np.ndarray, float]:
    """An ellipsoid taller than wide with a 'nose' bump toward +z, on a [-1, 1]^3 lattice indexed [x, y, z]."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    density = 1 - np.sqrt((x / 0.6) ** 2 + (y / 0.8) ** 2 + (z / 0.6) ** 2)
    density += 0.8 * np.exp(-(x**2 + y**2 + (z - 0.6) ** 2) / 0.01)
    return density, 0.0


def test_density_grid_to_glb_keeps_up_and_front(tmp_path):
    density, level = _head_like_density()
    vertices, faces = mesh_from_density_grid(density, level, (-1, -1, -1), (1, 1, 1))
    assert vertices[:, 1].max() == pytest.approx(0.8, abs=0.05)  # world units preserved
    colors = np.where(vertices[:, 2:3] > 0.5, [1.0, 0.0, 0.0], [0.0, 0.0, 1.0])  # red front
    path = export_glb(tmp_path / "head.glb", vertices, faces, vertex_colors=colors, head_height_m=0.25)

    mesh = trimesh.load(path, force="mesh")
    extent = mesh.bounds[1] - mesh.bounds[0]
    assert extent[1] == pytest.approx(0.25, rel=1e-3)  # +Y is the tall axis, in metres
    assert np.allclose(mesh.bounds.mean(axis=0), 0, atol=1e-6)  # centred
    red = mesh.visual.vertex_colors[:, 0] == 255
    assert red.any() and (mesh.vertices[red, 2] > 0).all()  # the front (nose side) is toward +Z
    tip = mesh.vertices[mesh.vertices[:, 2].argmax()]
    assert abs(tip[0]) < 0.01 and abs(tip[1]) < 0.01  # the frontmost point is the centred nose bump
    assert mesh.volume > 0  # outward normals
    assert mesh.visual.kind == "vertex"
    assert (mesh.visual.vertex_colors[:, 3] == 255).all()


def test_decimation_respects_the_face_budget(tmp_path):
    density, level = _head_like_density(96)
    vertices, faces = mesh_from_density_grid(density, level, (-1, -1, -1), (1, 1, 1))
    assert len(faces) > 20_000
    path = export_glb(tmp_path / "small.glb", vertices, faces, face_budget=5_000)
    mesh = trimesh.load(path, force="mesh")
    assert 2_000 < len(mesh.faces) <= 5_000


def test_glb_carries_provenance_and_normals(tmp_path):
    density, level = _head_like_density(32)
    vertices, faces = mesh_from_density_grid(density, level, (-1, -1, -1), (1, 1, 1))
    provenance = Provenance("stylize3d", "head3d-base", "a" * 40, seed=7, parameters={"style": "sketch"})
    path = export_glb(tmp_path / "p.glb", vertices, faces, metadata=provenance)
    extras = read_glb_asset_extras(path)
    assert extras["method"] == "stylize3d" and extras["seed"] == 7
    assert extras["parameters"] == {"style": "sketch"} and "synthetic" in extras["statement"].lower()
    assert b"NORMAL" in path.read_bytes()


def test_bad_meshes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        export_glb(tmp_path / "x.glb", np.zeros((3, 3)), np.array([[0, 1, 5]]))
    with pytest.raises(ValueError, match="does not cross"):
        mesh_from_density_grid(np.zeros((8, 8, 8)), 0.5, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="vertex_colors"):
        export_glb(tmp_path / "y.glb", np.eye(3), np.array([[0, 1, 2]]), vertex_colors=np.zeros((2, 3)))
