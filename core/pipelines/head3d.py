"""3D head generation with the bundled PanoHead-style tri-grid generator (`training/train_head3d.py`).

A latent comes from a seed (z = `np.random.RandomState(seed).randn(1, z_dim)`, the NVlabs convention, mapped with
the frontal conditioning camera and truncation psi) or is given as ws (e.g. from a photo inversion). The planes are
generated once and rendered deterministically from an orbit grid of (yaw, pitch) cameras and a turntable of yaws;
the head's mesh is the density lattice's level set (`core.nets.shape`), coloured by the renderer's features at the
surface and written as a GLB within the face budget with provenance. `stylize` colours the GLB from its stylized
views where they see the surface (`core.nets.shape.colors_from_views`): a style acts mostly through the
super-resolution, which the features at the surface do not show. Every stage is timed.

Photo path (3D GAN inversion): `core.face.prepare_face` aligns the largest face and estimates its pose; the pose
gives the input camera, the `Head3DEncoder` maps the crop and camera to ws, optionally refined by a few Adam steps
on W+ (pixel L2 + identity loss at the input camera); the identity cosine of the input to the frontal render is
reported. Styles: registry entries whose config is {"kind": "style_delta", "base": <this model>} hold a parameter
delta applied to a copy of the generator with `core.nets.style_delta.apply_style_delta`; entries holding a full
generator whose config names its base ({"kind": "panohead", "base": <this model>}, e.g. the paper's official
stylized PanoHeads converted with `core.convert --base`, see `core.official`) replace it whole.
`stylize` renders the same ws with the original and the stylized generator and compares identities per view.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import trimesh

from core.face import ImageSource, prepare_face
from core.identity import IdentityEncoder, cosine_similarity, image_to_tensor
from core.mesh import DEFAULT_FACE_BUDGET, export_glb, sparse_density_lattice
from core.nets import GENERATOR_KINDS, generator_from_config
from core.nets.camera import EG3D_CAMERA_RADIUS, EG3D_LOOKAT, PANOHEAD_LOOKAT, camera_label
from core.nets.encoders import build_head3d_encoder
from core.nets.shape import (OFFICIAL_LEVEL, border_width, colors_from_views, lattice_axis, mesh_from_lattice,
                             vertex_colors)
from core.outputs import new_output_dir
from core.provenance import Provenance
from core.runtime import Runtime
from core.weights import Registry, WeightsError

MODEL_NAMES = ("head3d-faces128", "head3d-faces64")  # preferred first; the 64-px one is a CPU-trained preview
MODEL_NAME = MODEL_NAMES[0]
ENCODER_NAME = "head3d-encoder-faces128"
# each photo encoder belongs to the generator it was trained against
ENCODER_NAMES = {MODEL_NAME: ENCODER_NAME, "head3d-faces64": "head3d-encoder-faces64"}
IDENTITY_NAME = "identity-resnet"
STYLE_KIND = "style_delta"
METHOD = "head3d"
STYLE_METHOD = "stylize3d"
ORBIT_YAWS = (-40.0, -20.0, 0.0, 20.0, 40.0)
ORBIT_PITCHES = (-15.0, 0.0, 15.0)
# the tabs' default view spread: the face archive's photos are near-frontal (|yaw| median 7 deg, 90 % within 23.5,
# 95 % within 28), so wider views are the generator's extrapolation; the 64-px preview paints the far eye onto the
# far cheek from about 25-30 deg (seed 0 shows it at 25)
DEFAULT_YAW_RANGE = 20.0
YAW_RANGE_INFO = "The training photos are near-frontal (90 % within ±24°): wider views show the generator's guess."
TURNTABLE_FRAMES = 24
TURNTABLE_MAX_YAW = 60.0
# views rendered together: one at a time is fastest on CPU (measured on 2 cores: 8 views in 1.15 s one by one,
# 1.5 s two by two, 1.7 s eight at once): a batch of one runs the super-resolution's modulated convolutions as
# plain ones rather than grouped, and keeps each view's samples in cache
RENDER_BATCH = 1
RENDER_BATCH_CUDA = 8  # as before on GPUs (not measured here)
MESH_COARSE_STEP = 4  # the density lattice's coarse pass (`core.mesh.sparse_density_lattice`)
VIEW_DEPTH_TOLERANCE = 0.03  # of the box: how far behind the rendered depth a vertex still counts as seen
MESH_CHUNK = 2**18


@dataclass
class PhotoInversion:
    """A photo inverted into the generator: the aligned input crop (uint8), its estimated yaw and pitch (the input
    camera), ws, the renders at the input camera and frontal (uint8), the identity cosine of the input to the
    frontal render, the refinement steps run, and the face input's warnings."""

    aligned: np.ndarray
    yaw: float
    pitch: float
    ws: torch.Tensor
    reconstruction: np.ndarray
    frontal: np.ndarray
    identity_similarity: float
    refine_steps: int
    warnings: list[str]


@dataclass
class Head3DResult:
    """Orbit renders [pitches, yaws, S, S, 3] uint8 (rows follow `pitches`, columns `yaws`), the turntable frames
    (uint8, one per `turntable_yaws` entry), the GLB path and face count (None when no mesh), timings in seconds,
    warnings for the user and the provenance written into the GLB."""

    orbit: np.ndarray
    yaws: tuple[float, ...]
    pitches: tuple[float, ...]
    turntable: list[np.ndarray]
    turntable_yaws: tuple[float, ...]
    glb_path: Path | None
    mesh_faces: int | None
    timings: dict[str, float]
    provenance: Provenance
    warnings: list[str] = field(default_factory=list)
    inversion: PhotoInversion | None = None


@dataclass
class RenderedViews:
    """Renders of one head that colour its GLB: camera labels [N, 25], uint8 images [N, S, S, 3], ray depths
    [N, R, R]."""

    cameras: torch.Tensor
    images: np.ndarray
    depths: np.ndarray


@dataclass
class StyleComparison:
    """The same head rendered by the original and the stylized generator from `views` ((yaw, pitch) pairs):
    uint8 [V, S, S, 3] each, the identity cosine original <-> stylized per view, the stylized GLB (None when no
    surface), timings in seconds, provenance, warnings and the photo inversion (photo input only)."""

    style: str | None
    views: tuple[tuple[float, float], ...]
    original: np.ndarray
    stylized: np.ndarray
    identity_similarity: list[float]
    glb_path: Path | None
    mesh_faces: int | None
    timings: dict[str, float]
    provenance: Provenance
    warnings: list[str] = field(default_factory=list)
    inversion: PhotoInversion | None = None


def build_head3d(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`Runtime.get_model` builder: the tri-plane generator of a bundled `config.json` with its weights."""
    generator = generator_from_config(config)
    generator.load_state_dict(state_dict, strict=True)
    return generator


def build_identity(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> IdentityEncoder:
    """`Runtime.get_model` builder: the identity network of a bundled `config.json` with its weights."""
    identity = IdentityEncoder(config)
    identity.load_state_dict({key: value.float() for key, value in state_dict.items()})
    return identity


def preferred_model(registry: Registry) -> str:
    """The bundled generator the tabs use: the first of MODEL_NAMES that is here, else the preferred (untrained)
    one."""
    return next((name for name in MODEL_NAMES if registry.is_available(name)), MODEL_NAME)


def available_styles(registry: Registry, base: str = MODEL_NAME, method: str | None = None) -> list[str]:
    """Registry names of the style deltas for `base` whose files are here (bundled or cached), sorted; only those
    trained by `method` ("stylize3d" or "agilegan3d", the `method` key of their config.json) when given."""
    styles = []
    for name in registry.names:
        _, paths = registry.locate(name)
        if paths is None or "config.json" not in paths:
            continue
        config = json.loads(paths["config.json"].read_text())
        if config.get("kind") == STYLE_KIND and config.get("base") == base and method in (None, config.get("method")):
            styles.append(name)
    return styles


def available_stylized_generators(registry: Registry, base: str) -> list[str]:
    """Registry names of the full generators fine-tuned from `base` (config key "base", e.g. the official stylized
    PanoHeads) whose files are here (bundled or cached), sorted."""
    names = []
    for name in registry.names:
        _, paths = registry.locate(name)
        if paths is None or "config.json" not in paths:
            continue
        config = json.loads(paths["config.json"].read_text())
        if config.get("kind") in GENERATOR_KINDS and config.get("base") == base:
            names.append(name)
    return names


def load_official(name: str, runtime: Runtime | None = None) -> "Head3DPipeline":
    """The official PanoHead converted and registered as `name` (`core.official`), with the identity network and
    PanoHead's inference cameras (look-at (0, 0, 0) as in its gen_samples.py; the checkpoint's rendering kwargs keep
    EG3D's 0.2 pivot). No photo encoder: the bundled one was trained for the bundled generator."""
    pipeline = Head3DPipeline.from_pretrained(name, runtime)
    pipeline.camera_pivot = PANOHEAD_LOOKAT
    return pipeline


def view_yaws(count: int, yaw_range: float) -> tuple[float, ...]:
    """`count` yaws evenly spread over [-yaw_range, +yaw_range] (0 for a single view)."""
    if count <= 1:
        return (0.0,)
    return tuple(float(yaw) for yaw in np.linspace(-yaw_range, yaw_range, count))


def turntable_yaws(frames: int, max_yaw: float = TURNTABLE_MAX_YAW) -> tuple[float, ...]:
    """Yaws of a turntable that swings from -max_yaw to +max_yaw and back (a closed loop of `frames` frames)."""
    phases = np.arange(frames) / max(frames, 1) * 2 * np.pi
    return tuple(float(max_yaw * np.sin(phase)) for phase in phases)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Head3DPipeline:
    """Seed, ws or photo -> orbit renders, turntable and GLB; build with `from_pretrained` or pass a generator
    (and, for photos and identity numbers, a `Head3DEncoder` and an `IdentityEncoder`)."""

    def __init__(self, generator: torch.nn.Module, runtime: Runtime | None = None, model_name: str = MODEL_NAME,
                 revision: str | None = None, encoder: torch.nn.Module | None = None,
                 identity: torch.nn.Module | None = None):
        self.runtime = runtime or Runtime("cpu")
        self.generator = generator.to(self.runtime.device).eval().requires_grad_(False)
        self.model_name = model_name
        self.revision = revision
        self.encoder = encoder.to(self.runtime.device).eval() if encoder is not None else None
        self.identity = identity.to(self.runtime.device).eval() if identity is not None else None
        rendering = generator.rendering_kwargs
        self.camera_radius = float(rendering.get("avg_camera_radius", EG3D_CAMERA_RADIUS))
        self.camera_pivot = tuple(rendering.get("avg_camera_pivot", EG3D_LOOKAT))

    @classmethod
    def from_pretrained(cls, name: str | None = None, runtime: Runtime | None = None,
                        encoder: str | None = None, identity: str | None = IDENTITY_NAME) -> "Head3DPipeline":
        """The registry model `name` (default: the first of MODEL_NAMES that is available; float32: volume rendering
        stays in float32; the generator's own blocks use float16 on CUDA), with the photo encoder (default: the one
        trained against `name`, ENCODER_NAMES) and identity network when they are registered and here. Raises
        `core.weights.WeightsError` when the generator's weights are unavailable."""
        runtime = runtime or Runtime()
        name = name or runtime.registry.first_available(MODEL_NAMES)
        encoder = encoder or ENCODER_NAMES.get(name)
        generator = runtime.get_model(name, build_head3d, dtype=torch.float32)

        def optional(model_name, builder):
            registry = runtime.registry
            if model_name is None or model_name not in registry.names or registry.locate(model_name)[0] == "missing":
                return None
            return runtime.get_model(model_name, builder, dtype=torch.float32)

        return cls(generator, runtime, name, runtime.registry.entry(name).revision,
                   encoder=optional(encoder, build_head3d_encoder), identity=optional(identity, build_identity))

    def style_generator(self, style: str) -> torch.nn.Module:
        """The generator with the registry style delta `style` applied (a copy; cached by the runtime), or the full
        stylized generator `style` fine-tuned from this one."""
        config = self.runtime.registry.load_config(style)
        if config.get("kind") in GENERATOR_KINDS and config.get("base") == self.model_name:
            return self.runtime.get_model(style, build_head3d, dtype=torch.float32)
        if config.get("kind") != STYLE_KIND or config.get("base") != self.model_name:
            raise WeightsError(f"'{style}' is not a style of {self.model_name}.")

        def build(style_config, state_dict):
            from core.nets.style_delta import apply_style_delta, build_style_delta

            return apply_style_delta(self.generator, build_style_delta(style_config, state_dict))

        return self.runtime.get_model(style, build, dtype=torch.float32)

    def style_encoder(self, style: str) -> torch.nn.Module | None:
        """The photo encoder of the registry style `style`: its `encoder` part (`core.nets.style_delta`) applied to
        a copy of this pipeline's encoder; None when the style ships no encoder (photos then go through the base
        encoder). Built once and kept with the style's generator in the runtime's model cache (evicted with it;
        one per base encoder)."""
        part = self.runtime.registry.load_config(style).get("parts", {}).get("encoder")
        if part is None or self.encoder is None:
            return None
        # a plain dict attribute, not a submodule: the cached generator's state dict stays the same
        cache = self.style_generator(style).__dict__.setdefault("_style_encoders", {})
        key = id(self.encoder)
        if key not in cache or cache[key][0] is not self.encoder:
            from core.nets.style_delta import apply_style_delta, build_style_delta

            delta = build_style_delta(part, self.runtime.registry.load_state_dict(style, part["file"]))
            encoder = apply_style_delta(self.encoder, delta).to(self.runtime.device).eval().requires_grad_(False)
            cache[key] = (self.encoder, encoder)
        return cache[key][1]

    def camera(self, yaw_deg: float, pitch_deg: float) -> torch.Tensor:
        """[1, 25] label of the camera at (yaw, pitch) degrees around the generator's pivot."""
        return camera_label(yaw_deg, pitch_deg, radius=self.camera_radius, lookat=self.camera_pivot).to(
            self.runtime.device)

    def latent(self, seed: int, truncation_psi: float = 0.7) -> torch.Tensor:
        """ws [1, num_ws, w_dim] of `seed` mapped with the frontal conditioning camera and truncation psi."""
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, self.generator.z_dim)).float()
        return self.generator.mapping(z.to(self.runtime.device), self.camera(0, 0), truncation_psi=truncation_psi)

    def render_views(self, ws: torch.Tensor, views: list[tuple[float, float]],
                     max_ray_resolution: int | None = None, with_depth: bool = False):
        """uint8 images [len(views), S, S, 3] of ws[:1] from (yaw, pitch) views (planes generated once); rays at
        most `max_ray_resolution` px (default: the generator's neural rendering resolution; S stays the same).
        `with_depth`: (images, float32 ray depths [len(views), R, R] at the ray resolution R)."""
        ray_resolution = self.generator.neural_rendering_resolution
        if max_ray_resolution:
            ray_resolution = min(ray_resolution, int(max_ray_resolution))
        if not views:
            size = self.generator.img_resolution
            empty = np.zeros((0, size, size, 3), np.uint8)
            return (empty, np.zeros((0, ray_resolution, ray_resolution), np.float32)) if with_depth else empty
        with torch.inference_mode():  # uint8 images out: no autograd bookkeeping
            # planes [1] and ws [1] serve every camera of a batch (`TriPlaneGenerator.render_planes`): generated
            # once for all the views
            planes = self.generator.generate_planes(ws[:1], noise_mode="const")
            images, depths = [], []
            batch = RENDER_BATCH_CUDA if self.runtime.device.type == "cuda" else RENDER_BATCH
            for start in range(0, len(views), batch):
                chunk = views[start:start + batch]
                cameras = torch.cat([self.camera(yaw, pitch) for yaw, pitch in chunk])
                out = self.generator.render_planes(planes, ws[:1], cameras, ray_resolution, deterministic=True,
                                                   noise_mode="const")
                images.append(_to_uint8(out["image"]))
                depths.append(out["image_depth"][:, 0].float().cpu().numpy())
        if with_depth:
            return np.concatenate(images), np.concatenate(depths)
        return np.concatenate(images)

    def identity_similarity(self, images_a: np.ndarray, images_b: np.ndarray) -> list[float]:
        """Identity cosine of pair i of two uint8 batches [N, S, S, 3] of aligned faces (renders or crops)."""
        if self.identity is None:
            raise WeightsError("Identity similarity needs the identity network (identity-resnet).")

        def embed(images):
            return self.identity.embed_aligned(torch.cat([image_to_tensor(image) for image in images])
                                               .to(self.runtime.device))

        similarity = self.runtime.run(lambda dtype: cosine_similarity(embed(images_a), embed(images_b)),
                                      fp16_safe=False, what="The identity network")
        return [round(float(value), 4) for value in similarity]

    def refine(self, ws: torch.Tensor, target: torch.Tensor, camera: torch.Tensor, steps: int, lr: float = 0.01,
               identity_weight: float = 0.5) -> torch.Tensor:
        """`steps` Adam steps on W+ minimising pixel L2 + identity_weight * (1 - identity cosine) between the
        render at `camera` and the aligned `target` ([1, 3, S, S] in [-1, 1])."""
        latent = ws.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([latent], lr=lr)
        with torch.no_grad():
            anchor = self.identity.embed_aligned(target)
        for _step in range(steps):
            image = self.generator.synthesis(latent, camera, deterministic=True, noise_mode="const")["image"]
            similarity = cosine_similarity(self.identity.embed_aligned(image), anchor)
            loss = F.mse_loss(image, target) + identity_weight * (1 - similarity).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return latent.detach()

    def invert(self, photo: ImageSource, refine_steps: int = 0, refine_lr: float = 0.01,
               identity_weight: float = 0.5) -> PhotoInversion:
        """Photo -> aligned crop and pose camera -> encoder ws (-> `refine_steps` refinement steps); raises
        `core.face.FaceInputError` for a bad photo and `WeightsError` without the encoder or identity network."""
        if self.encoder is None or self.identity is None:
            encoder = ENCODER_NAMES.get(self.model_name, "none trained yet")
            raise WeightsError(f"Photo input on {self.model_name} needs its 3D head encoder ({encoder}) and the "
                               f"identity network ({IDENTITY_NAME}); they are not available.")
        prepared = prepare_face(photo, size=self.generator.img_resolution)
        yaw, pitch = float(prepared.pose.yaw), float(prepared.pose.pitch)
        target = image_to_tensor(prepared.image).to(self.runtime.device)
        camera = self.camera(yaw, pitch)
        ws = self.runtime.run(lambda dtype: self.encoder(target, camera), fp16_safe=False,
                              what="The 3D head encoder")
        if refine_steps > 0:
            ws = self.runtime.run(lambda dtype: self.refine(ws, target, camera, refine_steps, refine_lr,
                                                            identity_weight),
                                  fp16_safe=False, grad=True, what="The latent refinement")
        reconstruction, frontal = self.runtime.run(lambda dtype: self.render_views(ws, [(yaw, pitch), (0.0, 0.0)]),
                                                   fp16_safe=False, what="The 3D head generator")
        similarity = self.identity_similarity(prepared.image[None], frontal[None])[0]
        return PhotoInversion(prepared.image, yaw, pitch, ws, reconstruction, frontal, similarity, int(refine_steps),
                              list(prepared.warnings))

    def density(self, planes: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
        """Raw sigma [M] at world points [M, 3] (numpy) of planes [1, ...]: density alone (no colour features),
        in chunks laid out as one row per thread (grid_sample's CPU kernel shares its work out per row)."""
        rows = max(2, torch.get_num_threads())

        def density(points: np.ndarray) -> np.ndarray:
            points = torch.from_numpy(np.ascontiguousarray(points, np.float32))
            sigma = []
            for start in range(0, len(points), MESH_CHUNK):
                chunk = points[start:start + MESH_CHUNK].to(planes.device)
                count = len(chunk)
                per_row = -(-count // rows)
                chunk = F.pad(chunk, (0, 0, 0, per_row * rows - count)).reshape(rows, per_row, 3)
                out = self.generator.query_density(planes.expand(rows, *planes.shape[1:]), chunk)
                sigma.append(out.reshape(-1)[:count].float().cpu())
            return torch.cat(sigma).numpy()

        return density

    @torch.inference_mode()
    def extract_mesh(self, ws: torch.Tensor, resolution: int = 128, level: float = OFFICIAL_LEVEL,
                     coarse_step: int = MESH_COARSE_STEP, views: RenderedViews | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`core.nets.shape.extract_mesh` (vertices, faces, colours) computing less: the lattice's border, which
        the official procedure overwrites, is not evaluated, the rest only where the surface can be
        (`core.mesh.sparse_density_lattice` with `coarse_step`; 1: every interior point), density alone.
        With rendered `views` of ws[:1], the colours come from those images where they see the surface
        (`core.nets.shape.colors_from_views`), elsewhere from the colour features."""
        box_warp = self.generator.rendering_kwargs["box_warp"]
        planes = self.generator.generate_planes(ws[:1], noise_mode="const")
        pad = border_width(resolution)
        sigma = sparse_density_lattice(self.density(planes), lattice_axis(resolution, box_warp).numpy(), level,
                                       pad=pad, fill=-1000.0, coarse_step=coarse_step)
        vertices, faces = mesh_from_lattice(sigma, box_warp, level, pad)
        colours = vertex_colors(self.generator, planes, ws, vertices)
        if views is not None:
            normals = trimesh.Trimesh(vertices=vertices, faces=faces, process=False).vertex_normals
            colours = colors_from_views(vertices, normals, views.cameras, views.images, views.depths, colours,
                                        depth_tolerance=VIEW_DEPTH_TOLERANCE * box_warp)
        return vertices, faces, colours

    def mesh(self, ws: torch.Tensor, path: Path, provenance: Provenance, resolution: int = 128,
             level: float = OFFICIAL_LEVEL, face_budget: int = DEFAULT_FACE_BUDGET,
             coarse_step: int = MESH_COARSE_STEP, views: RenderedViews | None = None
             ) -> tuple[Path | None, int | None, list[str]]:
        """(GLB path, face count, warnings) of the level surface of ws[:1], written to `path`; (None, None,
        [warning]) when there is no surface at `level`. `coarse_step`, `views`: see `extract_mesh`."""
        try:
            vertices, faces, colors = self.runtime.run(
                lambda dtype: self.extract_mesh(ws, resolution, level, coarse_step, views), fp16_safe=False,
                what="The 3D head generator")
        except ValueError:  # marching cubes finds no surface at this level
            return None, None, [f"No surface at density level {level}; no mesh was written."]
        path.parent.mkdir(parents=True, exist_ok=True)
        glb_path = export_glb(path, vertices, faces, vertex_colors=colors, metadata=provenance,
                              face_budget=face_budget)
        return glb_path, len(trimesh.load(glb_path, force="mesh").faces), []

    def _latent(self, seed: int, truncation_psi: float, ws: torch.Tensor | None, photo: ImageSource | None,
                refine_steps: int, timings: dict[str, float]) -> tuple[torch.Tensor, PhotoInversion | None, str]:
        """(ws, inversion or None, latent source name) from a photo, given ws or a seed, timed into `timings`."""
        start = time.perf_counter()
        inversion = None
        if photo is not None:
            inversion = self.invert(photo, refine_steps)
            ws, source = inversion.ws, "photo"
            timings["inversion_s"] = round(time.perf_counter() - start, 3)
        elif ws is not None:
            ws, source = ws.to(self.runtime.device, torch.float32), "given ws"
        else:
            ws = self.runtime.run(lambda dtype: self.latent(seed, truncation_psi), fp16_safe=False,
                                  what="The 3D head generator")
            source = "seed"
            timings["latent_s"] = round(time.perf_counter() - start, 3)
        return ws, inversion, source

    def __call__(self, seed: int = 0, truncation_psi: float = 0.7, ws: torch.Tensor | None = None,
                 yaws: tuple[float, ...] = ORBIT_YAWS, pitches: tuple[float, ...] = ORBIT_PITCHES,
                 turntable_frames: int = TURNTABLE_FRAMES, mesh: bool = True, mesh_resolution: int = 128,
                 mesh_level: float = OFFICIAL_LEVEL, face_budget: int = DEFAULT_FACE_BUDGET,
                 output_dir: str | Path | None = None, photo: ImageSource | None = None,
                 refine_steps: int = 0) -> Head3DResult:
        """Generate one head from `seed` (or the given `ws`, or an inverted `photo`) and render, turn and mesh it;
        the GLB goes to `output_dir`, else to a fresh `core.outputs` folder (removed after an hour)."""
        yaws, pitches = tuple(float(y) for y in yaws), tuple(float(p) for p in pitches)
        table_yaws = turntable_yaws(turntable_frames)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        ws, inversion, source = self._latent(seed, truncation_psi, ws, photo, refine_steps, timings)
        provenance = Provenance(METHOD, self.model_name, self.revision, seed if source == "seed" else None,
                                {"truncation_psi": truncation_psi, "yaws": yaws, "pitches": pitches,
                                 "latent": source, "refine_steps": refine_steps if inversion else 0,
                                 "mesh_resolution": mesh_resolution, "mesh_level": mesh_level})

        def timed(name, fn):
            start = time.perf_counter()
            value = self.runtime.run(lambda dtype: fn(), fp16_safe=False, what="The 3D head generator")
            timings[f"{name}_s"] = round(time.perf_counter() - start, 3)
            return value

        grid_views = [(yaw, pitch) for pitch in pitches for yaw in yaws]
        orbit = timed("orbit", lambda: self.render_views(ws, grid_views))
        orbit = orbit.reshape(len(pitches), len(yaws), *orbit.shape[1:])
        turntable = list(timed("turntable", lambda: self.render_views(ws, [(yaw, 0.0) for yaw in table_yaws])))

        glb_path, mesh_faces, warnings = None, None, list(inversion.warnings) if inversion else []
        if mesh:
            start = time.perf_counter()
            directory = Path(output_dir or new_output_dir("head3d_"))
            stem = f"head3d_seed{seed}" if source == "seed" else f"head3d_{source.replace(' ', '_')}"
            glb_path, mesh_faces, mesh_warnings = self.mesh(ws, directory / f"{stem}.glb", provenance,
                                                            mesh_resolution, mesh_level, face_budget)
            warnings += mesh_warnings
            timings["mesh_s"] = round(time.perf_counter() - start, 3)
        timings["total_s"] = round(time.perf_counter() - started, 3)
        return Head3DResult(orbit, yaws, pitches, turntable, table_yaws, glb_path, mesh_faces, timings, provenance,
                            warnings, inversion)

    def stylize(self, style: str | None = None, seed: int = 0, truncation_psi: float = 0.7,
                photo: ImageSource | None = None, refine_steps: int = 0, yaws: tuple[float, ...] = ORBIT_YAWS,
                pitch: float = 0.0, mesh: bool = True, mesh_resolution: int = 128, mesh_level: float = OFFICIAL_LEVEL,
                face_budget: int = DEFAULT_FACE_BUDGET, output_dir: str | Path | None = None,
                max_ray_resolution: int | None = None) -> StyleComparison:
        """Render the head of `seed` (or the inverted `photo`) with the original generator and with the registry
        style `style` (None: the original again) from yaws at `pitch` (rays at most `max_ray_resolution` px);
        identity cosine per view; stylized GLB (in `output_dir`, else a fresh `core.outputs` folder). A photo goes
        through the style's own encoder when it ships one."""
        views = tuple((float(yaw), float(pitch)) for yaw in yaws)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        inverter = self
        style_encoder = self.style_encoder(style) if style is not None and photo is not None else None
        if style_encoder is not None:
            inverter = Head3DPipeline(self.generator, self.runtime, self.model_name, self.revision,
                                      encoder=style_encoder, identity=self.identity)
            inverter.camera_radius, inverter.camera_pivot = self.camera_radius, self.camera_pivot
        ws, inversion, source = inverter._latent(seed, truncation_psi, None, photo, refine_steps, timings)
        provenance = Provenance(STYLE_METHOD, self.model_name, self.revision, seed if source == "seed" else None,
                                {"style": style or "original", "truncation_psi": truncation_psi, "views": views,
                                 "latent": source, "refine_steps": refine_steps if inversion else 0,
                                 "mesh_resolution": mesh_resolution, "mesh_level": mesh_level,
                                 "max_ray_resolution": max_ray_resolution,
                                 "encoder": (("style" if style_encoder is not None else "base") if inversion
                                             else None)})
        styled = self
        if style is not None:
            start = time.perf_counter()
            styled = Head3DPipeline(self.style_generator(style), self.runtime, self.model_name, self.revision,
                                    identity=self.identity)
            styled.camera_radius, styled.camera_pivot = self.camera_radius, self.camera_pivot
            timings["style_load_s"] = round(time.perf_counter() - start, 3)

        def timed(name, fn):
            start = time.perf_counter()
            value = self.runtime.run(lambda dtype: fn(), fp16_safe=False, what="The 3D head generator")
            timings[f"{name}_s"] = round(time.perf_counter() - start, 3)
            return value

        original, depths = timed("original_views", lambda: self.render_views(ws, list(views), max_ray_resolution,
                                                                             with_depth=True))
        if style:
            stylized, depths = timed("stylized_views", lambda: styled.render_views(ws, list(views),
                                                                                   max_ray_resolution,
                                                                                   with_depth=True))
        else:
            stylized = original
        start = time.perf_counter()
        similarity = self.identity_similarity(original, stylized)
        timings["identity_s"] = round(time.perf_counter() - start, 3)

        glb_path, mesh_faces, warnings = None, None, list(inversion.warnings) if inversion else []
        if mesh:
            start = time.perf_counter()
            directory = Path(output_dir or new_output_dir("stylize3d_"))
            shown = RenderedViews(torch.cat([self.camera(yaw, pitch) for yaw, pitch in views]), stylized, depths)
            glb_path, mesh_faces, mesh_warnings = styled.mesh(ws, directory / f"{style or 'original'}.glb",
                                                              provenance, mesh_resolution, mesh_level, face_budget,
                                                              views=shown)
            warnings += mesh_warnings
            timings["mesh_s"] = round(time.perf_counter() - start, 3)
        timings["total_s"] = round(time.perf_counter() - started, 3)
        return StyleComparison(style, views, original, stylized, similarity, glb_path, mesh_faces, timings,
                               provenance, warnings, inversion)
