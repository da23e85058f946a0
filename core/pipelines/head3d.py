"""3D head generation with the bundled PanoHead-style tri-grid generator (`training/train_head3d.py`).

A latent comes from a seed (z = `np.random.RandomState(seed).randn(1, z_dim)`, the NVlabs convention, mapped with
the frontal conditioning camera and truncation psi) or is given as ws (e.g. from a photo inversion). The planes are
generated once and rendered deterministically from an orbit grid of (yaw, pitch) cameras and a turntable of yaws;
the head's mesh is the density lattice's level set (`core.nets.shape`), coloured by the renderer's features at the
surface and written as a GLB within the face budget with provenance. Every stage is timed.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

from core.mesh import DEFAULT_FACE_BUDGET, export_glb
from core.nets import generator_from_config
from core.nets.camera import EG3D_CAMERA_RADIUS, EG3D_LOOKAT, camera_label
from core.nets.shape import OFFICIAL_LEVEL, extract_mesh
from core.provenance import Provenance
from core.runtime import Runtime

MODEL_NAME = "head3d-faces128"
METHOD = "head3d"
ORBIT_YAWS = (-40.0, -20.0, 0.0, 20.0, 40.0)
ORBIT_PITCHES = (-15.0, 0.0, 15.0)
TURNTABLE_FRAMES = 24
TURNTABLE_MAX_YAW = 60.0
RENDER_BATCH = 8


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


def build_head3d(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`Runtime.get_model` builder: the tri-plane generator of a bundled `config.json` with its weights."""
    generator = generator_from_config(config)
    generator.load_state_dict(state_dict, strict=True)
    return generator


def turntable_yaws(frames: int, max_yaw: float = TURNTABLE_MAX_YAW) -> tuple[float, ...]:
    """Yaws of a turntable that swings from -max_yaw to +max_yaw and back (a closed loop of `frames` frames)."""
    phases = np.arange(frames) / max(frames, 1) * 2 * np.pi
    return tuple(float(max_yaw * np.sin(phase)) for phase in phases)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Head3DPipeline:
    """Seed or ws -> orbit renders, turntable and GLB; build with `from_pretrained` or pass a generator."""

    def __init__(self, generator: torch.nn.Module, runtime: Runtime | None = None, model_name: str = MODEL_NAME,
                 revision: str | None = None):
        self.runtime = runtime or Runtime("cpu")
        self.generator = generator.to(self.runtime.device).eval().requires_grad_(False)
        self.model_name = model_name
        self.revision = revision
        rendering = generator.rendering_kwargs
        self.camera_radius = float(rendering.get("avg_camera_radius", EG3D_CAMERA_RADIUS))
        self.camera_pivot = tuple(rendering.get("avg_camera_pivot", EG3D_LOOKAT))

    @classmethod
    def from_pretrained(cls, name: str = MODEL_NAME, runtime: Runtime | None = None) -> "Head3DPipeline":
        """The registry model `name` (float32: volume rendering stays in float32; the generator's own blocks use
        float16 on CUDA). Raises `core.weights.WeightsError` when its weights are unavailable."""
        runtime = runtime or Runtime()
        generator = runtime.get_model(name, build_head3d, dtype=torch.float32)
        return cls(generator, runtime, name, runtime.registry.entry(name).revision)

    def camera(self, yaw_deg: float, pitch_deg: float) -> torch.Tensor:
        """[1, 25] label of the camera at (yaw, pitch) degrees around the generator's pivot."""
        return camera_label(yaw_deg, pitch_deg, radius=self.camera_radius, lookat=self.camera_pivot).to(
            self.runtime.device)

    def latent(self, seed: int, truncation_psi: float = 0.7) -> torch.Tensor:
        """ws [1, num_ws, w_dim] of `seed` mapped with the frontal conditioning camera and truncation psi."""
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, self.generator.z_dim)).float()
        return self.generator.mapping(z.to(self.runtime.device), self.camera(0, 0), truncation_psi=truncation_psi)

    def render_views(self, ws: torch.Tensor, views: list[tuple[float, float]]) -> np.ndarray:
        """uint8 images [len(views), S, S, 3] of ws[:1] from (yaw, pitch) views (planes generated once)."""
        planes = self.generator.generate_planes(ws[:1], noise_mode="const")
        images = []
        for start in range(0, len(views), RENDER_BATCH):
            chunk = views[start:start + RENDER_BATCH]
            cameras = torch.cat([self.camera(yaw, pitch) for yaw, pitch in chunk])
            count = len(chunk)
            out = self.generator.render_planes(planes.expand(count, *planes.shape[1:]),
                                               ws[:1].expand(count, -1, -1), cameras, deterministic=True,
                                               noise_mode="const")
            images.append(_to_uint8(out["image"]))
        return np.concatenate(images)

    def __call__(self, seed: int = 0, truncation_psi: float = 0.7, ws: torch.Tensor | None = None,
                 yaws: tuple[float, ...] = ORBIT_YAWS, pitches: tuple[float, ...] = ORBIT_PITCHES,
                 turntable_frames: int = TURNTABLE_FRAMES, mesh: bool = True, mesh_resolution: int = 128,
                 mesh_level: float = OFFICIAL_LEVEL, face_budget: int = DEFAULT_FACE_BUDGET,
                 output_dir: str | Path | None = None) -> Head3DResult:
        """Generate one head from `seed` (or the given `ws`, e.g. an inversion) and render, turn and mesh it."""
        yaws, pitches = tuple(float(y) for y in yaws), tuple(float(p) for p in pitches)
        table_yaws = turntable_yaws(turntable_frames)
        provenance = Provenance(METHOD, self.model_name, self.revision, None if ws is not None else seed,
                                {"truncation_psi": truncation_psi, "yaws": yaws, "pitches": pitches,
                                 "latent": "given ws" if ws is not None else "seed",
                                 "mesh_resolution": mesh_resolution, "mesh_level": mesh_level})
        timings: dict[str, float] = {}
        started = time.perf_counter()

        def timed(name, fn):
            start = time.perf_counter()
            value = self.runtime.run(lambda dtype: fn(), fp16_safe=False, what="The 3D head generator")
            timings[f"{name}_s"] = round(time.perf_counter() - start, 3)
            return value

        if ws is None:
            ws = timed("latent", lambda: self.latent(seed, truncation_psi))
        else:
            ws = ws.to(self.runtime.device, torch.float32)
        grid_views = [(yaw, pitch) for pitch in pitches for yaw in yaws]
        orbit = timed("orbit", lambda: self.render_views(ws, grid_views))
        orbit = orbit.reshape(len(pitches), len(yaws), *orbit.shape[1:])
        turntable = list(timed("turntable", lambda: self.render_views(ws, [(yaw, 0.0) for yaw in table_yaws])))

        glb_path, mesh_faces, warnings = None, None, []
        if mesh:
            start = time.perf_counter()
            try:
                vertices, faces, colors = self.runtime.run(
                    lambda dtype: extract_mesh(self.generator, ws, mesh_resolution, mesh_level), fp16_safe=False,
                    what="The 3D head generator")
            except ValueError:  # marching cubes finds no surface at this level
                warnings.append(f"No surface at density level {mesh_level}; no mesh was written.")
            else:
                directory = Path(output_dir or tempfile.mkdtemp(prefix="head3d_"))
                directory.mkdir(parents=True, exist_ok=True)
                stem = "head3d_given_ws" if provenance.seed is None else f"head3d_seed{seed}"
                glb_path = export_glb(directory / f"{stem}.glb", vertices, faces, vertex_colors=colors,
                                      metadata=provenance, face_budget=face_budget)
                mesh_faces = len(trimesh.load(glb_path, force="mesh").faces)
            timings["mesh_s"] = round(time.perf_counter() - start, 3)
        timings["total_s"] = round(time.perf_counter() - started, 3)
        return Head3DResult(orbit, yaws, pitches, turntable, table_yaws, glb_path, mesh_faces, timings, provenance,
                            warnings)
