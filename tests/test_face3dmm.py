"""core.face3dmm: compact ICT-FaceKit model, landmark fitting, SH lighting, rasterizer, condition renders, GLB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from skimage.draw import polygon

from core.face3dmm import (
    DEFAULT_MODEL_DIR,
    EXPRESSION_NAMES,
    REGION_NAMES,
    FaceParams,
    load_face_model,
    rasterize,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ICT_DATA = REPO_ROOT.parent / "shared" / "data" / "ict_facekit" / "ict_facekit.npz"
MEDIAPIPE_REGIONS = REPO_ROOT.parent / "shared" / "data" / "mediapipe" / "face_mesh_regions.json"
FACE_PHOTOS = sorted((REPO_ROOT / "tests" / "fixtures" / "faces").glob("*.jpg"))
NOSE_TIP, CHIN, FOREHEAD, RIGHT_CHEEK, LEFT_CHEEK = 1, 152, 151, 234, 454  # MediaPipe indices (subject's right / left)
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263
# FACEMESH_FACE_OVAL as a closed loop (MediaPipe face_mesh_connections order).
FACE_OVAL_LOOP = [
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
]  # fmt: skip

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model():
    return load_face_model()


@pytest.fixture(scope="module")
def photo_fits(model):
    """(image, landmarks, fitted params) for every fixture photo, with MediaPipe landmarks from core.face."""
    from core.face import detect_faces

    fits = []
    for path in FACE_PHOTOS:
        image = np.asarray(Image.open(path).convert("RGB"))
        faces = detect_faces(image)
        assert faces, f"no face found in {path.name}"
        landmarks = np.asarray(faces[0].landmarks, dtype=np.float32)
        params = model.fit_landmarks(landmarks, image.shape[0], image.shape[1])
        fits.append((image, landmarks, params))
    return fits


def test_bundle_is_compact_and_consistent(model):
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir())
    assert size <= 4 * 2**20
    for name in ("model.safetensors", "config.json", "README.md", "LICENSE"):
        assert (DEFAULT_MODEL_DIR / name).is_file()
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert tuple(config["expression_names"]) == EXPRESSION_NAMES and len(EXPRESSION_NAMES) == 53
    assert EXPRESSION_NAMES.index("jawOpen") == 26
    assert model.num_identity == config["num_identity"] >= 30
    assert model.triangles.max() < model.num_vertices
    assert set(model.triangle_region.unique().tolist()) == set(range(len(REGION_NAMES)))
    assert model.landmark_triangles.shape == (478, 3) and model.landmark_weight[:468].min() > 0


@pytest.mark.skipif(not ICT_DATA.exists(), reason="needs ../shared/data/ict_facekit")
def test_compact_model_reproduces_full_ict_model(model):
    ict = np.load(ICT_DATA)
    kept = model.source_vertex_index.numpy()
    generator = torch.Generator().manual_seed(0)
    identity = torch.randn(model.num_identity, generator=generator)
    expression = torch.rand(53, generator=generator)
    full = ict["neutral_vertices"][kept].astype(np.float64)
    full += np.tensordot(identity.double().numpy(), ict["identity_deltas"][: model.num_identity, kept], 1)
    full += np.tensordot(expression.double().numpy(), ict["expression_deltas"][:, kept], 1)
    compact = model.vertices(identity, expression).numpy()
    assert np.abs(compact - full).max() < 0.02  # cm; float16 storage of coordinates up to ~20 cm
    assert np.abs(compact - full).mean() < 0.003


def test_vertices_are_differentiable_and_batched(model):
    identity = torch.zeros(2, model.num_identity, requires_grad=True)
    expression = torch.zeros(2, 53)
    expression[1, EXPRESSION_NAMES.index("jawOpen")] = 1.0
    vertices = model.vertices(identity, expression)
    assert vertices.shape == (2, model.num_vertices, 3)
    chin = model.landmarks_3d(identity, expression)[:, CHIN]
    assert chin[1, 1] < chin[0, 1] - 0.5  # an open jaw lowers the chin
    vertices[:, :, 1].sum().backward()
    assert identity.grad.abs().sum() > 0


def test_params_vector_round_trip():
    params = FaceParams(
        identity=torch.randn(7),
        expression=torch.rand(53),
        rotation=torch.tensor([10.0, -5, 2]),
        translation=torch.tensor([0.1, -0.2]),
        scale=torch.tensor(0.09),
        sh=torch.randn(3, 9),
    )
    vector = params.to_vector()
    assert vector.shape == (FaceParams.vector_size(7),)
    again = FaceParams.from_vector(vector, 7)
    assert torch.equal(again.to_vector(), vector)
    assert torch.equal(again.sh, params.sh) and again.scale.shape == ()
    with pytest.raises(ValueError):
        FaceParams.from_vector(vector[:-1], 7)


def test_fit_recovers_synthetic_landmarks(model):
    truth = model.neutral_params()
    truth.identity = torch.randn(model.num_identity, generator=torch.Generator().manual_seed(1))
    truth.expression[EXPRESSION_NAMES.index("mouthSmile_L")] = 0.7
    truth.rotation = torch.tensor([20.0, -10.0, 5.0])
    truth.translation = torch.tensor([0.05, -0.1])
    landmarks = model.landmarks(truth, 256, 256).numpy()
    fitted = model.fit_landmarks(landmarks, 256, 256)
    error = np.linalg.norm(model.landmarks(fitted, 256, 256).numpy() - landmarks, axis=1)[:468]
    assert error.mean() < 1.0  # pixels
    assert torch.allclose(fitted.rotation, truth.rotation, atol=4.0)
    assert abs(fitted.scale.item() / truth.scale.item() - 1) < 0.1  # identity modes also change the size


def test_fitted_landmarks_reproject_on_photos(model, photo_fits):
    for image, landmarks, params in photo_fits:
        predicted = model.landmarks(params, image.shape[0], image.shape[1]).numpy()
        error = np.linalg.norm(predicted - landmarks, axis=1)[:468]
        eye_distance = np.linalg.norm(landmarks[RIGHT_EYE_OUTER] - landmarks[LEFT_EYE_OUTER])
        assert error.mean() < 0.05 * eye_distance and np.median(error) < 12.0  # pixels on 400-500 px photos
        assert params.expression.min() >= 0 and params.expression.max() <= 1
        assert params.rotation.abs().max() < 30  # the fixtures are near-frontal


def test_render_covers_the_landmarked_face(model, photo_fits):
    for image, landmarks, params in photo_fits:
        height, width = image.shape[:2]
        render = model.render(params, height, width)
        assert render.shaded.shape == render.normals.shape == (height, width, 3)
        oval = np.zeros((height, width), bool)
        rows, cols = polygon(landmarks[FACE_OVAL_LOOP, 1], landmarks[FACE_OVAL_LOOP, 0], oval.shape)
        oval[rows, cols] = True
        assert (render.mask & oval).sum() / oval.sum() > 0.95
        inner = np.round(landmarks[:468]).astype(int)
        on_face = render.region[inner[:, 1].clip(0, height - 1), inner[:, 0].clip(0, width - 1)]
        assert np.isin(on_face, [0, 2, 3]).mean() > 0.9  # face skin, lips/mouth or eyes, not background
        assert not render.mask[0, 0] and render.shaded[~render.mask].max() == 0


def test_positive_yaw_turns_the_nose_toward_image_right(model):
    params = model.neutral_params()
    frontal = model.landmarks(params, 128, 128)
    params.rotation = torch.tensor([30.0, 0.0, 0.0])
    turned = model.landmarks(params, 128, 128)
    frontal_offset = frontal[NOSE_TIP, 0] - frontal[[RIGHT_CHEEK, LEFT_CHEEK], 0].mean()
    turned_offset = turned[NOSE_TIP, 0] - turned[[RIGHT_CHEEK, LEFT_CHEEK], 0].mean()
    assert abs(frontal_offset) < 1.0 and turned_offset > 5.0
    normals = model.render(params, 128).normals.astype(float) / 255 * 2 - 1
    x, y = np.round(turned[FOREHEAD].numpy()).astype(int)
    assert normals[y, x, 0] > 0.3  # the forehead now faces the image's right (+x); sin(30 deg) = 0.5
    params.rotation = torch.tensor([0.0, 20.0, 0.0])
    tipped = model.landmarks(params, 128, 128)
    assert tipped[NOSE_TIP, 1] - tipped[CHIN, 1] > frontal[NOSE_TIP, 1] - frontal[CHIN, 1]  # +pitch: nose down


def test_lighting_fit_reproduces_a_known_light(model):
    params = model.neutral_params()
    params.rotation = torch.tensor([15.0, -5.0, 0.0])
    params.sh = torch.tensor([[0.5, 0.15, 0.2, -0.2, 0.05, 0.0, -0.05, 0.0, 0.02]]).repeat(3, 1)
    params.sh[0] *= 1.2
    params.sh[2] *= 0.6
    target = model.render(params, 192)
    fitted = model.fit_lighting(target.shaded, replace_sh(params, torch.zeros(3, 9)))
    again = model.render(fitted, 192)
    face = target.region == REGION_NAMES.index("face")
    error = np.abs(again.shaded[face].astype(float) - target.shaded[face]).mean()
    assert error < 4.0  # uint8 levels
    assert fitted.sh[0, 0] > fitted.sh[1, 0] > fitted.sh[2, 0]  # reddish light stays reddish
    assert (fitted.sh[:, 3] < 0).all()  # the light comes from -x


def replace_sh(params: FaceParams, sh: torch.Tensor) -> FaceParams:
    return FaceParams(params.identity, params.expression, params.rotation, params.translation, params.scale, sh)


def test_rasterizer_keeps_the_nearest_front_face():
    far = [[2.0, 2.0, 0.0], [14.0, 2.0, 0.0], [2.0, 14.0, 0.0]]
    near = [[4.0, 4.0, 1.0], [15.0, 4.0, 1.0], [4.0, 15.0, 1.0]]
    screen = torch.tensor(far + near)
    # counter-clockwise seen from +z means clockwise in y-down pixels: (0, 2, 1) order
    triangle_id, bary = rasterize(screen, torch.tensor([[0, 2, 1], [3, 5, 4]]), 16, 16)
    assert triangle_id[6, 6] == 1 and triangle_id[2, 2] == 0 and triangle_id[15, 15] == -1
    assert torch.allclose(bary[6, 6].sum(), torch.tensor(1.0))
    back_facing, _ = rasterize(screen, torch.tensor([[0, 1, 2]]), 16, 16)
    assert (back_facing == -1).all()


def test_glb_export_is_y_up_and_faces_plus_z(model, tmp_path):
    params = model.neutral_params()
    params.expression[EXPRESSION_NAMES.index("jawOpen")] = 0.3
    path = model.export_glb(tmp_path / "face.glb", params, metadata={"method": "test"})
    mesh = trimesh.load(path, force="mesh")
    vertices = np.asarray(mesh.vertices)
    assert len(mesh.faces) == len(model.triangles)
    extent = vertices.max(0) - vertices.min(0)
    assert extent[1] == pytest.approx(0.25, rel=1e-3) and extent[1] > extent[0]  # +y is the long (up) axis
    nose = vertices[np.argmax(vertices[:, 2])]  # the most +z point is the nose tip: centred, mid-height
    assert abs(nose[0]) < 0.1 * extent[0] and vertices[:, 1].min() < nose[1] < vertices[:, 1].max()
    top = vertices[vertices[:, 1] > vertices[:, 1].max() - 0.02]
    assert abs(top[:, 0].mean()) < 0.02  # the crown sits above the centre, so the mesh is upright
    assert mesh.visual.vertex_colors[:, :3].std() > 0  # SH-shaded colours


def test_mediapipe_oval_loop_is_the_documented_region():
    if MEDIAPIPE_REGIONS.exists():
        regions = json.loads(MEDIAPIPE_REGIONS.read_text())["regions"]
        assert sorted(FACE_OVAL_LOOP) == regions["FACEMESH_FACE_OVAL"]["indices"]
