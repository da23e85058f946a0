"""Train the bundled 3D head generator: a small PanoHead-style `core.nets.triplane.TriPlaneGenerator`, in chunks.

    python -m training.train_head3d --data datasets/faces/faces128.npz --run runs/head3d --minutes 9
    python -m training.train_head3d --run runs/head3d --minutes 0 --export weights/head3d_faces128

Recipe (EG3D / PanoHead at small scale):
* Generator: tri-grid (depth 2) of 64^2 planes, neural rendering at 64^2 (24 + 24 samples per ray), Hybrid2X
  super-resolution to 128 px, `torgb` raw image, background network, `t_mapping` camera-translation offset (L2
  `translation_reg`). Pose-conditioned mapping (c_scale 1) with EG3D's generator pose conditioning swap: with
  probability `gpc_prob` the mapping sees another training camera than the one rendered.
* Discriminator: `training.discriminator.Discriminator` on 6 channels (final image + raw image upsampled to 128
  px; reals: the image resized down to the neural rendering resolution and up again), projection-conditioned on the
  25-float camera label. Non-saturating loss, lazy R1 on both real channels, ADA-controlled augmentation of
  `brightness,contrast,cutout` (no translation: a shift would contradict the camera label; no saturation: it would
  mix the image and raw halves).
* Geometric prior: each training camera comes with the ICT-FaceKit fit of its image (`face3dmm` label). Its depth
  in the image frame (`geometry_prior`, cached once in the run folder at 32 px) supervises the fakes rendered from
  that camera, weakly and only early (weight `prior_weight`, fading linearly to 0 at `prior_kimg`): the raw opacity
  should be 1 on the fitted face, and the raw depth, centred on the face, should follow the fit's centred depth
  (shift invariant, because the fit is weak perspective and has no absolute distance). It pushes the field toward
  a head with a nose in front of the cheeks instead of a flat billboard, without fixing the identity's shape.
  A third term with the same fading weight (times `prior_surface_weight`), `surface_loss`, asks for a sharp
  surface at the render's own depth on the face: empty just in front of it, solid just behind. Without it the
  64-px CPU preview's field was a fog of density 3-5 at 21 kimg that rendered a face but held no level surface
  for the GLB.
* Size: 128 px (the bundled config) or 64 px for the CPU preview, whose super-resolution is our half-size
  `SuperresolutionPreview2X` (`core.nets.superresolution`).
* G_ema with ramp-up, w_avg tracking; on CUDA the 4 highest resolutions of the backbone, the super-resolution and D
  run in float16 with `conv_clamp` 256 (non-finite gradients zeroed); CPU is float32.

The run folder and checkpoints follow `training/train_stylegan2.py` (compact: float16 G, D, G_ema, bfloat16 second
moments, no first moments since beta1 = 0), plus `geometry_prior.npz`. `samples.png`: G_ema for 4 seeds (rows)
at yaw -40, -20, 0, 20, 40 (columns).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from core.nets import CONFIG_FILE, WEIGHTS_FILE
from core.nets.camera import camera_label
from core.nets.triplane import TriPlaneGenerator
from core.nets.volume_rendering import sample_rays
from training.augment import AdaptiveProbability, augment, parse_operations
from training.discriminator import Discriminator
from training.resumable import (Deadline, add_budget_options, last_log_record, load_checkpoint, save_checkpoint,
                                stored_config)
from training.train_stylegan2 import add_config_options, configure_device, nan_to_num_grads, train, update_ema

PRIOR_FILE = "geometry_prior.npz"
CARD_FILE = "README.md"
CAMERA_DIM = 25
SAMPLE_YAWS = (-40, -20, 0, 20, 40)
SAMPLE_SEEDS = 4


@dataclass
class Head3DConfig:
    """Architecture and recipe of a run (stored in the checkpoint; defaults are the bundled 128-px config)."""

    resolution: int = 128
    z_dim: int = 128
    w_dim: int = 512  # the super-resolution's affine layers are hard-wired to 512
    mapping_layers: int = 2
    channel_base: int = 4096
    channel_max: int = 64
    triplane_size: int = 64
    triplane_depth: int = 2
    neural_rendering_resolution: int = 64
    depth_samples: int = 24
    importance_samples: int = 24
    num_fp16_res: int = 4
    conv_clamp: float | None = 256
    d_channel_base: int = 8192
    d_channel_max: int = 128
    mbstd_group: int = 4
    batch: int = 32
    lr_g: float = 0.0025
    lr_d: float = 0.002
    r1_gamma: float = 1.0
    r1_interval: int = 16
    gpc_prob: float = 0.7
    # EG3D's option: the mapping sees a zero camera, so a head's identity can only come from z (the 64-px preview's
    # camera-conditioned mapping read identity from the camera: training/README.md, "CPU previews")
    c_gen_conditioning_zero: bool = False
    translation_reg: float = 10.0
    prior_weight: float = 1.0
    prior_kimg: float = 200.0
    prior_resolution: int = 32
    prior_surface_weight: float = 0.25  # 1.0 made the CPU preview's side views worse after ~10 kimg (training/README)
    prior_surface_gap: float = 0.05
    prior_surface_rays: int = 64
    ema_kimg: float = 10.0
    ema_rampup: float | None = 0.05
    augment: str = "brightness,contrast,cutout"
    augment_p: float = 0.0
    ada_target: float | None = 0.6
    ada_interval: int = 4
    ada_kimg: float = 100.0
    mirror: bool = True
    seed: int = 0
    data: str | None = None
    split: str | None = "train"

    @property
    def superresolution_variant(self) -> str:
        """Hybrid2X for 128 px; our half-size Preview2X for the 64-px CPU preview (`core.nets.superresolution`)."""
        variants = {128: "SuperresolutionHybrid2X", 64: "SuperresolutionPreview2X"}
        if self.resolution not in variants:
            raise ValueError(f"the 3D head generator trains at {sorted(variants)} px, not {self.resolution}")
        return variants[self.resolution]

    def rendering_kwargs(self) -> dict[str, Any]:
        """PanoHead `rendering_kwargs` (FFHQ camera range: radius 2.7, rays 2.25-3.3, unit box)."""
        return dict(image_resolution=self.resolution, triplane_depth=self.triplane_depth,
                    triplane_size=self.triplane_size, decoder_activation="none", use_torgb_raw=True,
                    use_background=True, disparity_space_sampling=False, clamp_mode="softplus",
                    superresolution_module=f"training.superresolution.{self.superresolution_variant}",
                    c_gen_conditioning_zero=self.c_gen_conditioning_zero, c_scale=1.0,
                    superresolution_noise_mode="none",
                    density_reg=0.0, decoder_lr_mul=1.0, sr_antialias=True, depth_resolution=self.depth_samples,
                    depth_resolution_importance=self.importance_samples, ray_start=2.25, ray_end=3.3,
                    box_warp=1.0, avg_camera_radius=2.7, avg_camera_pivot=[0, 0, 0.2])

    def generator_kwargs(self) -> dict[str, Any]:
        """`TriPlaneGenerator` constructor kwargs (the `init_kwargs` of the exported config.json)."""
        return dict(z_dim=self.z_dim, c_dim=CAMERA_DIM, w_dim=self.w_dim, img_resolution=self.resolution,
                    img_channels=3, sr_num_fp16_res=self.num_fp16_res,
                    mapping_kwargs=dict(num_layers=self.mapping_layers), rendering_kwargs=self.rendering_kwargs(),
                    sr_kwargs=dict(channel_base=self.channel_base, channel_max=self.channel_max),
                    channel_base=self.channel_base, channel_max=self.channel_max,
                    num_fp16_res=self.num_fp16_res, conv_clamp=self.conv_clamp, kind="panohead")

    def discriminator_kwargs(self) -> dict[str, Any]:
        """Dual (image + raw image) camera-conditioned `Discriminator` kwargs."""
        return dict(c_dim=CAMERA_DIM, img_resolution=self.resolution, img_channels=6,
                    channel_base=self.d_channel_base, channel_max=self.d_channel_max,
                    num_fp16_res=self.num_fp16_res, conv_clamp=self.conv_clamp,
                    epilogue_kwargs=dict(mbstd_group_size=self.mbstd_group))


def build_head_generator(config: Head3DConfig) -> TriPlaneGenerator:
    """A randomly initialised generator of `config` with its neural rendering resolution set."""
    generator = TriPlaneGenerator(**config.generator_kwargs())
    generator.neural_rendering_resolution = config.neural_rendering_resolution
    return generator


@dataclass
class HeadTrainingData:
    """uint8 images [N, 3, S, S], camera labels [N, 25] (and of the mirrored images), and the geometric prior:
    nearness [N, R, R] of the fitted face in normalised image units (NaN where the fit does not cover the pixel)."""

    images: torch.Tensor
    cameras: torch.Tensor
    mirrored_cameras: torch.Tensor
    prior: torch.Tensor

    def to(self, device) -> "HeadTrainingData":
        return HeadTrainingData(*(t.to(device) for t in dataclasses.astuple(self)))


def geometry_prior(face3dmm: np.ndarray, resolution: int) -> np.ndarray:
    """[N, R, R] float16 nearness (camera-frame z times the fit's scale, normalised image units, larger = nearer)
    of each fitted ICT-FaceKit face rendered in its image's frame; NaN off the face skin region (eyes, mouth, scalp,
    ears and neck are left out: hair and eyeballs lie elsewhere) and for rows whose fit failed."""
    from core.face3dmm import REGION_NAMES, FaceParams, load_face_model, normalised_to_pixels, rasterize

    model = load_face_model()
    face_region = REGION_NAMES.index("face")
    out = np.full((len(face3dmm), resolution, resolution), np.nan, np.float16)
    for index, vector in enumerate(np.asarray(face3dmm, np.float32)):
        if not np.isfinite(vector).all():
            continue
        params = FaceParams.from_vector(torch.from_numpy(vector), model.num_identity)
        with torch.no_grad():
            camera = model.camera_vertices(params)
            xy = normalised_to_pixels(params.scale * camera[:, :2] + params.translation, resolution, resolution)
            nearness = camera[:, 2] * params.scale
            triangle, bary = rasterize(torch.cat([xy, nearness[:, None]], 1), model.triangles, resolution, resolution)
        covered = (triangle >= 0) & (model.triangle_region[triangle.clamp_min(0)] == face_region)
        depth = (nearness[model.triangles[triangle.clamp_min(0)]] * bary).sum(-1)
        out[index] = torch.where(covered, depth, torch.nan).numpy().astype(np.float16)
    return out


def load_training_data(path: str | Path, split: str | None, prior_path: Path, prior_resolution: int):
    """Images, cameras and the geometric prior of an archive split; the prior is computed once into `prior_path`."""
    from training.data.archive import load_archive
    from training.train_stylegan2 import images_from_archive

    images = images_from_archive(path, split=split, label_key="camera")
    if prior_path.exists():
        prior = np.load(prior_path)["nearness"]
    else:
        archive = load_archive(path, split=split)
        assert len(archive) == images.images.shape[0], "camera labels with NaNs are not expected"
        started = time.monotonic()
        prior = geometry_prior(archive.face3dmm, prior_resolution)
        np.savez_compressed(prior_path, nearness=prior)
        print(f"geometry prior of {len(prior)} fits in {time.monotonic() - started:.1f} s", flush=True)
    return HeadTrainingData(images.images, images.labels, images.mirrored_labels,
                            torch.from_numpy(prior.astype(np.float32)))


def prior_loss(depth: torch.Tensor, opacity: torch.Tensor, nearness: torch.Tensor, cameras: torch.Tensor):
    """(opacity loss, depth loss) of raw renders against the prior.

    `depth`, `opacity` [N, 1, R, R] from the renderer; `nearness` [N, R', R'] (NaN off the face); `cameras` the
    rendered labels (distance and focal length turn normalised image units into world units: one unit is half the
    image, i.e. distance * 0.5 / focal). Both losses average over the face pixels.
    """
    size = depth.shape[-1]
    nearness = F.interpolate(nearness[:, None], size=(size, size), mode="nearest")
    face = torch.isfinite(nearness)
    count = face.sum(dim=(1, 2, 3)).clamp_min(1)
    distance = cameras[:, [3, 7, 11]].norm(dim=1)
    world_per_unit = (distance * 0.5 / cameras[:, 16]).reshape(-1, 1, 1, 1)
    target = -torch.nan_to_num(nearness) * world_per_unit  # farther = larger, like the rendered depth

    def centred(values):
        mean = (values * face).sum(dim=(1, 2, 3), keepdim=True) / count.reshape(-1, 1, 1, 1)
        return (values - mean) * face

    opacity_loss = ((1 - opacity.clamp(0, 1)).square() * face).sum(dim=(1, 2, 3)) / count
    depth_loss = (centred(depth) - centred(target)).abs().sum(dim=(1, 2, 3)) / count
    return opacity_loss.mean(), depth_loss.mean()


SURFACE_DENSITY = 20.0  # density just behind the surface that the surface term asks for (meshes use level 10)


def surface_loss(G: TriPlaneGenerator, planes: torch.Tensor, depth: torch.Tensor, nearness: torch.Tensor,
                 cameras: torch.Tensor, gap: float, rays: int) -> torch.Tensor:
    """A sharp surface where the render's own depth is, on up to `rays` random face pixels per image.

    Along each chosen ray, at the rendered (expected) depth d, detached: the point at d - gap (world units) should
    be empty and the point at d + gap / 2 solid. Loss: the density in front times `gap` (the optical depth it adds)
    plus the shortfall of the density behind below SURFACE_DENSITY, relative to it. Without it the field stays a
    fog of density 3-5 that renders a face but has no level surface for a mesh (seen in the 64-px CPU preview).
    """
    n, _, size, _ = depth.shape
    face = torch.isfinite(F.interpolate(nearness[:, None], size=(size, size), mode="nearest")).reshape(n, -1)
    scores = torch.rand(face.shape, device=depth.device) + face.float()  # face pixels first
    chosen = scores.topk(min(rays, size * size), dim=1).indices
    valid = torch.gather(face, 1, chosen).float()
    origins, directions = sample_rays(cameras[:, :16].view(-1, 4, 4), cameras[:, 16:25].view(-1, 3, 3), size)
    pick = chosen[..., None].expand(-1, -1, 3)
    origins, directions = torch.gather(origins, 1, pick), torch.gather(directions, 1, pick)
    ray_depth = torch.gather(depth.reshape(n, -1), 1, chosen).detach()[..., None]
    front = G.query_density(planes, origins + (ray_depth - gap) * directions)
    behind = G.query_density(planes, origins + (ray_depth + gap / 2) * directions)
    front_loss = F.softplus(front - 1)[..., 0] * gap
    behind_loss = F.relu(SURFACE_DENSITY - F.softplus(behind - 1))[..., 0] / SURFACE_DENSITY
    count = valid.sum().clamp_min(1)
    return ((front_loss + behind_loss) * valid).sum() / count


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize to size x size."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Head3DTrainer:
    """G, D, G_ema, optimizers and state of one run; `step()` runs one G and one D update."""

    def __init__(self, config: Head3DConfig, data: HeadTrainingData | None, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.data = data.to(self.device) if data is not None else None
        if data is not None:
            assert data.images.shape[-1] == config.resolution, "data/config resolution mismatch"
        torch.manual_seed(config.seed)
        self.G = build_head_generator(config).train().to(self.device)
        self.D = Discriminator(**config.discriminator_kwargs()).train().to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=config.lr_g, betas=(0.0, 0.99), eps=1e-8)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=config.lr_d, betas=(0.0, 0.99), eps=1e-8)
        self.ada = AdaptiveProbability(config.augment_p, config.ada_target, config.ada_kimg)
        self.operations = parse_operations(config.augment)
        self.step_count = 0

    @property
    def images_seen(self) -> int:
        return self.step_count * self.config.batch

    @property
    def prior_weight(self) -> float:
        """`prior_weight` fading linearly to 0 at `prior_kimg`."""
        cfg = self.config
        if cfg.prior_kimg <= 0:
            return 0.0
        return cfg.prior_weight * max(0.0, 1 - self.images_seen / (cfg.prior_kimg * 1000))

    # ---- batches -------------------------------------------------------------------------------------------

    def _draw(self, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample indices and mirror flags depending only on (seed, step, salt), so resuming keeps the order."""
        generator = torch.Generator().manual_seed((self.config.seed * 1_000_003 + self.step_count) * 8 + salt)
        n, batch = self.data.images.shape[0], self.config.batch
        index = torch.randint(n, [batch], generator=generator)
        mirror = torch.rand([batch], generator=generator) < (0.5 if self.config.mirror else 0.0)
        return index.to(self.device), mirror.to(self.device)

    def _cameras(self, index, mirror) -> torch.Tensor:
        return torch.where(mirror[:, None], self.data.mirrored_cameras[index], self.data.cameras[index])

    def _real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index, mirror = self._draw(0)
        images = self.data.images[index].to(torch.float32) / 127.5 - 1
        images = torch.where(mirror.reshape(-1, 1, 1, 1), images.flip(-1), images)
        return images, self._cameras(index, mirror)

    def _fake_cameras(self, salt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rendered cameras, conditioning cameras after the gpc swap, prior nearness of the rendered cameras)."""
        index, mirror = self._draw(salt)
        cameras = self._cameras(index, mirror)
        prior = torch.where(mirror[:, None, None], self.data.prior[index].flip(-1), self.data.prior[index])
        swap_index, swap_mirror = self._draw(salt + 1)
        swapped = self._cameras(swap_index, swap_mirror)
        swap = (torch.rand([len(index)], device=self.device) < self.config.gpc_prob)[:, None]
        return cameras, torch.where(swap, swapped, cameras), prior

    def _generate(self, G, cameras, conditioning):
        """G's render dict for random z (mapping on `conditioning`, rendered from `cameras` + t_mapping offset),
        with the tri-grid under "planes"."""
        z = torch.randn([cameras.shape[0], self.config.z_dim], device=self.device)
        ws = G.mapping(z, conditioning, update_emas=G is self.G)
        _, delta = G.apply_delta_c(z, conditioning, update_emas=G is self.G)
        shifted = cameras.clone()
        shifted[:, [3, 7, 11]] += delta
        planes = G.generate_planes(ws)
        return {**G.render_planes(planes, ws, shifted), "planes": planes}, shifted, delta

    def _discriminate(self, image, image_raw, cameras):
        dual = torch.cat([image, resize(image_raw, image.shape[-1])], dim=1)
        return self.D(augment(dual, self.ada.p, self.operations), cameras)

    # ---- one training step ---------------------------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        """One G update (adversarial + translation L2 + fading geometric prior) and one D update (+ lazy R1);
        then the G_ema and ADA updates. Returns detached scalar stats."""
        cfg = self.config
        stats: dict[str, Any] = {}

        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        self.opt_G.zero_grad(set_to_none=True)
        cameras, conditioning, prior = self._fake_cameras(2)
        out, shifted, delta = self._generate(self.G, cameras, conditioning)
        loss_G = F.softplus(-self._discriminate(out["image"], out["image_raw"], shifted)).mean()
        stats["loss_G"] = loss_G.detach()
        loss = loss_G + cfg.translation_reg * delta.square().sum(1).mean()
        if self.prior_weight > 0:
            opacity_loss, depth_loss = prior_loss(out["image_depth"], out["image_mask"], prior, shifted)
            loss = loss + self.prior_weight * (opacity_loss + depth_loss)
            stats["prior_opacity"], stats["prior_depth"] = opacity_loss.detach(), depth_loss.detach()
            if cfg.prior_surface_weight > 0:
                surface = surface_loss(self.G, out["planes"], out["image_depth"], prior, shifted,
                                       cfg.prior_surface_gap, cfg.prior_surface_rays)
                loss = loss + self.prior_weight * cfg.prior_surface_weight * surface
                stats["prior_surface"] = surface.detach()
        loss.backward()
        stats["nonfinite_grads_G"] = nan_to_num_grads(self.G)
        self.opt_G.step()

        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        self.opt_D.zero_grad(set_to_none=True)
        with torch.no_grad():
            cameras, conditioning, _ = self._fake_cameras(4)
            out, shifted, _ = self._generate(self.G, cameras, conditioning)
        fake_logits = self._discriminate(out["image"], out["image_raw"], shifted)
        real_images, real_cameras = self._real_batch()
        do_r1 = cfg.r1_gamma > 0 and self.step_count % cfg.r1_interval == 0
        real_image = real_images.detach().requires_grad_(do_r1)
        real_raw = resize(real_images, cfg.neural_rendering_resolution).detach().requires_grad_(do_r1)
        real_logits = self._discriminate(real_image, real_raw, real_cameras)
        loss_D = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        stats["loss_D"] = loss_D.detach()
        if do_r1:
            gradients = torch.autograd.grad(real_logits.sum(), [real_image, real_raw], create_graph=True)
            r1_penalty = sum(g.square().sum(dim=[1, 2, 3]) for g in gradients).mean()
            loss_D = loss_D + r1_penalty * (cfg.r1_gamma / 2 * cfg.r1_interval)
            stats["r1_penalty"] = r1_penalty.detach()
        loss_D.backward()
        stats["nonfinite_grads_D"] = nan_to_num_grads(self.D)
        self.opt_D.step()
        self.ada.observe(real_logits)
        stats["real_logits"], stats["fake_logits"] = real_logits.detach().mean(), fake_logits.detach().mean()

        self._update_ema()
        self.step_count += 1
        if cfg.ada_interval > 0 and self.step_count % cfg.ada_interval == 0:
            stats["r_t"] = self.ada.update(cfg.batch * cfg.ada_interval)
        return stats

    def _update_ema(self) -> None:
        cfg = self.config
        update_ema(self.G_ema, self.G, cfg.batch, self.images_seen, cfg.ema_kimg, cfg.ema_rampup)

    # ---- checkpoints, samples, export ----------------------------------------------------------------------

    def log_fields(self) -> dict[str, float]:
        """Extra state for each training log line."""
        return {"augment_p": round(self.ada.p, 5), "prior_weight": round(self.prior_weight, 4)}

    def save(self, run_dir: str | Path, compact: bool = True) -> None:
        """Write the checkpoint into `run_dir` (compact: float16 copies, bfloat16 moments)."""
        extra = {"config": dataclasses.asdict(self.config), **self.ada.state(), "kimg": self.images_seen / 1000}
        half = torch.float16 if compact else None
        save_checkpoint(run_dir, self.step_count, {"G": self.G, "D": self.D, "G_ema": self.G_ema},
                        {"G": self.opt_G, "D": self.opt_D}, extra,
                        module_dtypes={"G": half, "D": half, "G_ema": half} if compact else None,
                        moment_dtype=torch.bfloat16 if compact else None,
                        skip_state=("exp_avg",))  # beta1 = 0: exp_avg is overwritten by the next gradient

    def load(self, run_dir: str | Path) -> bool:
        """Restore from `run_dir`; False when it holds no checkpoint."""
        restored = load_checkpoint(run_dir, {"G": self.G, "D": self.D, "G_ema": self.G_ema},
                                   {"G": self.opt_G, "D": self.opt_D})
        if restored is None:
            return False
        self.step_count, extra = restored
        self.ada.load_state(extra)
        return True

    @torch.no_grad()
    def sample_grid(self, path: str | Path) -> None:
        """G_ema images: seeds 0-3 (rows, frontal conditioning) at yaws -40 ... 40 (columns), as one PNG."""
        z = torch.stack([torch.randn([self.config.z_dim], generator=torch.Generator().manual_seed(seed))
                         for seed in range(SAMPLE_SEEDS)]).to(self.device)
        frontal = camera_label(0, 0).to(self.device).expand(SAMPLE_SEEDS, -1)
        ws = self.G_ema.mapping(z, frontal)
        rows = []
        for yaw in SAMPLE_YAWS:
            cameras = camera_label(yaw, 0).to(self.device).expand(SAMPLE_SEEDS, -1)
            rows.append(self.G_ema.synthesis(ws, cameras, noise_mode="const", deterministic=True)["image"])
        images = (torch.stack(rows, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu()  # [seeds, yaws, 3, S, S]
        size = self.config.resolution
        grid = images.permute(0, 3, 1, 4, 2).reshape(SAMPLE_SEEDS * size, len(SAMPLE_YAWS) * size, 3)
        Image.fromarray(grid.numpy()).save(path)

    def export(self, directory: str | Path, log: dict | None = None) -> Path:
        """Write G_ema as float16 `model.safetensors` + `config.json` + model card (read by `load_generator`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.G_ema.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {"kind": "panohead", "init_kwargs": self.config.generator_kwargs(),
                  "rendering_kwargs": self.config.rendering_kwargs(),
                  "neural_rendering_resolution": self.config.neural_rendering_resolution,
                  "training": {"recipe": dataclasses.asdict(self.config), "steps": self.step_count,
                               "kimg": self.images_seen / 1000, "augment_p": self.ada.p}}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        (directory / CARD_FILE).write_text(_model_card(self, log))
        return directory


def _model_card(trainer: Head3DTrainer, log: dict | None) -> str:
    cfg = trainer.config
    parameters = sum(p.numel() for p in trainer.G_ema.parameters())
    lines = [
        f"# 3D head generator (PanoHead-style tri-grid), {cfg.resolution} px",
        "",
        "`core.nets.triplane.TriPlaneGenerator` (G_ema, kind `panohead`) trained from scratch by"
        " `training/train_head3d.py`.",
        "",
        f"* **Data:** `{cfg.data}`, split `{cfg.split}`, camera labels from the archive, x-flips"
        f" {'on' if cfg.mirror else 'off'}. Non-commercial research data (see the data card).",
        f"* **Architecture:** tri-grid depth {cfg.triplane_depth} at {cfg.triplane_size} px, neural rendering"
        f" {cfg.neural_rendering_resolution} px ({cfg.depth_samples} + {cfg.importance_samples} samples),"
        f" {cfg.superresolution_variant} super-resolution, background network, z/w {cfg.z_dim}/{cfg.w_dim}, channel_base {cfg.channel_base},"
        f" channel_max {cfg.channel_max}; {parameters / 1e6:.2f} M parameters, float16 weights.",
        f"* **Recipe:** batch {cfg.batch}, Adam lr G/D {cfg.lr_g}/{cfg.lr_d}, R1 gamma {cfg.r1_gamma} every"
        f" {cfg.r1_interval}, gpc swap {cfg.gpc_prob}, translation L2 {cfg.translation_reg}, ICT-FaceKit depth"
        f" prior weight {cfg.prior_weight} (surface term x{cfg.prior_surface_weight}) fading to 0 at"
        f" {cfg.prior_kimg} kimg, EMA {cfg.ema_kimg} kimg,"
        f" augmentation `{cfg.augment}` (ADA target {cfg.ada_target}), seed {cfg.seed}.",
        f"* **Iterations:** {trainer.step_count} steps, {trainer.images_seen / 1000:.2f} kimg; final augment p"
        f" {trainer.ada.p:.3f}.",
        f"* **Last training log line:** `{json.dumps(log) if log else 'n/a'}`",
        "* **Quality metrics** (face-detection rate over yaw -40..40, identity cosine frontal vs +-30 deg, depth"
        " sanity, FD-id of frontal renders): not measured by the trainer; `python -m training.eval_head3d ... --card`"
        " adds them below as \"Evaluation (eval_head3d)\".",
        "",
    ]
    return "\n".join(lines)


def read_run_config(run_dir: str | Path) -> Head3DConfig | None:
    """The Head3DConfig stored in a run folder's checkpoint, or None."""
    stored = stored_config(run_dir)
    return None if stored is None else Head3DConfig(**stored)



def main(argv: list[str] | None = None) -> None:
    defaults = Head3DConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (checkpoint, log, samples, prior); resumed")
    parser.add_argument("--data", help="training archive (training.data); with --minutes 0 only the geometry prior is"
                        " prepared; not needed for --minutes 0 --export")
    parser.add_argument("--split", default=defaults.split)
    add_budget_options(parser)
    parser.add_argument("--kimg", type=float, default=None, help="stop when the run has seen this many kimg")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--exact-checkpoint", action="store_true", help="store float32 weights and moments")
    parser.add_argument("--export", help="write G_ema in the bundled format here at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_config_options(parser, Head3DConfig, skip=("data", "split", "resolution"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    configure_device(device)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    run_dir = Path(args.run)
    config = read_run_config(run_dir)
    if config is None:
        if args.data is None:
            parser.error("--data is required to start a run")
        recipe = {f.name: getattr(args, f.name) for f in dataclasses.fields(Head3DConfig) if hasattr(args, f.name)}
        config = Head3DConfig(**recipe)
    else:
        print(f"resuming {run_dir}; its stored config is used", flush=True)
    data = None
    if args.minutes > 0 or args.data:
        run_dir.mkdir(parents=True, exist_ok=True)
        data_path = args.data or config.data
        data = load_training_data(data_path, config.split, run_dir / PRIOR_FILE, config.prior_resolution)
        config = dataclasses.replace(config, data=str(data_path), resolution=data.images.shape[-1])
        print(f"{data.images.shape[0]} training images of {config.resolution} px", flush=True)
    trainer = Head3DTrainer(config, data, device)
    trainer.load(run_dir)
    record = None
    if args.minutes > 0:
        record = train(trainer, run_dir, deadline, max_steps=args.steps, max_kimg=args.kimg,
                       log_every=args.log_every, compact=not args.exact_checkpoint)
    if args.export:
        if record is None:
            record = last_log_record(run_dir)
        trainer.export(args.export, record)
        print(f"exported G_ema to {args.export}", flush=True)


if __name__ == "__main__":
    main()
