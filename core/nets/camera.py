"""Cameras for EG3D / PanoHead: look-at poses, FOV -> normalised intrinsics, the 25-float camera label.

Conventions (those of the official `camera_utils.py`, see shared/reference/README.md section 4):
* World frame: +y up; the frontal camera sits on +z and looks toward -z, so the face looks toward +z.
* Camera-to-world matrices are OpenCV-style: columns are the camera's +x (image right), +y (image down) and +z
  (viewing direction) in world coordinates, then the camera centre.
* `look_at_pose(h, v, ...)` orbits the world origin (not the look-at point, which only sets the viewing
  direction). The scripts call it with h = pi/2 + yaw, v = pi/2 + pitch: positive yaw moves the camera toward +x,
  negative pitch moves it up (it looks down at the face).
* Label c = cam2world (4x4, row-major, 16 floats) followed by the intrinsics (3x3 row-major, 9 floats) normalised by
  the image size: [[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]].

Unlike the official `LookAtPoseSampler.sample`, `look_at_pose` draws random numbers only when a standard deviation
is non-zero, so building a camera never disturbs the global RNG.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

EG3D_FOV_DEG = 18.837
EG3D_CAMERA_RADIUS = 2.7
EG3D_LOOKAT = (0.0, 0.0, 0.2)
PANOHEAD_LOOKAT = (0.0, 0.0, 0.0)


def _normalize(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / torch.norm(vectors, dim=-1, keepdim=True)


def cam2world_from_forward(forward: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """[N, 4, 4] camera-to-world matrices for cameras at `origin` [N, 3] looking along `forward` [N, 3] (world +y up)."""
    forward = _normalize(forward)
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=forward.dtype, device=forward.device).expand_as(forward)
    right = -_normalize(torch.cross(world_up, forward, dim=-1))
    down = _normalize(torch.cross(forward, right, dim=-1))
    cam2world = torch.eye(4, dtype=forward.dtype, device=forward.device).repeat(forward.shape[0], 1, 1)
    cam2world[:, :3, :3] = torch.stack((right, down, forward), dim=-1)
    cam2world[:, :3, 3] = origin
    return cam2world


def look_at_pose(
    horizontal: float | torch.Tensor,
    vertical: float | torch.Tensor,
    lookat: Sequence[float] | torch.Tensor = EG3D_LOOKAT,
    radius: float = EG3D_CAMERA_RADIUS,
    horizontal_stddev: float = 0.0,
    vertical_stddev: float = 0.0,
    batch_size: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[batch_size, 4, 4] cam2world matrices with the semantics of the official `LookAtPoseSampler.sample`.

    `horizontal` / `vertical` are the official h / v angles in radians (pi/2, pi/2 is the frontal camera); Gaussian
    jitter with the given standard deviations is drawn from `generator` only when a deviation is non-zero.
    """
    h = torch.as_tensor(horizontal, dtype=torch.float32).reshape(-1, 1).expand(batch_size, 1).clone()
    v = torch.as_tensor(vertical, dtype=torch.float32).reshape(-1, 1).expand(batch_size, 1).clone()
    if horizontal_stddev:
        h = h + torch.randn(h.shape, generator=generator) * horizontal_stddev
    if vertical_stddev:
        v = v + torch.randn(v.shape, generator=generator) * vertical_stddev
    v = torch.clamp(v, 1e-5, math.pi - 1e-5)
    phi = torch.arccos(1 - 2 * (v / math.pi))

    origin = torch.zeros((batch_size, 3))
    origin[:, 0:1] = radius * torch.sin(phi) * torch.cos(math.pi - h)
    origin[:, 1:2] = radius * torch.cos(phi)
    origin[:, 2:3] = radius * torch.sin(phi) * torch.sin(math.pi - h)

    lookat = torch.as_tensor(lookat, dtype=torch.float32).reshape(1, 3)
    return cam2world_from_forward(_normalize(lookat - origin), origin)


def fov_to_focal(fov_degrees: float) -> float:
    """Normalised focal length of the official `FOV_to_intrinsics` (its constants 3.14159 and 1.414 included)."""
    return float(1 / (math.tan(fov_degrees * 3.14159 / 360) * 1.414))


def fov_to_intrinsics(fov_degrees: float = EG3D_FOV_DEG) -> torch.Tensor:
    """[3, 3] intrinsics normalised by the image size: [[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]]."""
    focal = fov_to_focal(fov_degrees)
    return torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]])


def make_label(cam2world: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """[N, 25] camera labels from [N, 4, 4] cam2world and [3, 3] or [N, 3, 3] intrinsics."""
    cam2world = cam2world.reshape(-1, 16)
    intrinsics = intrinsics.reshape(-1, 9).expand(cam2world.shape[0], 9)
    return torch.cat([cam2world, intrinsics.to(cam2world.dtype)], dim=1)


def camera_label(
    yaw_deg: float,
    pitch_deg: float,
    radius: float = EG3D_CAMERA_RADIUS,
    fov_deg: float = EG3D_FOV_DEG,
    lookat: Sequence[float] = EG3D_LOOKAT,
) -> torch.Tensor:
    """[1, 25] label of the camera at (yaw, pitch) degrees from the frontal view.

    Positive yaw moves the camera toward world +x (it sees the face's left cheek); negative pitch moves it up.
    (0, 0) is the usual conditioning / frontal camera. Use `lookat=PANOHEAD_LOOKAT` for PanoHead.
    """
    pose = look_at_pose(
        math.pi / 2 + math.radians(yaw_deg), math.pi / 2 + math.radians(pitch_deg), lookat=lookat, radius=radius
    )
    return make_label(pose, fov_to_intrinsics(fov_deg))
