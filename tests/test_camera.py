"""Camera helpers against the official cameras stored with the EG3D / PanoHead reference vectors."""

import json
import math
from pathlib import Path

import pytest
import torch

from core.nets.camera import (
    EG3D_LOOKAT,
    PANOHEAD_LOOKAT,
    camera_label,
    fov_to_focal,
    fov_to_intrinsics,
    look_at_pose,
    make_label,
)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _reference_cameras(name):
    path = REFERENCE / f"{name}_io.safetensors"
    if not path.exists():
        pytest.skip(f"reference vectors not found at {path}")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    call = json.loads((REFERENCE / f"{name}.json").read_text())["call"]["cameras"]
    return tensors["c_cond"], tensors["c_render"], call


def test_focal_length_matches_official_constants():
    assert fov_to_focal(18.837) == pytest.approx(4.263391, abs=1e-6)
    assert fov_to_focal(18) == pytest.approx(4.4652, abs=1e-4)
    intrinsics = fov_to_intrinsics(18.837)
    assert intrinsics[0, 2] == 0.5 and intrinsics[1, 2] == 0.5 and intrinsics[2, 2] == 1
    assert intrinsics[0, 1] == 0 and intrinsics[0, 0] == intrinsics[1, 1]


@pytest.mark.parametrize("name,lookat", [("eg3d_small_seed0", EG3D_LOOKAT), ("panohead_small_seed0", PANOHEAD_LOOKAT)])
def test_labels_match_reference(name, lookat):
    c_cond, c_render, call = _reference_cameras(name)
    assert call["pivot"] == pytest.approx(list(lookat))
    intrinsics = fov_to_intrinsics(call["fov_deg"])
    cond = make_label(look_at_pose(math.pi / 2, math.pi / 2, lookat, call["radius"]), intrinsics)
    torch.testing.assert_close(cond, c_cond[:1], rtol=0, atol=1e-6)
    for row, spec in enumerate(call["render"]):
        pose = look_at_pose(math.pi / 2 + spec["yaw"], math.pi / 2 + spec["pitch"], lookat, call["radius"])
        torch.testing.assert_close(make_label(pose, intrinsics), c_render[row : row + 1], rtol=0, atol=1e-6)
        by_degrees = camera_label(
            math.degrees(spec["yaw"]), math.degrees(spec["pitch"]), call["radius"], call["fov_deg"], lookat
        )
        torch.testing.assert_close(by_degrees, c_render[row : row + 1], rtol=0, atol=1e-6)


def test_sign_conventions():
    frontal = camera_label(0, 0).reshape(25)
    pose = frontal[:16].reshape(4, 4)
    assert pose[2, 3] > 2.5  # camera on +z
    assert pose[2, 2] < -0.9  # looking toward -z
    assert pose[1, 1] < -0.9  # camera +y (image down) is world -y
    assert pose[0, 0] > 0.9  # image right is world +x
    yawed = camera_label(30, 0).reshape(25)
    assert yawed[3] > 1.0  # positive yaw moves the camera toward +x
    above = camera_label(0, -20).reshape(25)
    assert above[7] > 0.5  # negative pitch moves the camera up
    assert torch.linalg.norm(above[[3, 7, 11]]) == pytest.approx(2.7, abs=1e-5)  # orbits the origin


def test_rotation_is_orthonormal_and_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pose = look_at_pose(1.1, 1.9, radius=2.0, batch_size=3)
    assert torch.equal(torch.rand(3), expected)
    rotation = pose[:, :3, :3]
    torch.testing.assert_close(rotation.transpose(1, 2) @ rotation, torch.eye(3).expand(3, 3, 3), atol=1e-6, rtol=0)
    assert pose.shape == (3, 4, 4)
    torch.testing.assert_close(pose[:, 3], torch.tensor([0.0, 0, 0, 1]).expand(3, 4))


def test_jitter_uses_generator():
    a = look_at_pose(math.pi / 2, math.pi / 2, horizontal_stddev=0.3, batch_size=4, generator=torch.Generator().manual_seed(5))
    b = look_at_pose(math.pi / 2, math.pi / 2, horizontal_stddev=0.3, batch_size=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
