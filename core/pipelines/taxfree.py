"""'Tax-free' 3DMM-conditioned face generation (docs/methods.md §1): `TaxFreePipeline`.

A face is the ICT-FaceKit parameter set p (`core.face3dmm.FaceParams`: identity, 53 expressions, pose, SH light).
The conditional StyleGAN2 of each recipe (`training/train_taxfree.py`: 'tax-free' and the over-constrained
baseline) maps (z, c) to an image, with c = (p - mean) / std as stored in its `config.json` (`conditioning`). The
same p also gives the 3DMM's own shaded render (what the condition asks for) and its mesh as GLB.

Controls are in user units: yaw/pitch/roll in degrees, expression weights in [0, 1], a light direction (azimuth,
elevation in degrees: 0/0 = from the camera, positive azimuth = from the image's right, positive elevation = from
above) with an intensity relative to the ambient light. Whatever the controls leave unset stays at the training
faces' average (`average_controls`): the expressions not named, the light, identity, translation and scale. That
average is not all zeros: the landmark fits of the training photos have a baseline expression (eyeLookUp about 0.67,
eyeWide about 0.55) and an identity spread of about 0.45 per coefficient, and the generators were only trained on
such labels. "Random identity" draws the identity coefficients from the training labels' distribution, N(mean, std)
per coefficient, with the seed. (Zero expressions and N(0, 1) identities, as the first version of this pipeline
used, lie several standard deviations off the training labels, and the 32-px previews then turned the head by a
quarter of the requested yaw.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.face import prepare_face
from core.face3dmm import EXPRESSION_NAMES, FaceModel, FaceParams, load_face_model
from core.nets import generator_from_config
from core.provenance import Provenance
from core.runtime import Runtime

METHOD = "'Tax-free' 3DMM-conditioned generation"
# Variant -> its registry models, preferred first: the 128-px generators of the training plan, then the 32-px previews
# trained on a CPU (weights/taxfree_faces32, weights/overconstrained_faces32).
VARIANTS = {"tax-free": ("taxfree-faces128", "taxfree-faces32"),
            "over-constrained": ("overconstrained-faces128", "overconstrained-faces32")}
# The ~10 expressions the tab shows as named sliders: label -> ICT/ARKit blendshapes they drive together.
CURATED_EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "jaw open": ("jawOpen",),
    "smile": ("mouthSmile_L", "mouthSmile_R"),
    "smile left": ("mouthSmile_L",),
    "smile right": ("mouthSmile_R",),
    "blink": ("eyeBlink_L", "eyeBlink_R"),
    "wink left": ("eyeBlink_L",),
    "brow raise": ("browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R"),
    "frown": ("browDown_L", "browDown_R", "mouthFrown_L", "mouthFrown_R"),
    "pucker": ("mouthPucker",),
    "cheek puff": ("cheekPuff_L", "cheekPuff_R"),
}
RENDER_SIZE = 256
AVERAGE_W_SAMPLES, AVERAGE_W_SEED = 256, 2**31 - 1  # the fixed latents whose mean w is the truncation centre of a c
# Plain (unconvolved) real SH basis constants up to l=2, in `core.face3dmm.sh_basis` order.
_Y = (0.5 / math.sqrt(math.pi), math.sqrt(3 / (4 * math.pi)), 0.5 * math.sqrt(15 / math.pi),
      0.25 * math.sqrt(5 / math.pi), 0.25 * math.sqrt(15 / math.pi))


@dataclass
class FaceControls:
    """What the user sets. `expression` maps EXPRESSION_NAMES entries to weights in [0, 1]; names left out, and light
    values left None, take the training faces' average (`average_controls`)."""

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    expression: dict[str, float] = field(default_factory=dict)
    light_azimuth: float | None = None
    light_elevation: float | None = None
    light_intensity: float | None = None
    identity: np.ndarray | None = None  # None: the training mean (or a random one with `random_identity`)

    def expression_vector(self, average: torch.Tensor) -> torch.Tensor:
        """The 53 expression weights, clipped to [0, 1], with `average`'s weight for the names not given; unknown
        names raise ValueError."""
        unknown = sorted(set(self.expression) - set(EXPRESSION_NAMES))
        if unknown:
            raise ValueError(f"unknown expressions {unknown}; expected names from core.face3dmm.EXPRESSION_NAMES")
        weights = [self.expression.get(name, float(default)) for name, default in zip(EXPRESSION_NAMES, average)]
        return torch.tensor([min(max(float(weight), 0.0), 1.0) for weight in weights])


def light_from_sh(sh: torch.Tensor) -> tuple[float, float, float]:
    """(azimuth, elevation, intensity) of the white directional light in a 3 x 9 SH light's band 1, the inverse of
    `directional_sh` (the intensity is relative to the ambient that `ambient_sh` leaves)."""
    y, z, x = (float(v) for v in sh[:, 1:4].mean(dim=0))
    azimuth = math.degrees(math.atan2(x, z))
    elevation = math.degrees(math.atan2(y, math.hypot(x, z)))
    directional = math.sqrt(x * x + y * y + z * z) * _Y[0] / _Y[1]  # what the light adds to band 0
    ambient = float(sh[:, 0].mean()) - directional
    return azimuth, elevation, directional / ambient if ambient > 0 else 0.0


def ambient_sh(sh: torch.Tensor) -> torch.Tensor:
    """The ambient part of a 3 x 9 SH light: band 0 without what its band-1 directional light adds to it (the base
    that `directional_sh` adds a light to)."""
    y, z, x = (float(v) for v in sh[:, 1:4].mean(dim=0))
    ambient = torch.zeros_like(sh)
    ambient[:, 0] = sh[:, 0] - math.sqrt(x * x + y * y + z * z) * _Y[0] / _Y[1]
    return ambient


def average_controls(conditioning: dict[str, Any]) -> FaceControls:
    """The controls of the training faces' average (a generator's config.json `conditioning`): frontal pose, the
    mean expression weights and the mean light's direction and intensity (rounded to the tab's slider steps)."""
    mean = torch.tensor(conditioning["mean"], dtype=torch.float32)
    params = FaceParams.from_vector(mean, mean.numel() - FaceParams.vector_size(0))
    azimuth, elevation, intensity = light_from_sh(params.sh)
    expression = {name: round(round(float(weight) / 0.05) * 0.05, 2)
                  for name, weight in zip(EXPRESSION_NAMES, params.expression)}
    return FaceControls(expression=expression, light_azimuth=round(azimuth), light_elevation=round(elevation),
                        light_intensity=round(round(min(intensity, 2.0) / 0.05) * 0.05, 2))


def directional_sh(base: torch.Tensor, azimuth_deg: float, elevation_deg: float, intensity: float) -> torch.Tensor:
    """3 x 9 SH light: the ambient (band 0) of `base` plus a white directional light from (azimuth, elevation) whose
    strength is `intensity` times the ambient's mean."""
    azimuth, elevation = math.radians(azimuth_deg), math.radians(elevation_deg)
    x, y, z = math.cos(elevation) * math.sin(azimuth), math.sin(elevation), math.cos(elevation) * math.cos(azimuth)
    c0, c1, c2, c3, c4 = _Y
    direction = torch.tensor([c0, c1 * y, c1 * z, c1 * x, c2 * x * y, c2 * y * z, c3 * (3 * z * z - 1), c2 * x * z,
                              c4 * (x * x - y * y)])
    ambient = base[:, 0].clone()
    strength = float(intensity) * float(ambient.mean()) / c0
    sh = strength * direction.expand(3, -1).clone()
    sh[:, 0] += ambient
    return sh


def conditional_truncation(mapping: torch.nn.Module, z: torch.Tensor, c: torch.Tensor, psi: float,
                           samples: int = AVERAGE_W_SAMPLES) -> torch.Tensor:
    """ws of (z, c) truncated toward the average w *of c* (over `samples` fixed latents) instead of the mapping's
    global w_avg. The global average is the average training face, frontal and neutral, so pulling toward it also
    undoes part of the requested pose and expression (32-px tax-free preview, yaw sliders over 20 seeds: median
    error 6.0 deg toward w_avg, 4.2 deg toward the average of c, 4.3 deg untruncated)."""
    ws = mapping(z, c)
    if psi == 1:
        return ws
    latents = torch.from_numpy(np.random.RandomState(AVERAGE_W_SEED).randn(samples, z.shape[1])).to(z)
    average = torch.stack([mapping(latents, row.expand(samples, -1)).mean(dim=0) for row in c])
    return average + psi * (ws - average)


@dataclass
class TaxFreeResult:
    """Generated faces per variant (uint8 H x W x 3), the 3DMM condition render (uint8), the parameters used, the
    GLB of the 3DMM mesh (when a path was given), timings and provenance."""

    images: dict[str, np.ndarray]
    condition_render: np.ndarray
    params: FaceParams
    mesh_path: Path | None
    seed: int
    seconds: dict[str, float]
    provenance: Provenance
    warnings: list[str] = field(default_factory=list)


class TaxFreePipeline:
    """3DMM parameters -> faces from the conditional generators, their condition render and mesh."""

    def __init__(self, generators: dict[str, torch.nn.Module], conditioning: dict[str, dict[str, Any]],
                 face_model: FaceModel | None = None, runtime: Runtime | None = None,
                 model_names: dict[str, str] | None = None):
        if set(generators) != set(conditioning) or not generators:
            raise ValueError("every generator needs its conditioning spec")
        self.runtime = runtime or Runtime("cpu")
        self.generators = generators
        self.face_model = face_model or load_face_model()
        self.model_names = dict(model_names or {})
        self.mean = {v: torch.tensor(spec["mean"], dtype=torch.float32) for v, spec in conditioning.items()}
        self.std = {v: torch.tensor(spec["std"], dtype=torch.float32) for v, spec in conditioning.items()}
        size = FaceParams.vector_size(self.face_model.num_identity)
        for variant, mean in self.mean.items():
            if mean.shape != (size,):
                raise ValueError(f"{variant}: conditioning has {mean.shape[0]} values, the 3DMM vector has {size}")

    @classmethod
    def from_pretrained(cls, variants: tuple[str, ...] = tuple(VARIANTS), runtime: Runtime | None = None
                        ) -> "TaxFreePipeline":
        """The registry generators of `variants` (keys of VARIANTS; each the first of its models that is available)
        through the runtime's model cache."""
        runtime = runtime or Runtime()
        generators, conditioning, names = {}, {}, {}
        for variant in variants:
            name = runtime.registry.first_available(VARIANTS[variant])
            config = runtime.registry.load_config(name)

            def build(config, state_dict):
                module = generator_from_config(config)
                module.load_state_dict({k: v.float() for k, v in state_dict.items()})
                return module

            generators[variant] = runtime.get_model(name, build, dtype=torch.float32)
            conditioning[variant] = config["conditioning"]
            names[variant] = name
        return cls(generators, conditioning, runtime=runtime, model_names=names)

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.generators)

    def average_controls(self) -> FaceControls:
        """The training faces' average (`average_controls` of the first variant's conditioning)."""
        return average_controls({"mean": next(iter(self.mean.values())).tolist()})

    def resolved_light(self, controls: FaceControls) -> tuple[float, float, float]:
        """(azimuth, elevation, intensity) of `controls`, the average's where a value is None."""
        average = self.average_controls()
        return tuple(getattr(average if getattr(controls, key) is None else controls, key)
                     for key in ("light_azimuth", "light_elevation", "light_intensity"))

    def params_from_controls(self, controls: FaceControls, seed: int = 0, random_identity: bool = False) -> FaceParams:
        """The 3DMM parameters for `controls`: identity from the controls, random (seeded, from the training labels'
        distribution) or the training mean; unset expressions and light, translation, scale and the light's colour
        from the training mean."""
        mean_vector, std_vector = next(iter(self.mean.values())), next(iter(self.std.values()))
        mean = FaceParams.from_vector(mean_vector, self.face_model.num_identity)
        spread = FaceParams.from_vector(std_vector, self.face_model.num_identity)
        if controls.identity is not None:
            identity = torch.as_tensor(controls.identity, dtype=torch.float32)
        elif random_identity:
            noise = torch.from_numpy(np.random.RandomState(seed).randn(self.face_model.num_identity)).float()
            identity = mean.identity + spread.identity * noise
        else:
            identity = mean.identity
        return replace(
            mean,
            identity=identity,
            expression=controls.expression_vector(mean.expression),
            rotation=torch.tensor([controls.yaw, controls.pitch, controls.roll], dtype=torch.float32),
            sh=directional_sh(ambient_sh(mean.sh), *self.resolved_light(controls)),
        )

    def controls_from_photo(self, photo: Any) -> tuple[FaceControls, list[str]]:
        """'Copy from photo': fit the 3DMM to the face in `photo` (anything `prepare_face` accepts) and return the
        controls that reproduce its identity, expression, pose and light direction, with the face input's warnings."""
        face = prepare_face(photo, size=RENDER_SIZE)
        size = face.image.shape[0]
        params = self.face_model.fit_landmarks(torch.as_tensor(face.landmarks, dtype=torch.float32), size, size)
        params = self.face_model.fit_lighting(face.image, params)
        yaw, pitch, roll = (float(v) for v in params.rotation)
        azimuth, elevation, intensity = light_from_sh(params.sh)
        expression = {n: float(w) for n, w in zip(EXPRESSION_NAMES, params.expression)}
        controls = FaceControls(yaw, pitch, roll, expression, azimuth, elevation, min(intensity, 2.0),
                                identity=params.identity.numpy())
        return controls, list(face.warnings)

    def __call__(self, controls: FaceControls, seed: int = 0, variants: tuple[str, ...] | None = None,
                 random_identity: bool = False, truncation_psi: float = 0.7,
                 mesh_path: str | Path | None = None) -> TaxFreeResult:
        """Generate the face of `controls` with each of `variants` (default: all) for latent `seed`
        (z = RandomState(seed).randn, the NVlabs convention), render the 3DMM condition, and write its GLB to
        `mesh_path` when given."""
        variants = variants or self.variants
        unknown = [v for v in variants if v not in self.generators]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; available: {', '.join(self.variants)}")
        seconds: dict[str, float] = {}
        params = self.params_from_controls(controls, seed, random_identity)
        vector = params.to_vector()
        images = {}
        for variant in variants:
            generator = self.generators[variant]
            start = time.perf_counter()

            def generate(dtype: torch.dtype, generator=generator, variant=variant) -> torch.Tensor:
                device = next(generator.parameters()).device
                z = torch.from_numpy(np.random.RandomState(seed).randn(1, generator.z_dim)).float().to(device)
                c = ((vector - self.mean[variant]) / self.std[variant])[None].to(device)
                ws = conditional_truncation(generator.mapping, z, c, truncation_psi)
                return generator.synthesis(ws, noise_mode="const", force_fp32=dtype == torch.float32)

            image = self.runtime.run(generate, what=f"The {variant} generator")
            images[variant] = (image[0].float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            seconds[variant] = time.perf_counter() - start
        start = time.perf_counter()
        condition_render = self.face_model.render(params, RENDER_SIZE).shaded
        seconds["condition_render"] = time.perf_counter() - start
        parameters = {"variants": list(variants), "yaw": controls.yaw, "pitch": controls.pitch, "roll": controls.roll,
                      "expression": {n: round(float(w), 3) for n, w in zip(EXPRESSION_NAMES, params.expression) if w},
                      "truncation_psi": truncation_psi, "light": list(self.resolved_light(controls)),
                      "random_identity": random_identity}
        names = [self.model_names.get(v, v) for v in variants]
        revisions = {self.runtime.registry.entry(n).revision for n in names if n in self.runtime.registry.names}
        provenance = Provenance(METHOD, ", ".join(names), ", ".join(sorted(r for r in revisions if r)) or None, seed,
                                parameters)
        written = None
        if mesh_path is not None:
            start = time.perf_counter()
            written = self.face_model.export_glb(mesh_path, params, metadata=provenance)
            seconds["mesh"] = time.perf_counter() - start
        return TaxFreeResult(images, condition_render, params, written, seed, seconds, provenance)
