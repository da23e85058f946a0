"""AgileGAN3D (arXiv 2303.14297): few-shot 3D portrait stylization by augmented transfer learning, as one CLI.

    python -m training.agilegan3d --exemplars DIR --name STYLE --run runs/agile_STYLE --minutes 9 \
        [--data datasets/faces/faces128.npz] [--base2d weights/stylegan2_faces128] [--base3d weights/head3d_faces128] \
        [--base-encoder DIR] [--export weights/agile_STYLE] [--exemplar-counts 5,10,20]

Stages (each resumable inside the flat run folder; every call continues where the last one stopped):

1. `prior`: the 2D style prior. The exemplars (aligned with `core.face.prepare_face`, or taken as aligned crops
   with `--aligned`) are projected into the base 2D StyleGAN2's W+ by optimisation. Then the 2D generator is
   fine-tuned on them (transfer learning from the base weights, mapping network and blocks up to
   `frozen_resolution` frozen, as few-shot GAN practice; heavy ADA augmentation) with an inversion-consistency term:
   the exemplars' projected latents must keep mapping to the exemplars.
2. `augment`: render the base 3D generator at sampled cameras, project each render into the 2D base generator's W+
   and re-synthesise it with the stylized 2D generator: a camera-labelled stylized set (`augmented.npz`).
3. `transfer`: guided transfer learning of the base 3D generator (`training.train_head3d.Head3DTrainer`,
   camera-conditioned D) on the augmented set, camera labels kept.
4. `encoder`: the multi-view-consistent 3D inversion encoder of the stylized generator. The base 3D encoder
   (`--base-encoder DIR`, else the registry's `head3d-encoder-faces128` when its files are here, else a fresh
   `Head3DEncoder`, said so in the log) is fine-tuned against the frozen stylized generator on real photos (train
   crops of `--data` with their archive cameras) and the base generator's renders of known latents
   (`StyleEncoderTrainer`).

Each stage removes what no later stage reads (the exemplar latents, the 2D stylizer once the augmented set is
complete, the augmented set once the 3D generator is tuned), so that the run folder stays within the carry limit.
`--data` is read once, when a run starts: `encoder_photos` train crops and `eval_photos` held-out test crops with
their camera labels are copied into `photos.npz`.

`--export DIR` writes the style as a compact delta over the base 3D generator (`core.nets.style_delta`) and, once
stage 4 is done, the stylized encoder as the style's `encoder` part, a delta over its base encoder; then it evaluates
the exported style on the held-out photos (`training.eval_agilegan3d`) and writes the model card, naming the
exemplars' origin and licence (`--exemplar-origin/--exemplar-licence`, else the exemplar folder's SOURCE.md).

`--exemplar-counts 5,10,20` starts the exemplar-count study instead: `--run` becomes a study folder (resumed as such
by later calls, with or without the option) holding one run per count (`n5`, `n10`, ... on nested seeded random subsets of the exemplar folder, sharing one `photos.npz`); each
finished run is exported (`n5_style`, ...) and evaluated, and the table of all counts goes to `study.md` and, with
`--export`, into the model card of the largest count's style, which is exported there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from core.nets import CONFIG_FILE, WEIGHTS_FILE, load_generator
from core.nets.camera import camera_label
from core.nets.encoders import Head3DEncoder, build_head3d_encoder
from core.nets.style_delta import apply_style_delta, build_style_delta, make_style_delta, save_style_delta
from training.data.archive import pack_bytes, read_archive
from training.data.flip import flip_camera
from training.eval_agilegan3d import evaluate_portraits, results_table
from training.resumable import STATE_FILE, Deadline
from training.train_encoder import train as train_encoder
from training.train_head3d import Head3DConfig, Head3DTrainer, HeadTrainingData
from training.train_head3d_encoder import (
    Head3DEncoderConfig,
    Head3DEncoderTrainer,
    delta_penalty,
    identity_distance,
    latent_loss,
    render,
)
from training.train_stylegan2 import StyleGAN2Trainer, TrainConfig, TrainingImages, nan_to_num_grads
from training.train_stylegan2 import train

STAGES = ("prior", "augment", "transfer", "encoder")
MARKER_FILE = "agilegan3d.json"
STUDY_FILE = "study.json"
STUDY_TABLE_FILE = "study.md"
LATENTS_FILE = "exemplar_latents.safetensors"
STYLIZER_FILE = "stylizer2d.safetensors"
AUGMENTED_FILE = "augmented.npz"
STYLED3D_FILE = "head3d_styled.safetensors"
STYLED_ENCODER_FILE = "head3d_encoder_styled.safetensors"
PHOTOS_FILE = "photos.npz"
CARD_FILE = "README.md"
SOURCE_FILE = "SOURCE.md"
BASE3D_NAME = "head3d-faces128"
BASE_ENCODER_NAME = "head3d-encoder-faces128"
ENCODER_PART = "encoder"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_DATA = "datasets/faces/faces128.npz"


@dataclass
class AgileConfig:
    """The recipe of one style (stored in the run folder's marker; defaults are the GPU recipe)."""

    seed: int = 0
    # stage 1: 2D style prior
    prior_steps: int = 400
    prior_batch: int = 8
    prior_lr: float = 0.002
    frozen_resolution: int = 8  # mapping + synthesis blocks up to this resolution stay frozen
    consistency_weight: float = 1.0
    prior_augment: str = "color,translation,cutout"
    prior_augment_p: float = 0.3
    projection_steps: int = 200
    projection_lr: float = 0.05
    # stage 2: augmented set
    augment_count: int = 1000
    augment_batch: int = 16
    yaw_range: float = 40.0
    pitch_std: float = 8.0
    truncation_psi: float = 0.7
    jpeg_quality: int = 95
    # stage 3: guided transfer learning
    transfer_steps: int = 1000
    transfer_batch: int = 16
    transfer_lr_g: float = 0.002
    transfer_lr_d: float = 0.002
    mbstd_group: int = 4
    # stage 4: 3D inversion encoder of the stylized generator
    encoder_steps: int = 1500
    encoder_batch: int = 8
    encoder_lr: float = 1e-4
    encoder_trainable: str = "laterals,heads,camera_offset"  # the photo backbone stays frozen
    encoder_synthetic_fraction: float = 0.5
    encoder_identity_weight: float = 1.0
    encoder_multiview_weight: float = 1.0
    encoder_pixel_weight: float = 1.0
    encoder_latent_weight: float = 1.0
    encoder_delta_weight: float = 2e-4
    encoder_photos: int = 500  # real train crops copied from --data into photos.npz
    # evaluation
    eval_photos: int = 32  # held-out test crops copied from --data into photos.npz
    # export
    delta_rank: int = 4  # ~340 KiB float16 for the 128-px head generator even when every tensor changes
    encoder_delta_rank: int = 8  # ~160 KiB float16 for the bundled encoder's heads


TINY = AgileConfig(prior_steps=2, prior_batch=2, projection_steps=2, augment_count=4, augment_batch=2,
                   transfer_steps=2, transfer_batch=2, mbstd_group=2, encoder_steps=2, encoder_batch=2,
                   encoder_photos=4, eval_photos=2)
# The CPU preview of a style over the 32-px 2D and 64-px 3D previews (the bundled agilegan3d-*-faces64): about
# 1.5 h on one core of the 2-core development CPU shared with other runs. Against the GPU recipe: 2.5x the prior
# steps (400 left the 32-px stylizer only faintly styled), 0.6x the augmented set, 0.35x the transfer images and
# 0.2x the encoder steps.
CPU_PREVIEW = AgileConfig(prior_steps=1000, augment_count=600, transfer_steps=700, transfer_batch=8, encoder_steps=300)
RECIPES = {"gpu": AgileConfig(), "cpu-preview": CPU_PREVIEW, "tiny": TINY}


# ---- inputs -----------------------------------------------------------------------------------------------------


def exemplar_names(directory: str | Path) -> list[str]:
    """Sorted file names of the images in an exemplar folder."""
    return sorted(p.name for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_exemplars(directory: str | Path, size: int, aligned: bool,
                   names: list[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """uint8 [N, 3, size, size] exemplars of a folder (only `names` when given) and their file names. Without
    `aligned` each image goes through `core.face.prepare_face` (images without a face are skipped with a note); with
    it, images are only resized."""
    from core.face import FaceInputError, prepare_face

    paths = [Path(directory) / name for name in (names or exemplar_names(directory))]
    images, names = [], []
    for path in paths:
        if aligned:
            image = Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)
        else:
            try:
                image = prepare_face(str(path), size=size).image
            except FaceInputError as error:
                print(f"skipping exemplar {path.name}: {error}", flush=True)
                continue
        images.append(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
        names.append(path.name)
    if len(images) < 2:
        raise ValueError(f"need at least 2 usable exemplars in {directory}, found {len(images)}")
    return torch.stack(images), names


def stylegan2_train_config(base_config: dict, agile: AgileConfig) -> TrainConfig:
    """The 2D trainer config that rebuilds the base 2D generator, with the few-shot recipe."""
    kwargs = base_config["init_kwargs"]
    synthesis = kwargs.get("synthesis_kwargs", {})
    return TrainConfig(resolution=kwargs["img_resolution"], c_dim=0, z_dim=kwargs["z_dim"], w_dim=kwargs["w_dim"],
                       mapping_layers=kwargs.get("mapping_kwargs", {}).get("num_layers", 8),
                       channel_base=synthesis.get("channel_base", 32768), channel_max=synthesis.get("channel_max", 512),
                       num_fp16_res=synthesis.get("num_fp16_res", 0), conv_clamp=synthesis.get("conv_clamp"),
                       mbstd_group=agile.mbstd_group, batch=agile.prior_batch, lr_g=agile.prior_lr,
                       lr_d=agile.prior_lr, augment=agile.prior_augment, augment_p=agile.prior_augment_p,
                       ema_kimg=1.0, seed=agile.seed, data=None, split=None)


def head3d_train_config(base_config: dict, agile: AgileConfig) -> Head3DConfig:
    """The 3D trainer config of the base 3D generator (its stored recipe), with the transfer-learning recipe."""
    fields = {f.name for f in dataclasses.fields(Head3DConfig)}
    recipe = {k: v for k, v in base_config["training"]["recipe"].items() if k in fields}
    return dataclasses.replace(Head3DConfig(**recipe), batch=agile.transfer_batch, lr_g=agile.transfer_lr_g,
                               lr_d=agile.transfer_lr_d, mbstd_group=agile.mbstd_group, prior_weight=0.0,
                               ema_kimg=1.0, seed=agile.seed, data=None, split=None)


def _read_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32) / 127.5 - 1


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ---- W+ projection ----------------------------------------------------------------------------------------------


def project_to_w(G: torch.nn.Module, images: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """W+ codes [N, num_ws, w_dim] of a frozen 2D generator that reproduce `images` ([-1, 1], any size), by Adam
    from w_avg on an L1 + low-resolution MSE loss."""
    images = _resize(images, G.img_resolution)
    ws = G.mapping.w_avg.detach().reshape(1, 1, -1).repeat(images.shape[0], G.num_ws, 1).requires_grad_(True)
    optimizer = torch.optim.Adam([ws], lr=lr, betas=(0.9, 0.999))
    low = max(G.img_resolution // 4, 8)
    for _ in range(steps):
        synthesized = G.synthesis(ws, noise_mode="const")
        loss = (synthesized - images).abs().mean() + F.mse_loss(_resize(synthesized, low), _resize(images, low))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return ws.detach()


# ---- stage 1: 2D style prior ------------------------------------------------------------------------------------


def _synthesis_resolution(parameter_name: str) -> int | None:
    match = re.match(r"synthesis\.b(\d+)\.", parameter_name)
    return int(match.group(1)) if match else None


class StylePriorTrainer(StyleGAN2Trainer):
    """Few-shot transfer learning of the base 2D generator: base weights, frozen mapping and low-resolution
    blocks, and after each adversarial step an inversion-consistency update (the exemplars' projected latents must
    synthesise the exemplars)."""

    def __init__(self, config: TrainConfig, data: TrainingImages, base: torch.nn.Module, latents: torch.Tensor,
                 frozen_resolution: int, consistency_weight: float, device: str | torch.device = "cpu"):
        super().__init__(config, data, device)
        for module in (self.G, self.G_ema):
            module.load_state_dict(base.state_dict())
        trainable = [p for name, p in self.G.named_parameters()
                     if (_synthesis_resolution(name) or 0) > frozen_resolution]
        self.opt_G = torch.optim.Adam(trainable, lr=config.lr_g, betas=(0.0, 0.99), eps=1e-8)
        self.latents = latents.to(self.device)
        self.consistency_weight = consistency_weight

    def step(self) -> dict:
        stats = super().step()
        if self.consistency_weight > 0:
            self.G.requires_grad_(True)
            self.opt_G.zero_grad(set_to_none=True)
            index = torch.randint(self.latents.shape[0], [self.config.batch],
                                  generator=self._batch_generator()).to(self.device)
            targets = _to_float(self.data.images[index])
            loss = (self.G.synthesis(self.latents[index], noise_mode="const") - targets).abs().mean()
            (loss * self.consistency_weight).backward()
            stats["nonfinite_grads_consistency"] = nan_to_num_grads(self.G)
            self.opt_G.step()
            self.G.requires_grad_(False)
            stats["consistency"] = loss.detach()
        return stats


# ---- run folder -------------------------------------------------------------------------------------------------


def _train_to(trainer, steps: int, train_loop, run: Path, deadline: Deadline, log_every: int) -> bool:
    """Resume `trainer` from the run folder and train it up to `steps` steps within the deadline with `train_loop`
    (`training.train_stylegan2.train` or the encoder trainer's); True once it has them all."""
    trainer.load(run)
    if trainer.step_count < steps:
        train_loop(trainer, run, deadline, max_steps=steps - trainer.step_count, log_every=log_every)
    return trainer.step_count >= steps


def _clear_checkpoint(run: Path) -> None:
    """Remove a finished stage's trainer checkpoint, so that the next stage's trainer starts fresh."""
    for path in [run / STATE_FILE, *run.glob("tensors-*.safetensors")]:
        path.unlink(missing_ok=True)


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    weights = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(weights, str(path))


def _load_weights(directory: str | Path, weights: Path, device) -> torch.nn.Module:
    """The generator of `directory` with the weights of `weights` (a stage result)."""
    generator = load_generator(directory, device)
    generator.load_state_dict(load_file(str(weights)))
    return generator


def read_augmented(run: Path) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """JPEG blobs, yaws and pitches (degrees) of the augmented set written so far."""
    path = run / AUGMENTED_FILE
    if not path.exists():
        return [], np.zeros(0, np.float32), np.zeros(0, np.float32)
    with np.load(path) as archive:
        data, offsets = archive["image_data"], archive["image_offsets"]
        blobs = [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
        return blobs, archive["yaw"], archive["pitch"]


def _write_augmented(run: Path, blobs: list[bytes], yaw: np.ndarray, pitch: np.ndarray) -> None:
    data, offsets = pack_bytes(blobs)
    temporary = run / (AUGMENTED_FILE + ".tmp")
    with open(temporary, "wb") as file:
        np.savez(file, image_data=data, image_offsets=offsets, yaw=yaw.astype(np.float32),
                 pitch=pitch.astype(np.float32))
    temporary.replace(run / AUGMENTED_FILE)


def _decode(blobs: list[bytes]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                        for b in blobs])


# ---- the stages -------------------------------------------------------------------------------------------------


def run_prior_stage(run: Path, agile: AgileConfig, exemplars: str | Path, aligned: bool, base2d: str | Path,
                    deadline: Deadline, device, log_every: int, names: list[str] | None = None) -> bool:
    """Stage 1 (2D style prior) on the exemplars `names` of the folder (all by default); True when finished
    (`stylizer2d.safetensors` written)."""
    base = load_generator(base2d, device)
    config = stylegan2_train_config(_read_config(base2d), agile)
    images, _ = load_exemplars(exemplars, config.resolution, aligned, names)
    latents_path = run / LATENTS_FILE
    if latents_path.exists():
        latents = load_file(str(latents_path))["latents"]
    else:
        latents = project_to_w(base, _to_float(images).to(device), agile.projection_steps, agile.projection_lr)
        save_file({"latents": latents.cpu()}, str(latents_path))
    trainer = StylePriorTrainer(config, TrainingImages(images), base, latents, agile.frozen_resolution,
                                agile.consistency_weight, device)
    if not _train_to(trainer, agile.prior_steps, train, run, deadline, log_every):
        return False
    _save_weights(trainer.G_ema, run / STYLIZER_FILE)
    _clear_checkpoint(run)
    latents_path.unlink()
    return True


def camera_batch(agile: AgileConfig, start: int, count: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """(RNG for the z codes, yaws, pitches in degrees) of augmented samples `start` .. `start + count - 1`; they
    depend only on (seed, start), so a resumed stage draws what an unbroken one would."""
    generator = torch.Generator().manual_seed(agile.seed * 1_000_003 + start)
    yaw = (torch.rand([count], generator=generator) * 2 - 1) * agile.yaw_range
    limit = 2.5 * agile.pitch_std
    pitch = (torch.randn([count], generator=generator) * agile.pitch_std).clamp(-limit, limit)
    return generator, yaw, pitch


def run_augment_stage(run: Path, agile: AgileConfig, base2d: str | Path, base3d: str | Path, deadline: Deadline,
                      device) -> bool:
    """Stage 2 (augmented set); True when `augment_count` stylized, camera-labelled renders are stored (the 2D
    stylizer is then removed: no later stage reads it)."""
    head = load_generator(base3d, device)
    base = load_generator(base2d, device)
    stylizer = _load_weights(base2d, run / STYLIZER_FILE, device)
    blobs, yaws, pitches = read_augmented(run)
    while len(blobs) < agile.augment_count and not deadline.expired():
        count = min(agile.augment_batch, agile.augment_count - len(blobs))
        generator, yaw, pitch = camera_batch(agile, len(blobs), count)
        z = torch.randn([count, head.z_dim], generator=generator).to(device)
        cameras = torch.cat([camera_label(float(y), float(p)) for y, p in zip(yaw, pitch)]).to(device)
        with torch.no_grad():
            ws = head.mapping(z, camera_label(0, 0).to(device).expand(count, -1), truncation_psi=agile.truncation_psi)
            renders = head.synthesis(ws, cameras, noise_mode="const", deterministic=True)["image"].clamp(-1, 1)
        codes = project_to_w(base, renders, agile.projection_steps, agile.projection_lr)
        with torch.no_grad():
            stylized = _to_uint8(stylizer.synthesis(codes, noise_mode="const")).cpu()
        for image in stylized:
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=agile.jpeg_quality)
            blobs.append(buffer.getvalue())
        yaws, pitches = np.concatenate([yaws, yaw.numpy()]), np.concatenate([pitches, pitch.numpy()])
        _write_augmented(run, blobs, yaws, pitches)
        print(json.dumps({"stage": "augment", "samples": len(blobs), "elapsed_s": round(deadline.elapsed_s, 1)}),
              flush=True)
    if len(blobs) < agile.augment_count:
        return False
    (run / STYLIZER_FILE).unlink()
    return True


def augmented_training_data(run: Path, resolution: int) -> HeadTrainingData:
    """The augmented set as 3D training data: images, camera labels and those of the mirrored images (no
    geometric prior: its entries are NaN and the transfer recipe switches the prior off)."""
    blobs, yaw, pitch = read_augmented(run)
    images = _decode(blobs)
    if images.shape[-1] != resolution:
        images = _to_uint8(_resize(_to_float(images), resolution))
    cameras = torch.cat([camera_label(float(y), float(p)) for y, p in zip(yaw, pitch)])
    mirrored = torch.cat([camera_label(-float(y), float(p)) for y, p in zip(yaw, pitch)])
    return HeadTrainingData(images, cameras, mirrored, torch.full([len(blobs), 1, 1], float("nan")))


class GuidedTransferTrainer(Head3DTrainer):
    """The 3D trainer started from the base 3D generator's weights (G and G_ema; D starts fresh)."""

    def __init__(self, config: Head3DConfig, data: HeadTrainingData, base: torch.nn.Module,
                 device: str | torch.device = "cpu"):
        super().__init__(config, data, device)
        for module in (self.G, self.G_ema):
            module.load_state_dict(base.state_dict())


def run_transfer_stage(run: Path, agile: AgileConfig, base3d: str | Path, deadline: Deadline, device,
                       log_every: int) -> bool:
    """Stage 3 (guided transfer learning of the 3D generator); True when `head3d_styled.safetensors` is written."""
    base = load_generator(base3d, device)
    config = head3d_train_config(_read_config(base3d), agile)
    trainer = GuidedTransferTrainer(config, augmented_training_data(run, config.resolution), base, device)
    if not _train_to(trainer, agile.transfer_steps, train, run, deadline, log_every):
        return False
    _save_weights(trainer.G_ema, run / STYLED3D_FILE)
    _clear_checkpoint(run)
    (run / AUGMENTED_FILE).unlink()
    return True


# ---- stage 4: the 3D inversion encoder of the stylized generator ----------------------------------------------------


def write_photos(archive: str | Path, path: str | Path, train_count: int, test_count: int, seed: int) -> Path:
    """Copy seeded picks of `train_count` train and `test_count` test crops of a face archive (encoded bytes as
    stored) with their camera labels into one `.npz`: the real photos of stage 4 and the held-out evaluation
    photos."""
    arrays, metadata = read_archive(archive)
    if "camera" not in arrays:
        raise ValueError(f"{archive} has no camera labels")
    rng = np.random.default_rng(seed)
    data, offsets = arrays["image_data"], arrays["image_offsets"]
    photos = {}
    for split, count in (("train", train_count), ("test", test_count)):
        if split not in metadata["splits"]:
            raise ValueError(f"{archive} has no {split!r} split")
        usable = (arrays["split"] == metadata["splits"].index(split)) & np.isfinite(arrays["camera"]).all(axis=1)
        chosen = np.sort(rng.permutation(np.flatnonzero(usable))[:count])
        photos[f"{split}_image_data"], photos[f"{split}_image_offsets"] = pack_bytes(
            [data[offsets[i]:offsets[i + 1]].tobytes() for i in chosen])
        photos[f"{split}_camera"] = arrays["camera"][chosen].astype(np.float32)
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        np.savez(file, **photos)
    temporary.replace(path)
    return path


def read_photos(path: str | Path, split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 crops [N, 3, resolution, resolution] of a `write_photos` split, their camera labels and those of the
    mirrored crops."""
    with np.load(path) as photos:
        data, offsets = photos[f"{split}_image_data"], photos[f"{split}_image_offsets"]
        images = _decode([data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)])
        cameras = photos[f"{split}_camera"]
    if images.shape[-1] != resolution:
        images = _to_uint8(_resize(_to_float(images), resolution))
    return images, torch.from_numpy(cameras), torch.from_numpy(flip_camera(cameras).astype(np.float32))


def base_encoder_reference(directory: str | Path | None, name: str) -> dict | None:
    """Where stage 4 starts: the encoder export `directory`, else the registry's `name` when its files are here,
    else None (a fresh encoder)."""
    from core.weights import default_registry

    if directory:
        return {"name": name, "dir": str(directory)}
    registry = default_registry()
    if name in registry.names and registry.locate(name)[0] in ("bundled", "cache"):
        return {"name": name, "dir": None}
    return None


def load_base_encoder(reference: dict | None) -> Head3DEncoder | None:
    """The base 3D encoder of a `base_encoder_reference` (float32, CPU), or None."""
    if reference is None:
        return None
    if reference["dir"]:
        folder = Path(reference["dir"])
        config, state = json.loads((folder / CONFIG_FILE).read_text()), load_file(str(folder / WEIGHTS_FILE))
    else:
        from core.weights import default_registry

        registry = default_registry()
        config, state = registry.load_config(reference["name"]), registry.load_state_dict(reference["name"])
    return build_head3d_encoder(config, state)


def encoder_architecture(encoder: Head3DEncoder) -> dict:
    """The `head3d_encoder_config` overrides that rebuild an encoder for its generator (no training record)."""
    return {key: value for key, value in encoder.config.items()
            if key not in ("training", "num_ws", "w_dim", "input_size")}


def encoder_train_config(agile: AgileConfig, base_encoder: Head3DEncoder | None) -> Head3DEncoderConfig:
    """The recipe of stage 4 in the 3D encoder trainer's terms (the base encoder's architecture, if any)."""
    return Head3DEncoderConfig(batch=agile.encoder_batch, lr=agile.encoder_lr, pixel_weight=agile.encoder_pixel_weight,
                               identity_weight=agile.encoder_identity_weight,
                               multiview_weight=agile.encoder_multiview_weight,
                               latent_weight=agile.encoder_latent_weight, delta_weight=agile.encoder_delta_weight,
                               synthetic_fraction=agile.encoder_synthetic_fraction,
                               truncation_psi=agile.truncation_psi, seed=agile.seed,
                               encoder_overrides=encoder_architecture(base_encoder) if base_encoder else {})


class StyleEncoderTrainer(Head3DEncoderTrainer):
    """The 3D encoder trainer (`training.train_head3d_encoder`) turned to a stylized generator. Inputs stay in the
    photo domain: real crops and the base generator's renders of known latents, each with its camera. What their
    latents must do is judged on the frozen stylized generator: its render at the input camera keeps the input's
    identity (`identity_weight`); its renders from other random cameras keep the identity of that render
    (`multiview_weight`, the render at the input camera is the fixed reference); for the synthetic samples, L2 to the
    true W+ (`latent_weight`) and pixel L2 to the stylized render of the true W+ (`pixel_weight`); e4e's delta
    regulariser. Starts from `base_encoder` (or fresh); only the modules named in `trainable` are tuned."""

    def __init__(self, config: Head3DEncoderConfig, base: torch.nn.Module, stylized: torch.nn.Module,
                 identity: torch.nn.Module, base_encoder: Head3DEncoder | None, trainable: str,
                 images: torch.Tensor, cameras: torch.Tensor, mirrored_cameras: torch.Tensor,
                 device: str | torch.device = "cpu"):
        super().__init__(config, base, identity, images, cameras, mirrored_cameras, device)
        self.stylized = stylized.to(self.device).eval().requires_grad_(False)
        if base_encoder is not None:
            self.encoder.load_state_dict(base_encoder.state_dict())
        prefixes = tuple(prefix.strip() + "." for prefix in trainable.split(","))
        tuned = []
        for name, parameter in self.encoder.named_parameters():
            parameter.requires_grad_(name.startswith(prefixes))
            if parameter.requires_grad:
                tuned.append(parameter)
        if not tuned:
            raise ValueError(f"no encoder parameters match {trainable!r}")
        self.optimizer = torch.optim.Adam(tuned, lr=config.lr, betas=(0.9, 0.999))

    def step(self) -> dict[str, float]:
        """One Adam step; returns the loss terms."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_count)
        inputs, cameras, ws_true = self._batch(generator)
        ws, deltas = self.encode(inputs, cameras)
        stylized = render(self.stylized, ws, cameras)
        novel = render(self.stylized, ws, self._cameras(len(inputs), generator))
        synthetic = len(ws_true)
        with torch.no_grad():
            input_embedding = self.identity.embed_aligned(inputs)
            stylized_truth = render(self.stylized, ws_true, cameras[len(inputs) - synthetic:])
        stylized_embedding = self.identity.embed_aligned(stylized)
        identity = identity_distance(stylized_embedding, input_embedding)
        multiview = identity_distance(self.identity.embed_aligned(novel), stylized_embedding.detach())
        pixel = F.mse_loss(stylized[len(inputs) - synthetic:], stylized_truth) if synthetic else ws.new_zeros(())
        latent = latent_loss(ws, ws_true)
        delta = delta_penalty(deltas)
        loss = cfg.pixel_weight * pixel + cfg.identity_weight * identity + cfg.multiview_weight * multiview \
            + cfg.latent_weight * latent + cfg.delta_weight * delta
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return {"loss": loss.item(), "pixel": pixel.item(), "identity": identity.item(),
                "multiview": multiview.item(), "latent": latent.item(), "delta": delta.item()}


def run_encoder_stage(run: Path, agile: AgileConfig, marker: dict, deadline: Deadline, device,
                      log_every: int) -> bool:
    """Stage 4 (3D inversion encoder of the stylized generator); True when `head3d_encoder_styled.safetensors` is
    written."""
    from core.beauty import load_identity_encoder

    base = load_generator(marker["base3d"], device)
    stylized = _load_weights(marker["base3d"], run / STYLED3D_FILE, device)
    base_encoder = load_base_encoder(marker["base_encoder"])
    if base_encoder is None:
        print("no base 3D encoder (give --base-encoder DIR when starting a run, or register "
              f"{BASE_ENCODER_NAME}): stage 4 starts from a fresh Head3DEncoder, and the export ships no encoder",
              flush=True)
    elif (base_encoder.num_ws, base_encoder.w_dim, base_encoder.input_size) != (
            base.backbone.num_ws, base.w_dim, base.img_resolution):
        raise ValueError(f"the base encoder {marker['base_encoder']['name']} does not fit the base 3D generator")
    images, cameras, mirrored = read_photos(marker["photos"], "train", base.img_resolution)
    config = encoder_train_config(agile, base_encoder)
    trainer = StyleEncoderTrainer(config, base, stylized, load_identity_encoder(config.identity), base_encoder,
                                  agile.encoder_trainable, images, cameras, mirrored, device)
    if not _train_to(trainer, agile.encoder_steps, train_encoder, run, deadline, log_every):
        return False
    _save_weights(trainer.encoder, run / STYLED_ENCODER_FILE)
    _clear_checkpoint(run)
    return True


# ---- export -----------------------------------------------------------------------------------------------------


def exemplar_source(exemplars: str | Path | None, origin: str | None, licence: str | None) -> dict[str, str]:
    """Origin and licence of the exemplars: the options, else the exemplar folder's SOURCE.md, else 'unspecified'."""
    source_file = Path(exemplars) / SOURCE_FILE if exemplars else None
    note = source_file.read_text().strip() if source_file and source_file.exists() else None
    return {"origin": origin or note or "unspecified", "licence": licence or ("see origin" if note else "unspecified")}


def export_style(run: Path, marker: dict, directory: str | Path, device: str | torch.device = "cpu") -> Path:
    """Write the style as a delta over the base 3D generator (the marker's `base3d`, registry name `base3d_name`;
    float16 safetensors + config.json) with, once stage 4
    is done, the stylized encoder as its `encoder` part (a delta over the base encoder); evaluate the exported files
    on the held-out photos and write the model card (last, so a card means a complete export)."""
    agile = AgileConfig(**marker["config"])
    base = load_generator(marker["base3d"])
    delta = make_style_delta(base, _load_weights(marker["base3d"], run / STYLED3D_FILE, "cpu"), marker["base3d_name"],
                             rank=agile.delta_rank)
    base_encoder = load_base_encoder(marker["base_encoder"])
    parts = {}
    if "encoder" in marker["completed"] and base_encoder is not None:
        tuned = copy.deepcopy(base_encoder)
        tuned.load_state_dict(load_file(str(run / STYLED_ENCODER_FILE)))
        parts[ENCODER_PART] = make_style_delta(base_encoder, tuned, marker["base_encoder"]["name"],
                                               rank=agile.encoder_delta_rank)
    training = {"method": "agilegan3d", "recipe": dataclasses.asdict(agile), "stages": marker["completed"],
                "exemplars": marker["exemplars"], "exemplar_source": marker["exemplar_source"],
                "base_encoder": marker["base_encoder"]}
    directory = save_style_delta(delta, directory, extra_config={"method": "agilegan3d", "style": marker["name"],
                                                                  "training": training}, parts=parts)
    evaluation = evaluate_export(directory, marker, base, base_encoder, device)
    if evaluation is not None:
        config = json.loads((directory / CONFIG_FILE).read_text())
        (directory / CONFIG_FILE).write_text(json.dumps({**config, "evaluation": evaluation}, indent=1))
    write_model_card(directory, marker)
    return directory


def load_exported_style(directory: str | Path, base: torch.nn.Module, base_encoder: Head3DEncoder | None
                        ) -> tuple[torch.nn.Module, Head3DEncoder | None]:
    """(stylized generator, the style's encoder, else the base encoder) of an exported style folder."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    stylized = apply_style_delta(base, build_style_delta(config, load_file(str(directory / WEIGHTS_FILE))))
    part = config.get("parts", {}).get(ENCODER_PART)
    if part is None or base_encoder is None:
        return stylized, base_encoder
    return stylized, apply_style_delta(base_encoder, build_style_delta(part, load_file(str(directory / part["file"]))))


def evaluate_export(directory: Path, marker: dict, base: torch.nn.Module, base_encoder: Head3DEncoder | None,
                    device: str | torch.device = "cpu") -> dict | None:
    """`training.eval_agilegan3d` metrics of an exported style (through its own encoder, else the base encoder)
    and of the base generator with the base encoder, on the run's held-out photos; None without any encoder."""
    from core.beauty import load_identity_encoder

    stylized, encoder = load_exported_style(directory, base, base_encoder)
    if encoder is None:
        return None
    images, cameras, _ = read_photos(marker["photos"], "test", base.img_resolution)
    identity = load_identity_encoder(Head3DEncoderConfig.identity).to(device)
    base, stylized, encoder = (module.to(device).eval() for module in (base, stylized, encoder))
    evaluation = {"encoder": "style" if encoder is not base_encoder else "base",
                  "style": evaluate_portraits(stylized, encoder, identity, images, cameras, reference=base)}
    if base_encoder is not None:
        evaluation["base"] = evaluate_portraits(base, base_encoder.to(device).eval(), identity, images, cameras)
    return evaluation


def write_model_card(directory: Path, marker: dict, study: str | None = None) -> None:
    """The model card of an exported style (recipe, sizes, evaluation from its config.json; the study table)."""
    config = json.loads((directory / CONFIG_FILE).read_text())
    agile = AgileConfig(**marker["config"])
    source = marker["exemplar_source"]
    changed = len(build_style_delta(config, load_file(str(directory / WEIGHTS_FILE))).changes())
    size_kib = (directory / WEIGHTS_FILE).stat().st_size / 1024
    part = config.get("parts", {}).get(ENCODER_PART)
    reference = marker["base_encoder"]
    if "encoder" not in marker["completed"]:
        encoder_stage = "not trained yet: the demo inverts photos with the base encoder."
    else:
        start = f"the base encoder `{reference['name']}`" if reference else "a fresh Head3DEncoder (no base encoder)"
        encoder_stage = (
            f"{start} fine-tuned {agile.encoder_steps} steps against the frozen stylized generator (batch"
            f" {agile.encoder_batch}, Adam lr {agile.encoder_lr}, modules `{agile.encoder_trainable}`;"
            f" {agile.encoder_photos} real train crops with their cameras and synthetic heads, fraction"
            f" {agile.encoder_synthetic_fraction}). Losses: identity of the stylized render at the input camera to the"
            f" input {agile.encoder_identity_weight}, multi-view identity of stylized renders from other cameras to it"
            f" {agile.encoder_multiview_weight}, latent L2 {agile.encoder_latent_weight} and stylized pixel L2"
            f" {agile.encoder_pixel_weight} on synthetic heads, delta {agile.encoder_delta_weight}. ")
        if part is not None:
            encoder_changed = len(build_style_delta(part, load_file(str(directory / part["file"]))).changes())
            encoder_kib = (directory / part["file"]).stat().st_size / 1024
            encoder_stage += (f"Shipped as the style's `encoder` part: a rank-{agile.encoder_delta_rank} delta over"
                              f" `{part['base']}` ({encoder_changed} changed tensors, {encoder_kib:.0f} KiB float16);"
                              " the demo inverts photos with it.")
        else:
            encoder_stage += ("Trained from a fresh Head3DEncoder, so it is not shipped: the demo inverts photos with"
                              " the base encoder.")
    lines = [
        f"# AgileGAN3D style `{marker['name']}`",
        "",
        f"A style delta over `{config['base']}` (`core.nets.style_delta`, rank {agile.delta_rank}, {changed} changed"
        f" tensors, {size_kib:.0f} KiB float16), trained by `training/agilegan3d.py` (AgileGAN3D, arXiv"
        " 2303.14297, re-implemented at small scale: no official code or weights exist).",
        "",
        f"* **Exemplars:** {len(marker['exemplars'])} images; {'given as aligned crops' if marker['aligned'] else 'aligned with core.face.prepare_face'}.",
        f"* **Exemplar origin:** {source['origin']}",
        f"* **Exemplar licence:** {source['licence']}",
        f"* **Stage 1 (2D style prior):** base 2D StyleGAN2 fine-tuned {agile.prior_steps} steps (batch"
        f" {agile.prior_batch}, lr {agile.prior_lr}, mapping and blocks <= {agile.frozen_resolution} px frozen,"
        f" augmentation `{agile.prior_augment}` from p {agile.prior_augment_p} under ADA), inversion consistency"
        f" weight {agile.consistency_weight} on W+ projections ({agile.projection_steps} Adam steps).",
        f"* **Stage 2 (augmented set):** {agile.augment_count} base 3D renders (yaw uniform +-{agile.yaw_range} deg,"
        f" pitch N(0, {agile.pitch_std} deg), truncation {agile.truncation_psi}) projected into the 2D base and"
        " re-synthesised by the stylized 2D generator, camera labels kept.",
        f"* **Stage 3 (guided transfer learning):** base 3D generator fine-tuned {agile.transfer_steps} steps (batch"
        f" {agile.transfer_batch}, lr G/D {agile.transfer_lr_g}/{agile.transfer_lr_d}) with the camera-conditioned"
        " dual discriminator of `training/train_head3d.py`, geometric prior off.",
        f"* **Stage 4 (3D inversion encoder):** {encoder_stage}",
        f"* **Stages completed:** {', '.join(marker['completed'])}; seed {agile.seed}.",
        "",
        "## Evaluation",
        "",
    ]
    evaluation = config.get("evaluation")
    if evaluation is None:
        lines.append("Not measured: no 3D encoder (base or style) to invert the held-out photos with.")
    else:
        rows = [("base generator, base encoder", "-", evaluation["base"])] if "base" in evaluation else []
        rows.append((f"`{marker['name']}`, {evaluation['encoder']} encoder", str(len(marker["exemplars"])),
                     evaluation["style"]))
        lines += [f"{evaluation['style']['photos']} held-out test-split photos with their archive cameras"
                  " (`training/eval_agilegan3d.py`: identity cosines; style strength = mean absolute pixel change"
                  " against the base generator's renders of the same latents, 0-1 scale).", "", results_table(rows)]
    if study is not None:
        lines += ["", "## Exemplar-count study", "",
                  "Styles trained by the same recipe on nested seeded random subsets of the exemplar folder,"
                  " evaluated on the same held-out photos:", "", study]
    (directory / CARD_FILE).write_text("\n".join(lines) + "\n")


# ---- CLI --------------------------------------------------------------------------------------------------------


def _read_marker(run: Path) -> dict | None:
    path = run / MARKER_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_marker(run: Path, marker: dict) -> None:
    temporary = run / (MARKER_FILE + ".tmp")
    temporary.write_text(json.dumps(marker, indent=1))
    temporary.replace(run / MARKER_FILE)


def start_run(run: Path, args: argparse.Namespace, names: list[str], photos: Path) -> dict:
    """Create the run folder and its marker: recipe, exemplars `names`, bases, where stage 4 starts, the photos."""
    run.mkdir(parents=True, exist_ok=True)
    reference = base_encoder_reference(args.base_encoder, args.base_encoder_name)
    if reference is None:
        print(f"no base 3D encoder ({args.base_encoder_name} is not here and no --base-encoder): stage 4 will start"
              " from a fresh Head3DEncoder", flush=True)
    marker = {"name": args.name, "config": dataclasses.asdict(RECIPES[args.recipe]), "completed": [],
              "exemplars_dir": str(args.exemplars), "exemplars": names, "aligned": args.aligned,
              "exemplar_source": exemplar_source(args.exemplars, args.exemplar_origin, args.exemplar_licence),
              "base2d": str(args.base2d), "base3d": str(args.base3d), "base3d_name": args.base3d_name,
              "base_encoder": reference,
              "photos": str(photos), "data": str(args.data)}
    _write_marker(run, marker)
    return marker


def run_stage(stage: str, run: Path, marker: dict, deadline: Deadline, device, log_every: int) -> bool:
    """Run (or continue) one stage until it finishes or the deadline passes; True when finished."""
    agile = AgileConfig(**marker["config"])
    if stage == "prior":
        return run_prior_stage(run, agile, marker["exemplars_dir"], marker["aligned"], marker["base2d"], deadline,
                               device, log_every, names=marker["exemplars"])
    if stage == "augment":
        return run_augment_stage(run, agile, marker["base2d"], marker["base3d"], deadline, device)
    if stage == "transfer":
        return run_transfer_stage(run, agile, marker["base3d"], deadline, device, log_every)
    return run_encoder_stage(run, agile, marker, deadline, device, log_every)


def run_stages(run: Path, marker: dict, stages: tuple[str, ...], deadline: Deadline, device, log_every: int) -> bool:
    """Continue `stages` in order (each needs the ones before it) until all are done or the deadline passes; True
    when all are done."""
    for stage in stages:
        if stage in marker["completed"]:
            continue
        if deadline.expired():
            return False
        finished = run_stage(stage, run, marker, deadline, device, log_every)
        print(f"{run.name}: stage {stage} {'done' if finished else 'continues in the next call'}", flush=True)
        if not finished:
            return False
        marker["completed"].append(stage)
        _write_marker(run, marker)
    return True


def run_study(args: argparse.Namespace, parser: argparse.ArgumentParser, deadline: Deadline, device) -> int:
    """The exemplar-count study: one run per count in the study folder `args.run` (see the module docstring)."""
    root = Path(args.run)
    study_path = root / STUDY_FILE
    if study_path.exists():
        study = json.loads(study_path.read_text())
        print(f"resuming the study {root} (style {study['name']!r}, counts {study['counts']})", flush=True)
        for count in study["counts"]:
            done = "exported" if (root / f"n{count}_style" / CARD_FILE).exists() else "not exported"
            completed = _read_marker(root / f"n{count}")["completed"]
            print(f"  n{count}: completed {', '.join(completed) or 'none'}; {done}", flush=True)
    else:
        _require_start_options(args, parser)
        counts = sorted({int(count) for count in args.exemplar_counts.split(",")})
        names = exemplar_names(args.exemplars)
        if counts[0] < 2 or counts[-1] > len(names):
            parser.error(f"exemplar counts must lie in 2..{len(names)} (the folder's images)")
        agile = RECIPES[args.recipe]
        order = np.random.default_rng(agile.seed).permutation(len(names))
        root.mkdir(parents=True, exist_ok=True)
        write_photos(args.data, root / PHOTOS_FILE, agile.encoder_photos, agile.eval_photos, agile.seed)
        for count in counts:  # nested subsets: each is a prefix of one seeded permutation
            start_run(root / f"n{count}", args, sorted(names[i] for i in order[:count]), root / PHOTOS_FILE)
        study = {"name": args.name, "counts": counts}
        study_path.write_text(json.dumps(study, indent=1))
    counts = study["counts"]
    stages = STAGES[:STAGES.index(args.stop_after) + 1]
    for count in counts:
        run, style = root / f"n{count}", root / f"n{count}_style"
        marker = _read_marker(run)
        if not (style / CARD_FILE).exists():
            if args.minutes > 0:
                run_stages(run, marker, stages, deadline, device, args.log_every)
            if "encoder" not in marker["completed"]:  # deadline, or --stop-after an earlier stage
                break
            export_style(run, marker, style, device)
        if count != counts[-1]:  # the study keeps only the exported deltas of the smaller counts
            for name in (STYLED3D_FILE, STYLED_ENCODER_FILE):
                (run / name).unlink(missing_ok=True)
    finished = [count for count in counts if (root / f"n{count}_style" / CARD_FILE).exists()]
    print(f"study: {len(finished)} of {len(counts)} exemplar counts exported and evaluated", flush=True)
    if len(finished) < len(counts):
        if args.export:
            print("--export waits until every count is done", flush=True)
        return 0
    table = study_table(root, counts)
    (root / STUDY_TABLE_FILE).write_text(table + "\n")
    print(table, flush=True)
    if args.export:
        export = Path(args.export)
        shutil.copytree(root / f"n{counts[-1]}_style", export, dirs_exist_ok=True)
        write_model_card(export, _read_marker(root / f"n{counts[-1]}"), study=table)
        print(f"exported style {study['name']!r} ({counts[-1]} exemplars) with the study to {export}", flush=True)
    return 0


def study_table(root: Path, counts: list[int]) -> str:
    """The results table of a finished study: the base reference row, then one row per exemplar count."""
    rows = []
    for count in counts:
        config = json.loads((root / f"n{count}_style" / CONFIG_FILE).read_text())
        evaluation = config.get("evaluation")
        if evaluation is None:
            return "Not measured: no 3D encoder (base or style) to invert the held-out photos with."
        if not rows and "base" in evaluation:
            rows.append(("base generator, base encoder", "-", evaluation["base"]))
        rows.append((f"`{config['style']}`, {evaluation['encoder']} encoder", str(count), evaluation["style"]))
    return results_table(rows)


def _require_start_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not (args.exemplars and args.name):
        parser.error("--exemplars and --name are required to start a run")
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data} not found: a run starts by copying photos with cameras out of it")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exemplars", help="folder of ~20 style exemplar images (needed to start a run)")
    parser.add_argument("--name", help="style name (needed to start a run)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="face archive with camera labels: real photos of stage 4"
                        " and held-out photos of the evaluation are copied from it when a run starts")
    parser.add_argument("--base2d", default="weights/stylegan2_faces128", help="bundled 2D StyleGAN2 folder")
    parser.add_argument("--base3d", default="weights/head3d_faces128", help="bundled 3D generator folder")
    parser.add_argument("--base3d-name", default=BASE3D_NAME,
                        help="registry name of --base3d (recorded when a run starts; the exported delta names it)")
    parser.add_argument("--base-encoder", help="base 3D encoder export that stage 4 starts from (default: the"
                                               f" registry's {BASE_ENCODER_NAME} when here, else a fresh encoder)")
    parser.add_argument("--base-encoder-name", default=BASE_ENCODER_NAME,
                        help="registry name of the base encoder (stored in the encoder delta)")
    parser.add_argument("--run", required=True, help="flat run folder (study folder with --exemplar-counts);"
                                                     " resumed if present (its stored recipe wins)")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this call")
    parser.add_argument("--reserve-s", type=float, default=45.0, help="stop this long before the budget")
    parser.add_argument("--stage", default="all", choices=("all", *STAGES))
    parser.add_argument("--stop-after", default=STAGES[-1], choices=STAGES,
                        help="end this call once this stage is done (e.g. transfer: stage 4 needs the identity"
                             " network carried)")
    parser.add_argument("--export", help="write the style (deltas, evaluation, model card) here once the 3D stage"
                                         " is done; with --exemplar-counts once the study is done")
    parser.add_argument("--exemplar-counts", help="start the exemplar-count study instead, e.g. 5,10,20 (a study"
                                                  " folder is resumed without it)")
    parser.add_argument("--recipe", default="gpu", choices=sorted(RECIPES),
                        help="recipe of a new run: gpu (the default), cpu-preview (over the 32/64-px previews, about"
                             " 1.5 h on one CPU core) or tiny (1-2 steps per stage, for tests)")
    parser.add_argument("--aligned", action="store_true", help="exemplars are aligned face crops already")
    parser.add_argument("--exemplar-origin", help="where the exemplars come from (model card)")
    parser.add_argument("--exemplar-licence", help="the exemplars' licence (model card)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    if args.exemplar_counts or (Path(args.run) / STUDY_FILE).exists():
        return run_study(args, parser, deadline, device)
    run = Path(args.run)
    marker = _read_marker(run)
    if marker is None:
        _require_start_options(args, parser)
        marker = start_run(run, args, exemplar_names(args.exemplars), run / PHOTOS_FILE)
        agile = AgileConfig(**marker["config"])
        write_photos(args.data, run / PHOTOS_FILE, agile.encoder_photos, agile.eval_photos, agile.seed)
    else:
        print(f"resuming {run} (style {marker['name']!r}; completed: {marker['completed'] or 'none'})", flush=True)

    stages = STAGES[:STAGES.index(args.stop_after) + 1] if args.stage == "all" else (args.stage,)
    missing = [s for s in STAGES[:STAGES.index(stages[0])] if s not in marker["completed"]]
    if missing:
        parser.error(f"stage {stages[0]!r} needs the earlier stages {missing}")
    if args.minutes > 0:
        run_stages(run, marker, stages, deadline, device, args.log_every)
    if args.export:
        if "transfer" not in marker["completed"]:
            parser.error("--export needs the finished 'transfer' stage")
        path = export_style(run, marker, args.export, device)
        print(f"exported style {marker['name']!r} to {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
