"""ICT-FaceKit 3D morphable face model at runtime: coefficients -> mesh, landmark fitting, SH lighting, condition
renders and GLB export.

The bundled compact model (`weights/ict_facekit/`, built by `training/build_ict_compact.py`) keeps a decimated
skin + mouth socket + eyeball mesh whose vertices are a subset of ICT's, the leading identity modes and all 53
expressions, and a MediaPipe Face Mesh (478 landmarks) -> surface correspondence.

Conventions
* Model frame: centimetres, +x = the subject's left (the viewer's right), +y up, +z out of the face (it looks toward
  +z), the glTF frame expected by `core.mesh.export_glb`.
* Rotation (yaw, pitch, roll) in degrees, applied as R = Rz(roll) @ Ry(yaw) @ Rx(pitch), right-handed about the model
  axes: **+yaw turns the nose toward +x, i.e. toward the image's right (the subject turns to their own left)**;
  +pitch tips the nose down; +roll turns the face counter-clockwise in the image.
* Camera: weak perspective looking down -z. Normalised image coordinates (u, v) = scale * (R X)_xy + translation,
  with u to the right, v up, and one unit = half the longer image side, centred on the image. So the same parameters
  describe the same framing at any resolution of a given aspect ratio.
* Lighting: second-order spherical harmonics, 9 coefficients per colour channel, on camera-frame normals with the
  Lambertian convolution folded into the basis (as in Deep3DFaceRecon): colour = albedo * sum_k sh[c, k] * Y_k(n).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "weights" / "ict_facekit"
REGISTRY_NAME = "ict-facekit-compact"

EXPRESSION_NAMES: tuple[str, ...] = (
    "browDown_L", "browDown_R", "browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R",
    "cheekPuff_L", "cheekPuff_R", "cheekSquint_L", "cheekSquint_R", "eyeBlink_L", "eyeBlink_R",
    "eyeLookDown_L", "eyeLookDown_R", "eyeLookIn_L", "eyeLookIn_R", "eyeLookOut_L", "eyeLookOut_R",
    "eyeLookUp_L", "eyeLookUp_R", "eyeSquint_L", "eyeSquint_R", "eyeWide_L", "eyeWide_R",
    "jawForward", "jawLeft", "jawOpen", "jawRight", "mouthClose", "mouthDimple_L", "mouthDimple_R",
    "mouthFrown_L", "mouthFrown_R", "mouthFunnel", "mouthLeft", "mouthLowerDown_L", "mouthLowerDown_R",
    "mouthPress_L", "mouthPress_R", "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper",
    "mouthShrugLower", "mouthShrugUpper", "mouthSmile_L", "mouthSmile_R", "mouthStretch_L", "mouthStretch_R",
    "mouthUpperUp_L", "mouthUpperUp_R", "noseSneer_L", "noseSneer_R",
)  # fmt: skip
NUM_EXPRESSIONS = len(EXPRESSION_NAMES)
SH_COEFFICIENTS = 9
REGION_NAMES = ("face", "head", "mouth", "eyes")
DEFAULT_SCALE = 1.0 / 12.0  # normalised image units per cm: the face spans about 3/4 of the image width

# Real SH basis up to l=2 with the Lambertian convolution factors (pi, 2pi/3, pi/4) folded in.
_SH_CONSTANTS = (
    math.pi / math.sqrt(4 * math.pi),
    2 * math.pi / 3 * math.sqrt(3 / (4 * math.pi)),
    math.pi / 4 * 3 * math.sqrt(5 / (12 * math.pi)),
    math.pi / 4 * 0.5 * math.sqrt(5 / (4 * math.pi)),
    math.pi / 4 * 1.5 * math.sqrt(5 / (12 * math.pi)),
)


@dataclass
class FaceParams:
    """One face: identity (K), expression (53, in [0, 1]), rotation (yaw, pitch, roll degrees), translation
    (u, v normalised image units), scale (normalised units per cm) and SH lighting (3 x 9). Tensors, float32."""

    identity: torch.Tensor
    expression: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_EXPRESSIONS))
    rotation: torch.Tensor = field(default_factory=lambda: torch.zeros(3))
    translation: torch.Tensor = field(default_factory=lambda: torch.zeros(2))
    scale: torch.Tensor = field(default_factory=lambda: torch.tensor(DEFAULT_SCALE))
    sh: torch.Tensor = field(default_factory=lambda: default_sh())

    @classmethod
    def neutral(cls, num_identity: int) -> FaceParams:
        """Mean identity, no expression, frontal, centred, default light."""
        return cls(identity=torch.zeros(num_identity))

    @staticmethod
    def vector_size(num_identity: int) -> int:
        """Length of `to_vector()` for a model with `num_identity` identity modes."""
        return num_identity + NUM_EXPRESSIONS + 3 + 2 + 1 + 3 * SH_COEFFICIENTS

    def to_vector(self) -> torch.Tensor:
        """Flat [identity, expression, rotation (deg), translation, scale, sh (row-major 3x9)] for conditioning."""
        parts = (self.identity, self.expression, self.rotation, self.translation, self.scale.reshape(1), self.sh)
        return torch.cat([p.reshape(-1).float() for p in parts])

    @classmethod
    def from_vector(cls, vector: torch.Tensor, num_identity: int) -> FaceParams:
        """Inverse of `to_vector`."""
        if vector.shape != (cls.vector_size(num_identity),):
            raise ValueError(f"expected a vector of {cls.vector_size(num_identity)} values, got {tuple(vector.shape)}")
        sizes = (num_identity, NUM_EXPRESSIONS, 3, 2, 1, 3 * SH_COEFFICIENTS)
        identity, expression, rotation, translation, scale, sh = torch.split(vector.float(), sizes)
        return cls(identity, expression, rotation, translation, scale.reshape(()), sh.reshape(3, SH_COEFFICIENTS))


def default_sh() -> torch.Tensor:
    """Neutral grey light: ambient plus a soft light from above the camera."""
    sh = torch.zeros(3, SH_COEFFICIENTS)
    sh[:, 0] = 0.6
    sh[:, 1] = 0.15
    sh[:, 2] = 0.25
    return sh


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """Irradiance SH basis [..., 9] of unit normals [..., 3], ordered 1, y, z, x, xy, yz, 3z^2-1, xz, x^2-y^2."""
    x, y, z = normals.unbind(-1)
    c0, c1, c2, c3, c4 = _SH_CONSTANTS
    return torch.stack(
        [torch.full_like(x, c0), c1 * y, c1 * z, c1 * x, c2 * x * y, c2 * y * z, c3 * (3 * z * z - 1), c2 * x * z,
         c4 * (x * x - y * y)], dim=-1,
    )  # fmt: skip


def rotation_matrix(rotation_deg: torch.Tensor) -> torch.Tensor:
    """R = Rz(roll) @ Ry(yaw) @ Rx(pitch) from (yaw, pitch, roll) in degrees; differentiable, [..., 3, 3]."""
    yaw, pitch, roll = torch.deg2rad(rotation_deg).unbind(-1)
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)

    def matrix(rows):
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    cy, sy, cp, sp, cr, sr = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin(), roll.cos(), roll.sin()
    rx = matrix([[one, zero, zero], [zero, cp, -sp], [zero, sp, cp]])
    ry = matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rz = matrix([[cr, -sr, zero], [sr, cr, zero], [zero, zero, one]])
    return rz @ ry @ rx


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals [V, 3] (outward for counter-clockwise triangles)."""
    a, b, c = vertices[triangles].unbind(1)
    face_normals = torch.linalg.cross(b - a, c - a)
    normals = torch.zeros_like(vertices).index_add_(0, triangles.reshape(-1), face_normals.repeat_interleave(3, 0))
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


def normalised_to_pixels(uv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised image coordinates (u right, v up, unit = half the longer side) -> pixel (x, y) coordinates."""
    half = max(height, width) / 2
    return torch.stack([width / 2 + uv[..., 0] * half, height / 2 - uv[..., 1] * half], -1)


def pixels_to_normalised(xy: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `normalised_to_pixels`."""
    half = max(height, width) / 2
    return torch.stack([(xy[..., 0] - width / 2) / half, (height / 2 - xy[..., 1]) / half], -1)


def rasterize(
    screen: torch.Tensor, triangles: torch.Tensor, height: int, width: int, max_candidates: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-buffer rasterizer with back-face culling.

    `screen` is [V, 3]: pixel x (right), pixel y (down) and depth (larger = nearer); pixel centres sit at +0.5.
    Triangles that are counter-clockwise when seen from +z are front-facing. Returns the visible triangle per pixel
    [H, W] (-1 for background) and barycentric weights [H, W, 3] (zero on the background). Not differentiable
    with respect to `screen`; interpolate attributes with the returned barycentrics.
    """
    corners = screen[triangles]  # [F, 3, 3]
    p0, p1, p2 = corners[:, 0, :2], corners[:, 1, :2], corners[:, 2, :2]
    # y points down in pixels, so a triangle counter-clockwise seen from +z has a negative signed area here.
    area = (p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0])
    lo = torch.ceil(corners[..., :2].amin(1) - 0.5).clamp_min(0).long()
    hi = torch.floor(corners[..., :2].amax(1) - 0.5)
    hi = torch.minimum(hi, torch.tensor([width - 1.0, height - 1.0])).long()
    box = (hi - lo + 1).clamp_min(0)
    counts = box[:, 0] * box[:, 1]
    keep = torch.nonzero((area < -1e-9) & (counts > 0)).squeeze(1)

    depth_buffer = torch.full((height * width,), -torch.inf)
    pixel_chunks, tri_chunks, bary_chunks, depth_chunks = [], [], [], []
    start = 0
    cumulative = torch.cumsum(counts[keep], 0)
    while start < len(keep):
        base = cumulative[start - 1] if start > 0 else 0
        stop = max(int(torch.searchsorted(cumulative, base + max_candidates, right=True)), start + 1)
        chunk = keep[start:stop]
        start = stop
        n = counts[chunk]
        tri = torch.repeat_interleave(chunk, n)
        offset = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        box_w = box[tri, 0]
        px = lo[tri, 0] + offset % box_w
        py = lo[tri, 1] + offset // box_w
        cx, cy = px.float() + 0.5, py.float() + 0.5
        a, b, c = p0[tri], p1[tri], p2[tri]
        w0 = (b[:, 0] - cx) * (c[:, 1] - cy) - (b[:, 1] - cy) * (c[:, 0] - cx)
        w1 = (c[:, 0] - cx) * (a[:, 1] - cy) - (c[:, 1] - cy) * (a[:, 0] - cx)
        w2 = (a[:, 0] - cx) * (b[:, 1] - cy) - (a[:, 1] - cy) * (b[:, 0] - cx)
        bary = torch.stack([w0, w1, w2], 1) / area[tri, None]
        inside = (bary >= 0).all(1)
        tri, bary, pixel = tri[inside], bary[inside], (py * width + px)[inside]
        depth = (bary * corners[tri, :, 2]).sum(1)
        depth_buffer.scatter_reduce_(0, pixel, depth, "amax")
        pixel_chunks.append(pixel), tri_chunks.append(tri), bary_chunks.append(bary), depth_chunks.append(depth)

    triangle_id = torch.full((height * width,), -1, dtype=torch.long)
    barycentric = torch.zeros(height * width, 3)
    if pixel_chunks:
        pixel, tri = torch.cat(pixel_chunks), torch.cat(tri_chunks)
        bary, depth = torch.cat(bary_chunks), torch.cat(depth_chunks)
        front = depth >= depth_buffer[pixel]
        triangle_id[pixel[front]] = tri[front]
        barycentric[pixel[front]] = bary[front]
    return triangle_id.reshape(height, width), barycentric.reshape(height, width, 3)


@dataclass
class FaceRender:
    """Condition images at one size: SH-shaded colour and camera-space normal map (uint8 RGB, black background),
    the coverage mask and the region id per pixel (-1 background; see REGION_NAMES)."""

    shaded: np.ndarray
    normals: np.ndarray
    mask: np.ndarray
    region: np.ndarray


class FaceModel:
    """The compact ICT-FaceKit model (float32 tensors on the CPU)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict):
        if tuple(config["expression_names"]) != EXPRESSION_NAMES:
            raise ValueError("config.json expression names differ from EXPRESSION_NAMES")
        self.config = config
        self.neutral = tensors["neutral"].float()
        self.identity_basis = tensors["identity_basis"].float()
        self.expression_basis = tensors["expression_basis"].float()
        self.triangles = tensors["triangles"].long()
        self.triangle_region = tensors["triangle_region"].long()
        self.source_vertex_index = tensors["source_vertex_index"].long()
        self.landmark_triangles = tensors["landmark_triangles"].long()
        self.landmark_barycentric = tensors["landmark_barycentric"].float()
        self.landmark_weight = tensors["landmark_weight"].float()

    @classmethod
    def load(cls, directory: str | Path = DEFAULT_MODEL_DIR) -> FaceModel:
        """Load `model.safetensors` + `config.json` from a model folder."""
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        return cls(load_file(str(directory / "model.safetensors")), config)

    @property
    def num_identity(self) -> int:
        return self.identity_basis.shape[0]

    @property
    def num_vertices(self) -> int:
        return self.neutral.shape[0]

    def neutral_params(self) -> FaceParams:
        """`FaceParams.neutral` sized for this model."""
        return FaceParams.neutral(self.num_identity)

    def vertices(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """Model-frame vertices [..., V, 3] (cm): neutral + identity modes + expression blendshapes; differentiable."""
        shape = self.neutral.shape
        offsets = identity @ self.identity_basis.reshape(self.num_identity, -1)
        offsets = offsets + expression @ self.expression_basis.reshape(NUM_EXPRESSIONS, -1)
        return self.neutral + offsets.reshape(*offsets.shape[:-1], *shape)

    def camera_vertices(self, params: FaceParams) -> torch.Tensor:
        """Rotated vertices [V, 3] (cm, camera frame: x right, y up, z toward the camera)."""
        return self.vertices(params.identity, params.expression) @ rotation_matrix(params.rotation).T

    def landmarks_3d(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """Model-frame positions [478, 3] of the MediaPipe landmarks (only the first 468 + iris centres are fitted)."""
        vertices = self.vertices(identity, expression)
        return (vertices[..., self.landmark_triangles, :] * self.landmark_barycentric[..., None]).sum(-2)

    def landmarks(self, params: FaceParams, height: int, width: int) -> torch.Tensor:
        """The 478 MediaPipe landmarks projected to pixel (x, y) coordinates of a height x width image."""
        points = self.landmarks_3d(params.identity, params.expression) @ rotation_matrix(params.rotation).T
        return normalised_to_pixels(params.scale * points[:, :2] + params.translation, height, width)

    def fit_landmarks(
        self,
        landmarks: np.ndarray | torch.Tensor,
        height: int,
        width: int,
        iterations: int = 200,
        identity_weight: float = 1e-3,
        expression_weight: float = 1e-3,
    ) -> FaceParams:
        """Fit identity, expression and pose to MediaPipe landmarks ([468|478, 2] pixels of a height x width image).

        Weak-perspective camera; Adam on the landmark residual (in units of the face size) with L2 priors on identity
        and expression, expression projected onto [0, 1] after each step. Lighting is left at its default.
        The tensors are tiny, so the loop runs on one thread (several threads only add overhead and contention).
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._fit_landmarks(landmarks, height, width, iterations, identity_weight, expression_weight)
        finally:
            torch.set_num_threads(threads)

    def _fit_landmarks(
        self,
        landmarks: np.ndarray | torch.Tensor,
        height: int,
        width: int,
        iterations: int,
        identity_weight: float,
        expression_weight: float,
    ) -> FaceParams:
        target = torch.as_tensor(np.asarray(landmarks)[:, :2], dtype=torch.float32)
        count = target.shape[0]
        if count not in (468, 478):
            raise ValueError(f"expected 468 or 478 MediaPipe landmarks, got {count}")
        target = pixels_to_normalised(target, height, width)
        weight = self.landmark_weight[:count]
        corners = self.landmark_triangles[:count]
        bary = self.landmark_barycentric[:count, :, None]

        def gather(basis: torch.Tensor) -> torch.Tensor:
            return (basis[..., corners, :] * bary).sum(-2)

        neutral, identity_basis, expression_basis = (
            gather(self.neutral), gather(self.identity_basis), gather(self.expression_basis)
        )
        used = weight > 0
        spread = (target[used] - target[used].mean(0)).pow(2).sum(1).mean().sqrt()
        model_spread = (neutral[used, :2] - neutral[used, :2].mean(0)).pow(2).sum(1).mean().sqrt()
        log_scale = torch.log(spread / model_spread).clone().requires_grad_(True)
        translation = (target[used].mean(0) - spread / model_spread * neutral[used, :2].mean(0)).requires_grad_(True)
        rotation = torch.zeros(3, requires_grad=True)  # radians inside the optimiser
        identity = torch.zeros(self.num_identity, requires_grad=True)
        expression = torch.zeros(NUM_EXPRESSIONS, requires_grad=True)
        optimiser = torch.optim.Adam(
            [
                {"params": [rotation], "lr": 0.02},
                {"params": [log_scale, translation], "lr": 0.01},
                {"params": [identity], "lr": 0.05},
                {"params": [expression], "lr": 0.02},
            ]
        )
        rigid_steps = iterations // 4
        for step in range(iterations):
            points = neutral + torch.tensordot(identity, identity_basis, 1)
            points = points + torch.tensordot(expression, expression_basis, 1)
            points = points @ rotation_matrix(torch.rad2deg(rotation)).T
            projected = log_scale.exp() * points[:, :2] + translation
            residual = ((projected - target) / spread).pow(2).sum(1)
            loss = (weight * residual).sum() / weight.sum()
            if step >= rigid_steps:
                loss = loss + identity_weight * identity.pow(2).mean() + expression_weight * expression.pow(2).mean()
            optimiser.zero_grad()
            loss.backward()
            if step < rigid_steps:
                identity.grad = None
                expression.grad = None
            optimiser.step()
            with torch.no_grad():
                expression.clamp_(0.0, 1.0)
        return FaceParams(
            identity=identity.detach().clone(),
            expression=expression.detach().clone(),
            rotation=torch.rad2deg(rotation.detach()),
            translation=translation.detach().clone(),
            scale=log_scale.detach().exp(),
        )

    def _rasterize_params(self, params: FaceParams, height: int, width: int):
        camera = self.camera_vertices(params).detach()
        xy = normalised_to_pixels(params.scale * camera[:, :2] + params.translation, height, width)
        screen = torch.cat([xy, camera[:, 2:] * params.scale], 1)
        triangle_id, bary = rasterize(screen, self.triangles, height, width)
        normals = vertex_normals(camera, self.triangles)
        covered = triangle_id >= 0
        pixel_normals = (normals[self.triangles[triangle_id.clamp_min(0)]] * bary[..., None]).sum(-2)
        pixel_normals = torch.nn.functional.normalize(pixel_normals, dim=-1, eps=1e-12) * covered[..., None]
        region = torch.where(covered, self.triangle_region[triangle_id.clamp_min(0)], -1)
        return covered, pixel_normals, region

    def render(self, params: FaceParams, height: int, width: int | None = None) -> FaceRender:
        """SH-shaded (grey albedo; the SH coefficients carry the colour) and normal-map condition images."""
        width = height if width is None else width
        with torch.no_grad():
            covered, normals, region = self._rasterize_params(params, height, width)
            shaded = (sh_basis(normals) @ params.sh.float().T).clamp(0, 1) * covered[..., None]
            normal_map = (normals + 1) / 2 * covered[..., None]
        return FaceRender(_to_uint8(shaded), _to_uint8(normal_map), covered.numpy(), region.numpy())

    def fit_lighting(
        self, image: np.ndarray, params: FaceParams, max_side: int = 256, ridge: float = 1e-3
    ) -> FaceParams:
        """Fit the 3 x 9 SH coefficients to the image colours (uint8 RGB [H, W, 3]) over the visible face skin.

        Solves a ridge least-squares problem per channel, then refits without the 10 % worst pixels (hair, shadows,
        specular highlights). Returns a copy of `params` with the new `sh`.
        """
        height, width = image.shape[:2]
        factor = min(1.0, max_side / max(height, width))
        small_h, small_w = max(1, round(height * factor)), max(1, round(width * factor))
        if factor < 1.0:
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((small_w, small_h), Image.BILINEAR))
        with torch.no_grad():
            _, normals, region = self._rasterize_params(params, small_h, small_w)
        skin = region == REGION_NAMES.index("face")
        if int(skin.sum()) < 50:
            raise ValueError("the fitted face covers too few pixels to fit the lighting")
        basis = sh_basis(normals[skin]).double()
        colours = torch.as_tensor(image[..., :3][skin.numpy()], dtype=torch.float64) / 255.0
        penalty = ridge * torch.eye(SH_COEFFICIENTS, dtype=torch.float64) * len(basis)
        penalty[0, 0] = 0.0
        keep = torch.ones(len(basis), dtype=torch.bool)
        for _ in range(2):
            a, b = basis[keep], colours[keep]
            sh = torch.linalg.solve(a.T @ a + penalty * keep.double().mean(), a.T @ b).T
            error = (basis @ sh.T - colours).abs().sum(1)
            keep = error <= torch.quantile(error, 0.9)
        return replace(params, sh=sh.float())

    def export_glb(self, path: str | Path, params: FaceParams, metadata: dict | None = None) -> Path:
        """Write the mesh (identity + expression, without pose) as GLB via `core.mesh.export_glb`.

        Vertex colours are the SH shading seen under the fitted pose, so the model looks lit as in the image."""
        from core.mesh import export_glb

        with torch.no_grad():
            vertices = self.vertices(params.identity, params.expression)
            normals = vertex_normals(vertices, self.triangles) @ rotation_matrix(params.rotation).T
            colours = (sh_basis(normals) @ params.sh.float().T).clamp(0, 1)
        return export_glb(path, vertices.numpy(), self.triangles.numpy(), colours.numpy(), metadata=metadata)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().byte().numpy()


@lru_cache(maxsize=1)
def load_face_model() -> FaceModel:
    """The registry's compact ICT-FaceKit model (checksum-verified), loaded once."""
    from core.weights import default_registry

    return FaceModel.load(default_registry().resolve(REGISTRY_NAME).directory)
