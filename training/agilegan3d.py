"""AgileGAN3D (arXiv 2303.14297): few-shot 3D portrait stylization by augmented transfer learning, as one CLI.

    python -m training.agilegan3d --exemplars DIR --name STYLE --base2d weights/stylegan2_faces128 \
        --base3d weights/head3d_faces128 --run runs/agile_STYLE --minutes 9 [--export weights/agile_STYLE]

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
4. `encoder`: the multi-view-consistent 3D inversion encoder. TODO: it needs `Head3DEncoder` (being added to
   `core.nets.encoders`); until then this stage reports that it is missing and the style ships without it.

`--export DIR` writes the style as a compact delta over the base 3D generator (`core.nets.style_delta`) plus a
model card naming the exemplars' origin and licence (`--exemplar-origin/--exemplar-licence`, else the exemplar
folder's SOURCE.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from core.nets import CONFIG_FILE, load_generator
from core.nets.camera import camera_label
from core.nets.style_delta import make_style_delta, save_style_delta
from training.data.archive import pack_bytes
from training.resumable import STATE_FILE, Deadline
from training.train_head3d import Head3DConfig, Head3DTrainer, HeadTrainingData
from training.train_stylegan2 import StyleGAN2Trainer, TrainConfig, TrainingImages, _nan_to_num_grads
from training.train_stylegan2 import train

STAGES = ("prior", "augment", "transfer")
ENCODER_STAGE = "encoder"
MARKER_FILE = "agilegan3d.json"
LATENTS_FILE = "exemplar_latents.safetensors"
STYLIZER_FILE = "stylizer2d.safetensors"
AUGMENTED_FILE = "augmented.npz"
STYLED3D_FILE = "head3d_styled.safetensors"
CARD_FILE = "README.md"
SOURCE_FILE = "SOURCE.md"
BASE3D_NAME = "head3d-faces128"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
    # export
    delta_rank: int = 4  # ~340 KiB float16 for the 128-px head generator even when every tensor changes


TINY = AgileConfig(prior_steps=2, prior_batch=2, projection_steps=2, augment_count=4, augment_batch=2,
                   transfer_steps=2, transfer_batch=2, mbstd_group=2)


# ---- inputs -----------------------------------------------------------------------------------------------------


def load_exemplars(directory: str | Path, size: int, aligned: bool) -> tuple[torch.Tensor, list[str]]:
    """uint8 [N, 3, size, size] exemplars of a folder and their file names. Without `aligned` each image goes through
    `core.face.prepare_face` (images without a face are skipped with a note); with it, images are only resized."""
    from core.face import FaceInputError, prepare_face

    paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
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
            _nan_to_num_grads(self.G)
            self.opt_G.step()
            self.G.requires_grad_(False)
            stats["consistency"] = loss.detach()
        return stats


# ---- run folder -------------------------------------------------------------------------------------------------


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
                    deadline: Deadline, device, log_every: int) -> bool:
    """Stage 1 (2D style prior); True when finished (`stylizer2d.safetensors` written)."""
    base = load_generator(base2d, device)
    config = stylegan2_train_config(_read_config(base2d), agile)
    images, _ = load_exemplars(exemplars, config.resolution, aligned)
    latents_path = run / LATENTS_FILE
    if latents_path.exists():
        latents = load_file(str(latents_path))["latents"]
    else:
        latents = project_to_w(base, _to_float(images).to(device), agile.projection_steps, agile.projection_lr)
        save_file({"latents": latents.cpu()}, str(latents_path))
    trainer = StylePriorTrainer(config, TrainingImages(images), base, latents, agile.frozen_resolution,
                                agile.consistency_weight, device)
    trainer.load(run)
    if trainer.step_count < agile.prior_steps:
        train(trainer, run, deadline, max_steps=agile.prior_steps - trainer.step_count,
                        log_every=log_every)
    if trainer.step_count < agile.prior_steps:
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
    """Stage 2 (augmented set); True when `augment_count` stylized, camera-labelled renders are stored."""
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
    return len(blobs) >= agile.augment_count


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
    trainer.load(run)
    if trainer.step_count < agile.transfer_steps:
        train(trainer, run, deadline, max_steps=agile.transfer_steps - trainer.step_count,
                     log_every=log_every)
    if trainer.step_count < agile.transfer_steps:
        return False
    _save_weights(trainer.G_ema, run / STYLED3D_FILE)
    _clear_checkpoint(run)
    return True


ENCODER_TODO = ("stage 'encoder' (multi-view-consistent 3D inversion encoder) is not implemented yet: it needs "
                "core.nets.encoders.Head3DEncoder and its trainer; the style is usable without it (inversion with "
                "the base 3D encoder or optimisation)")


# ---- export -----------------------------------------------------------------------------------------------------


def exemplar_source(exemplars: str | Path | None, origin: str | None, licence: str | None) -> dict[str, str]:
    """Origin and licence of the exemplars: the options, else the exemplar folder's SOURCE.md, else 'unspecified'."""
    source_file = Path(exemplars) / SOURCE_FILE if exemplars else None
    note = source_file.read_text().strip() if source_file and source_file.exists() else None
    return {"origin": origin or note or "unspecified", "licence": licence or ("see origin" if note else "unspecified")}


def export_style(run: Path, marker: dict, base3d: str | Path, directory: str | Path, base_name: str) -> Path:
    """Write the style as a delta over the base 3D generator (float16 safetensors + config.json) and a model card."""
    agile = AgileConfig(**marker["config"])
    base = load_generator(base3d)
    tuned = _load_weights(base3d, run / STYLED3D_FILE, "cpu")
    delta = make_style_delta(base, tuned, base_name, rank=agile.delta_rank)
    training = {"method": "agilegan3d", "recipe": dataclasses.asdict(agile), "stages": marker["completed"],
                "exemplars": marker["exemplars"], "exemplar_source": marker["exemplar_source"]}
    directory = save_style_delta(delta, directory, extra_config={"method": "agilegan3d", "style": marker["name"],
                                                                  "training": training})
    size_kib = (Path(directory) / "model.safetensors").stat().st_size / 1024
    (Path(directory) / CARD_FILE).write_text(_model_card(marker, agile, base_name, len(delta.changes()), size_kib))
    return Path(directory)


def _model_card(marker: dict, agile: AgileConfig, base_name: str, changed: int, size_kib: float) -> str:
    source = marker["exemplar_source"]
    lines = [
        f"# AgileGAN3D style `{marker['name']}`",
        "",
        f"A style delta over `{base_name}` (`core.nets.style_delta`, rank {agile.delta_rank}, {changed} changed"
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
        f"* **Stage 4 (3D inversion encoder):** not trained yet ({ENCODER_TODO}).",
        f"* **Stages completed:** {', '.join(marker['completed'])}; seed {agile.seed}.",
        "* **Evaluation** (multi-view identity consistency, identity similarity to the input photo, 5 / 10 / 20"
        " exemplars): not measured yet.",
        "",
    ]
    return "\n".join(lines)


# ---- CLI --------------------------------------------------------------------------------------------------------


def _read_marker(run: Path) -> dict | None:
    path = run / MARKER_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _write_marker(run: Path, marker: dict) -> None:
    temporary = run / (MARKER_FILE + ".tmp")
    temporary.write_text(json.dumps(marker, indent=1))
    temporary.replace(run / MARKER_FILE)


def run_stage(stage: str, run: Path, marker: dict, deadline: Deadline, device, log_every: int) -> bool:
    """Run (or continue) one stage until it finishes or the deadline passes; True when finished."""
    agile = AgileConfig(**marker["config"])
    if stage == "prior":
        return run_prior_stage(run, agile, marker["exemplars_dir"], marker["aligned"], marker["base2d"], deadline,
                               device, log_every)
    if stage == "augment":
        return run_augment_stage(run, agile, marker["base2d"], marker["base3d"], deadline, device)
    return run_transfer_stage(run, agile, marker["base3d"], deadline, device, log_every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exemplars", help="folder of ~20 style exemplar images (needed to start a run)")
    parser.add_argument("--name", help="style name (needed to start a run)")
    parser.add_argument("--base2d", default="weights/stylegan2_faces128", help="bundled 2D StyleGAN2 folder")
    parser.add_argument("--base3d", default="weights/head3d_faces128", help="bundled 3D generator folder")
    parser.add_argument("--base3d-name", default=BASE3D_NAME, help="registry name of --base3d (stored in the delta)")
    parser.add_argument("--run", required=True, help="flat run folder; resumed if present (its stored recipe wins)")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this call")
    parser.add_argument("--reserve-s", type=float, default=45.0, help="stop this long before the budget")
    parser.add_argument("--stage", default="all", choices=("all", *STAGES, ENCODER_STAGE))
    parser.add_argument("--export", help="write the style delta and model card here once the 3D stage is done")
    parser.add_argument("--tiny", action="store_true", help="tiny recipe (1-2 steps per stage) for tests")
    parser.add_argument("--aligned", action="store_true", help="exemplars are aligned face crops already")
    parser.add_argument("--exemplar-origin", help="where the exemplars come from (model card)")
    parser.add_argument("--exemplar-licence", help="the exemplars' licence (model card)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    run = Path(args.run)
    marker = _read_marker(run)
    if marker is None:
        if not (args.exemplars and args.name):
            parser.error("--exemplars and --name are required to start a run")
        run.mkdir(parents=True, exist_ok=True)
        config = TINY if args.tiny else AgileConfig()
        image_names = sorted(p.name for p in Path(args.exemplars).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        marker = {"name": args.name, "config": dataclasses.asdict(config), "completed": [],
                  "exemplars_dir": str(args.exemplars), "exemplars": image_names, "aligned": args.aligned,
                  "exemplar_source": exemplar_source(args.exemplars, args.exemplar_origin, args.exemplar_licence),
                  "base2d": str(args.base2d), "base3d": str(args.base3d)}
        _write_marker(run, marker)
    else:
        print(f"resuming {run} (style {marker['name']!r}; completed: {marker['completed'] or 'none'})", flush=True)

    if args.stage == ENCODER_STAGE:
        print(f"TODO: {ENCODER_TODO}", flush=True)
        return 2
    device = torch.device(args.device)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage in marker["completed"]:
            continue
        missing = [s for s in STAGES[:STAGES.index(stage)] if s not in marker["completed"]]
        if missing:
            parser.error(f"stage {stage!r} needs the earlier stages {missing}")
        if args.minutes <= 0 or deadline.expired():
            break
        finished = run_stage(stage, run, marker, deadline, device, args.log_every)
        print(f"stage {stage}: {'done' if finished else 'continues in the next call'}", flush=True)
        if not finished:
            break
        marker["completed"].append(stage)
        _write_marker(run, marker)
    if args.stage == "all" and "transfer" in marker["completed"]:
        print(f"TODO: {ENCODER_TODO}", flush=True)
    if args.export:
        if "transfer" not in marker["completed"]:
            parser.error("--export needs the finished 'transfer' stage")
        path = export_style(run, marker, marker["base3d"], args.export, args.base3d_name)
        print(f"exported style {marker['name']!r} to {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
