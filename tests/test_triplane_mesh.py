"""Density-grid meshes of tri-plane generators: lattice values, orientation against the official PLY, GLB frame."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from core.mesh import export_glb
from core.nets.shape import density_lattice, export_shape_glb, extract_mesh, mesh_from_lattice, vertex_colors
from core.nets.triplane import TriPlaneGenerator

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    return path


def _load_generator(name):
    from safetensors.torch import load_file

    config = json.loads(_require(REFERENCE / f"{name}.json").read_text())
    generator = TriPlaneGenerator(**{**config["init_kwargs"], "rendering_kwargs": config["rendering_kwargs"]})
    generator.load_state_dict({k: v.clone() for k, v in load_file(str(REFERENCE / config["state_dict_file"])).items()})
    io = {k: v.clone() for k, v in load_file(str(REFERENCE / config["io_file"])).items()}
    return generator.eval(), io


@pytest.fixture(scope="module")
def eg3d_reference():
    """(generator, ws row 0, planes, mesh vectors, mesh config, my lattice) for the EG3D mesh vector."""
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    mesh_config = json.loads(_require(REFERENCE / "eg3d_small_seed0_mesh.json").read_text())
    vectors = load_file(str(REFERENCE / "eg3d_small_seed0_mesh.safetensors"))
    generator, io = _load_generator("eg3d_small_seed0")
    call = mesh_config["call"]
    with torch.no_grad():
        ws = generator.mapping(io["z"][:1], io["c_cond"][:1], truncation_psi=call["truncation_psi"],
                               truncation_cutoff=call["truncation_cutoff"])
        planes = generator.generate_planes(ws, noise_mode="const")
    lattice = density_lattice(generator, planes, call["N"], chunk_size=5000)  # several chunks
    return generator, ws, planes, vectors, mesh_config, lattice


def _official_ply_in_world(vectors, n, box):
    """The official PLY vertices mapped to world with the documented axis mapping."""
    ply = vectors["ply_vertices_voxel_units"].numpy()
    spacing = box / (n - 1)
    return np.stack([(n - 1 - ply[:, 2]) * spacing, ply[:, 1] * spacing, ply[:, 0] * spacing], 1) - box / 2


def test_density_lattice_matches_reference(eg3d_reference):
    _, _, _, vectors, _, lattice = eg3d_reference
    np.testing.assert_allclose(lattice, vectors["sigma_world_lattice"].numpy(), rtol=1e-4, atol=1e-4)


def test_mesh_orientation_matches_official_ply(eg3d_reference):
    generator, _, _, vectors, mesh_config, lattice = eg3d_reference
    call = mesh_config["call"]
    n, box = call["N"], generator.rendering_kwargs["box_warp"]
    vertices, faces = mesh_from_lattice(lattice, box, call["marching_cubes_level"], pad=call["pad"])
    assert faces.max() < len(vertices)
    assert np.all(np.abs(vertices) <= box / 2 + 1e-6)

    ply = vectors["ply_vertices_voxel_units"].numpy()
    tree = cKDTree(vertices)
    spacing = box / (n - 1)
    documented = tree.query(_official_ply_in_world(vectors, n, box))[0].mean()
    assert documented < 0.6 * spacing
    # Among all 48 axis permutations / flips of the PLY, the documented mapping is clearly the best match.
    others = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([False, True], repeat=3):
            candidate = ply[:, list(perm)].copy()
            candidate[:, list(flips)] = (n - 1) - candidate[:, list(flips)]
            if perm == (2, 1, 0) and flips == (True, False, False):
                continue
            others.append(tree.query(candidate * spacing - box / 2)[0].mean())
    assert documented < 0.7 * min(others)


def test_glb_of_reference_grid_keeps_world_frame(eg3d_reference, tmp_path):
    generator, ws, planes, vectors, mesh_config, lattice = eg3d_reference
    call = mesh_config["call"]
    box = generator.rendering_kwargs["box_warp"]
    vertices, faces = mesh_from_lattice(lattice, box, call["marching_cubes_level"], pad=call["pad"])
    colors = vertex_colors(generator, planes, ws, vertices)
    path = export_glb(tmp_path / "shape.glb", vertices, faces, vertex_colors=colors, head_height_m=0.25)

    loaded = trimesh.load(path, force="mesh")
    glb = np.asarray(loaded.vertices)
    lo, hi = vertices.min(0), vertices.max(0)
    expected = (vertices - (lo + hi) / 2) * (0.25 / (hi[1] - lo[1]))
    assert np.ptp(glb[:, 1]) == pytest.approx(0.25, rel=1e-3)  # +Y is the up axis that got scaled to 0.25 m
    # The GLB holds the world-frame mesh, centred and scaled, with no axis swap; the official PLY mapped with the
    # documented axis mapping lands on it too.
    assert cKDTree(glb).query(expected)[0].max() < 1e-5
    official = _official_ply_in_world(vectors, call["N"], box)
    official = (official - (lo + hi) / 2) * (0.25 / (hi[1] - lo[1]))
    swapped = official[:, [2, 1, 0]]
    assert cKDTree(glb).query(official)[0].mean() < 0.5 * cKDTree(glb).query(swapped)[0].mean()


def test_synthetic_head_faces_plus_z(tmp_path):
    """A tall ellipsoid with a nose at +z comes out of the GLB with +Y up and the nose toward +Z."""
    n, box = 48, 1.0
    axis = np.arange(n, dtype=np.float32) * (box / (n - 1)) - box / 2
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    head = 1 - (x / 0.2) ** 2 - (y / 0.3) ** 2 - (z / 0.22) ** 2
    nose = 1 - (x / 0.05) ** 2 - ((y + 0.02) / 0.06) ** 2 - ((z - 0.22) / 0.08) ** 2
    sigma = 20 * np.maximum(head, nose)
    vertices, faces = mesh_from_lattice(sigma, box, level=0.0)
    path = export_glb(tmp_path / "head.glb", vertices, faces)
    glb = np.asarray(trimesh.load(path, force="mesh").vertices)
    extents = np.ptp(glb, axis=0)
    assert extents[1] == pytest.approx(0.25, rel=1e-3) and extents[1] > extents[0]
    tip = glb[np.argmax(glb[:, 2])]
    assert abs(tip[0]) < 0.01  # the most forward point is the nose, on the mid-line
    # The +z extreme is the narrow nose tip, the -z extreme the broad back of the head.
    front = np.sum(glb[:, 2] > glb[:, 2].max() - 0.02)
    back = np.sum(glb[:, 2] < glb[:, 2].min() + 0.02)
    assert front < back / 2


def test_extract_and_export_panohead(tmp_path):
    generator, io = _load_generator("panohead_small_seed0")
    torch.set_num_threads(2)
    with torch.no_grad():
        ws = generator.mapping(io["z"], io["c_cond"], truncation_psi=0.7)
        planes = generator.generate_planes(ws[:1], noise_mode="const")
    level = float(np.quantile(density_lattice(generator, planes, 24), 0.7))
    vertices, faces, colors = extract_mesh(generator, ws, resolution=24, level=level)
    assert vertices.shape[1] == 3 and faces.max() < len(vertices) and colors.shape == vertices.shape
    assert colors.min() >= 0 and colors.max() <= 1 and colors.std() > 0
    path = export_shape_glb(tmp_path / "pano.glb", generator, ws, resolution=24, level=level,
                            metadata={"model": "panohead_small_seed0"}, face_budget=500)
    loaded = trimesh.load(path, force="mesh")
    assert 0 < len(loaded.faces) <= 500


def test_eg3d_vertex_colors_are_first_features(eg3d_reference):
    generator, ws, planes, _, _, _ = eg3d_reference
    points = np.array([[0.0, 0.0, 0.1], [0.1, -0.2, 0.0], [0.3, 0.3, -0.3]], np.float32)
    colors = vertex_colors(generator, planes, ws, points)
    coordinates = torch.from_numpy(points)[None]
    with torch.no_grad():
        features = generator.query_planes(planes, coordinates, torch.zeros_like(coordinates))["rgb"][0, :, :3]
    np.testing.assert_allclose(colors, features.clamp(0, 1).numpy(), atol=1e-6)


# ---- the sparse density lattice of the 3D head pipeline against the brute-force one ---------------------------


def _head_density(points: np.ndarray) -> np.ndarray:
    """A smooth head-like raw sigma: an ellipsoid skull with a nose and ears, positive inside (level 10 at about
    the surface, like the official shapes)."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    head = 1 - (x / 0.2) ** 2 - ((y - 0.02) / 0.28) ** 2 - (z / 0.22) ** 2
    nose = 1 - (x / 0.04) ** 2 - ((y + 0.02) / 0.06) ** 2 - ((z - 0.22) / 0.07) ** 2
    ears = 1 - ((np.abs(x) - 0.2) / 0.025) ** 2 - (y / 0.06) ** 2 - (z / 0.04) ** 2
    return (40 * np.maximum(np.maximum(head, nose), ears)).astype(np.float32)


@pytest.mark.parametrize("resolution,step", [(64, 4), (96, 4), (96, 6), (128, 4)])
def test_sparse_lattice_gives_the_full_lattice_mesh_of_a_smooth_head(resolution, step):
    """Coarse-to-fine: the sparse lattice equals the full one wherever marching cubes reads values, so the mesh is
    the same to the bit (the same function values; the rest only needs the right side of the level)."""
    from core.mesh import sparse_density_lattice
    from core.nets.shape import border_width, lattice_axis

    axis = lattice_axis(resolution, 1.0).numpy()
    pad = border_width(resolution)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    full = _head_density(points).reshape((resolution,) * 3)
    calls = []

    def density(points):
        calls.append(len(points))
        return _head_density(points)

    sparse = sparse_density_lattice(density, axis, 10.0, pad=pad, coarse_step=step)
    assert sum(calls) < 0.5 * (resolution - 2 * pad) ** 3  # computes well under half the interior
    expected = mesh_from_lattice(full, 1.0, 10.0)
    mine = mesh_from_lattice(sparse, 1.0, 10.0, pad)
    np.testing.assert_array_equal(mine[1], expected[1])
    np.testing.assert_array_equal(mine[0], expected[0])
    assert (sparse > 10)[pad:-pad, pad:-pad, pad:-pad].sum() == (full > 10)[pad:-pad, pad:-pad, pad:-pad].sum()


def test_sparse_lattice_border_and_dense_everywhere():
    """A field dense everywhere meshes the border box: the cells next to the border are evaluated in full."""
    from core.mesh import sparse_density_lattice

    axis = np.linspace(-0.5, 0.5, 40, dtype=np.float32)
    sparse = sparse_density_lattice(lambda p: 30 + p[:, 0].astype(np.float32), axis, 10.0, pad=3, coarse_step=4)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    full = (30 + points[:, 0]).reshape(40, 40, 40)
    expected, mine = mesh_from_lattice(full, 1.0, 10.0, 3), mesh_from_lattice(sparse, 1.0, 10.0, 3)
    np.testing.assert_array_equal(mine[1], expected[1])
    np.testing.assert_array_equal(mine[0], expected[0])
    assert (sparse[:3] == -1000).all() and (sparse[:, :, -3:] == -1000).all()


@pytest.mark.parametrize("level_quantile", [0.5, 0.8])
def test_pipeline_mesh_matches_brute_force_on_a_tiny_random_generator(level_quantile):
    """`Head3DPipeline.extract_mesh` (border skipped, coarse-to-fine, density alone) against `extract_mesh` on the
    full lattice: the same faces; vertices within 1e-4 box units (1/80 of a lattice step at 128, from sigma
    computed by a one-output matrix product instead of the 33-output one: float32 rounding, ~1e-6)."""
    from core.pipelines.head3d import Head3DPipeline
    from core.runtime import Runtime
    from training.train_head3d import Head3DConfig, build_head_generator

    torch.manual_seed(1)
    generator = build_head_generator(Head3DConfig(z_dim=16, mapping_layers=1, channel_base=256, channel_max=16,
                                                  triplane_size=16, neural_rendering_resolution=16, depth_samples=4,
                                                  importance_samples=4))
    pipeline = Head3DPipeline(generator, Runtime("cpu"), model_name="tiny-random")
    with torch.no_grad():
        ws = pipeline.latent(0)
        lattice = density_lattice(generator, generator.generate_planes(ws, noise_mode="const"), 64)
    pad = 7  # border_width(64)
    # a level between two lattice values (the widest gap near the quantile): no lattice value lies within float
    # rounding of it, where either path could put it on the other side
    values = np.sort(lattice[pad:-pad, pad:-pad, pad:-pad].ravel())
    k = int(level_quantile * len(values))
    gaps = np.diff(values[k - 3000:k + 3000])
    level = float(values[k - 3000 + np.argmax(gaps)] + gaps.max() / 2)
    assert gaps.max() > 2e-5
    with torch.no_grad():
        expected = extract_mesh(generator, ws, 64, level)
    for step in (1, 4):
        mine = pipeline.extract_mesh(ws, 64, level, coarse_step=step)
        np.testing.assert_array_equal(mine[1], expected[1])
        np.testing.assert_allclose(mine[0], expected[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(mine[2], expected[2], atol=1e-3, rtol=0)


def _frontal_square(count: int = 9, half: float = 0.1):
    """Vertices of a square in the z = 0 plane facing the frontal camera (+z), their normals and that camera."""
    from core.nets.camera import camera_label

    axis = np.linspace(-half, half, count)
    vertices = np.stack(np.meshgrid(axis, axis, [0.0], indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
    normals = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (len(vertices), 1))
    return vertices, normals, camera_label(0, 0, radius=2.7)


def test_colors_from_views_take_the_image_where_the_surface_is_seen():
    """A square facing the frontal camera over an image whose left half is red and right half blue: world +x shows
    on the image's right (+y up shows at the top, rows counted from the top), so each vertex takes its side's
    colour; a surface rendered in front of the square (smaller depth) hides it, and a vertex outside the image or
    behind the camera keeps the fallback."""
    from core.nets.shape import colors_from_views

    vertices, normals, camera = _frontal_square()
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[:, :, :16, 0] = 255
    image[:, :, 16:, 2] = 255
    image[:, :8, :, 1] = 255  # a green band along the top rows
    fallback = np.full((len(vertices), 3), 0.5, np.float32)
    far = np.full((1, 16, 16), 5.0, np.float32)
    colours = colors_from_views(vertices, normals, camera, image, far, fallback)
    left, right = vertices[:, 0] < -0.01, vertices[:, 0] > 0.01
    assert (colours[left, 0] > 0.9).all() and (colours[left, 2] < 0.1).all()
    assert (colours[right, 2] > 0.9).all() and (colours[right, 0] < 0.1).all()
    assert (colours[vertices[:, 1] > 0.09, 1] < 0.1).all()  # the top of the square is not at the image's top
    np.testing.assert_array_equal(colours, colors_from_views(vertices, -normals, camera, image, far, fallback))

    near = np.full((1, 16, 16), 2.0, np.float32)  # something 0.7 in front of the square
    np.testing.assert_array_equal(colors_from_views(vertices, normals, camera, image, near, fallback), fallback)
    outside = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 3.5]], np.float32)  # far to the side; behind the camera
    kept = colors_from_views(outside, normals[:2], camera, image, far, fallback[:2])
    np.testing.assert_array_equal(kept, fallback[:2])


def test_pipeline_glb_colours_come_from_the_given_views():
    """`Head3DPipeline.extract_mesh` with views: the surface seen by a frontal view of a plain green image turns
    green; without views the colours are the generator's features (none green)."""
    from core.nets.camera import camera_label
    from core.pipelines.head3d import Head3DPipeline, RenderedViews
    from core.runtime import Runtime
    from training.train_head3d import Head3DConfig, build_head_generator

    torch.manual_seed(1)
    generator = build_head_generator(Head3DConfig(z_dim=16, mapping_layers=1, channel_base=256, channel_max=16,
                                                  triplane_size=16, neural_rendering_resolution=16, depth_samples=4,
                                                  importance_samples=4))
    with torch.no_grad():
        generator.decoder.net[-1].bias[0] += 20  # a dense field: a surface at the official level
    pipeline = Head3DPipeline(generator, Runtime("cpu"), model_name="tiny-random")
    ws = pipeline.latent(0)
    green = np.zeros((1, 32, 32, 3), np.uint8)
    green[..., 1] = 255
    views = RenderedViews(camera_label(0, 0, radius=pipeline.camera_radius, lookat=pipeline.camera_pivot), green,
                          np.full((1, 16, 16), 100.0, np.float32))
    with torch.no_grad():
        vertices, _, plain = pipeline.extract_mesh(ws, 32)
        _, _, painted = pipeline.extract_mesh(ws, 32, views=views)

    def is_green(colours):
        return (colours[:, 1] > 0.99) & (colours[:, 0] < 0.01) & (colours[:, 2] < 0.01)

    assert not is_green(plain).any()
    assert 0.1 < is_green(painted).mean() < 0.9  # the front is painted, the back keeps its features
    front = (vertices[:, 2] > np.quantile(vertices[:, 2], 0.9)) & (np.abs(vertices[:, :2]) < 0.2).all(1)
    assert front.sum() > 10 and is_green(painted)[front].mean() > 0.9  # the middle of the front is in the image
