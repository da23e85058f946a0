"""Train the Latents2Semantics autoencoder (`core.nets.l2sae.L2SAE`) in resumable chunks.

    python -m training.train_l2sae --data datasets/faces128.npz --run runs/l2sae --minutes 9
    python -m training.train_l2sae --run runs/l2sae --minutes 0 --export weights/l2sae_faces128

Each step (batch of train-split crops x, x-flipped with probability 0.5 together with their region label maps m):
* reconstruction x_rec = G(S, s) with (S, s) = E(x): L1 + `identity_weight` * (1 - cos) of the identity network's
  embeddings (`core.identity`, registry `identity-resnet`, frozen);
* mask supervision: cross-entropy of the per-region mask logits (one shared head per structure slice) against m,
  plus `mask_dice_weight` x the soft Dice loss (`soft_dice_loss`), which weighs a brow like the background;
* style swap x_swap = G(S, s of another image in the batch);
* region edit: a random region r per sample, Gaussian direction, strength ~ U(0.5, 1.5) through the Style
  Manipulation Network, x_edit = G(S, s'); `locality_weight` * mean |x_edit - x_rec| outside r's dilated label
  mask, `edit_weight` * hinge(`edit_margin` - mean |x_edit - x_rec| inside r), and the blend
  m_r * x_edit + (1 - m_r) * x (what the demo shows);
* adversarial: the non-saturating logistic loss on x_rec, x_swap and the blend against a StyleGAN2 discriminator
  (`training.discriminator`) with lazy R1 and the ADA-driven augmentation of `training.augment`.

The run folder is flat (`training.resumable`): `state.json` + `tensors-*.safetensors` (the L2SAE and D in float16,
Adam moments in bfloat16), `log.jsonl` and `samples.png` (rows: input, reconstruction, predicted regions, a hair
edit, a swap). The stored config wins when a run resumes. Float32 everywhere (TF32 on CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from core.beauty import load_identity_encoder as load_registry_identity
from core.identity import IdentityEncoder
from core.nets import CONFIG_FILE, WEIGHTS_FILE
from core.nets.l2sae import DATASET_REGIONS, L2SAE, L2SAEConfig, parameter_count
from training.augment import AdaptiveProbability, augment, parse_operations
from training.discriminator import Discriminator
from training.resumable import (Deadline, add_budget_options, last_log_record, load_checkpoint, save_checkpoint,
                                stored_config)
from training.train_stylegan2 import add_config_options, configure_device, nan_to_num_grads, train

CARD_FILE = "README.md"
IDENTITY_MODEL = "identity-resnet"
SAMPLE_COUNT = 8
REGION_COLOURS = np.array([[0, 0, 0], [230, 180, 150], [90, 60, 30], [40, 120, 255], [250, 220, 0], [220, 30, 60],
                           [120, 0, 60], [150, 90, 40], [60, 200, 120]], dtype=np.uint8)


@dataclass
class TrainConfig:
    """Architecture and recipe of a run (stored in the checkpoint; defaults are the 128-px config)."""

    # channel_max 96 keeps the float16 export under 2 MiB (the bundled-weights budget, training.weights_budget)
    model: dict[str, Any] = field(default_factory=lambda: L2SAEConfig(channel_max=96).to_dict())
    d_channel_base: int = 8192
    d_channel_max: int = 128
    mbstd_group: int = 4
    batch: int = 16
    lr: float = 0.002
    lr_d: float = 0.002
    l1_weight: float = 1.0
    identity_weight: float = 0.3
    mask_weight: float = 1.0
    mask_dice_weight: float = 1.0  # soft Dice next to the CE, so that small regions count (refine_l2sae_masks)
    adversarial_weight: float = 0.1
    locality_weight: float = 1.0
    edit_weight: float = 0.5
    edit_margin: float = 0.1
    locality_dilation: int = 3
    r1_gamma: float = 1.0
    r1_interval: int = 16
    augment: str = "color,translation,cutout"
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 100.0
    seed: int = 0
    data: str | None = None
    split: str = "train"

    def discriminator_kwargs(self) -> dict[str, Any]:
        return dict(c_dim=0, img_resolution=self.model["resolution"], img_channels=3,
                    channel_base=self.d_channel_base, channel_max=self.d_channel_max,
                    epilogue_kwargs=dict(mbstd_group_size=self.mbstd_group))


@dataclass
class FaceCrops:
    """uint8 images [N, 3, S, S] and uint8 region label maps [N, S, S] in memory."""

    images: torch.Tensor
    masks: torch.Tensor

    def to(self, device) -> "FaceCrops":
        return FaceCrops(self.images.to(device), self.masks.to(device))

    def draw(self, batch: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` random crops in [-1, 1] with their int64 label maps, x-flipped together with probability 0.5; the
        draw depends only on (seed, step), so a resumed run continues it."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(self.images.shape[0], [batch], generator=generator).to(self.images.device)
        mirror = (torch.rand([batch], generator=generator) < 0.5).to(self.images.device)
        images = self.images[index].float() / 127.5 - 1
        masks = self.masks[index].long()
        images = torch.where(mirror.reshape(-1, 1, 1, 1), images.flip(-1), images)
        masks = torch.where(mirror.reshape(-1, 1, 1), masks.flip(-1), masks)
        return images, masks


def crops_from_archive(path: str | Path, split: str = "train") -> FaceCrops:
    """Decode an archive split (`training.data.archive`); checks its classes are the model's regions."""
    from training.data.archive import load_archive

    archive = load_archive(path, split=split)
    if tuple(archive.class_names) != DATASET_REGIONS:
        raise ValueError(f"archive classes {archive.class_names} differ from {DATASET_REGIONS}")
    images = torch.stack([torch.from_numpy(archive.image(i)).permute(2, 0, 1) for i in range(len(archive))])
    masks = torch.stack([torch.from_numpy(archive.mask(i)) for i in range(len(archive))])
    return FaceCrops(images, masks)


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice of softmax(logits) [N, R, H, W] against int labels [N, H, W], over the (image, region)
    pairs whose region is present in the label map."""
    probabilities = logits.softmax(dim=1)
    one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(probabilities.dtype)
    intersection = (probabilities * one_hot).sum(dim=[2, 3])
    total = probabilities.sum(dim=[2, 3]) + one_hot.sum(dim=[2, 3])
    present = one_hot.sum(dim=[2, 3]) > 0
    return 1 - (2 * intersection[present] / total[present]).mean()


def load_identity_encoder(device: torch.device) -> IdentityEncoder:
    return load_registry_identity(IDENTITY_MODEL).to(device).requires_grad_(False)


class L2SAETrainer:
    """The L2SAE, its discriminator, optimizers and training state; `step()` runs one L2SAE and one D update."""

    def __init__(self, config: TrainConfig, data: FaceCrops | None, device: str | torch.device = "cpu",
                 identity: IdentityEncoder | None = None):
        self.config = config
        self.device = torch.device(device)
        self.data = data.to(self.device) if data is not None else None
        torch.manual_seed(config.seed)
        self.model = L2SAE.from_config(config.model).train().to(self.device)
        self.D = Discriminator(**config.discriminator_kwargs()).train().to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=(0.0, 0.99), eps=1e-8)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=config.lr_d, betas=(0.0, 0.99), eps=1e-8)
        self.identity = identity
        if self.identity is None and config.identity_weight > 0 and data is not None:
            self.identity = load_identity_encoder(self.device)
        self.ada = AdaptiveProbability(0.0, config.ada_target, config.ada_kimg)
        self.operations = parse_operations(config.augment)
        self.step_count = 0

    def _discriminate(self, images: torch.Tensor) -> torch.Tensor:
        return self.D(augment(images, self.ada.p, self.operations), None)

    def _edit(self, structure, style, masks):
        """Random-region edit: (x_edit, region one-hot label mask [N, 1, H, W] float)."""
        n = style.shape[0]
        regions = torch.randint(len(self.model.regions), [n], device=self.device)
        strength = torch.rand([n], device=self.device) + 0.5
        edited_style = self.model.edit_style(style, torch.randn_like(style), regions, strength)
        region_masks = (masks == regions.reshape(-1, 1, 1)).unsqueeze(1).float()
        return self.model.decode(structure, edited_style), region_masks

    def step(self) -> dict[str, torch.Tensor]:
        """One L2SAE update and one D update (+ R1 every `r1_interval` steps); returns detached scalar stats."""
        cfg = self.config
        images, masks = self.data.draw(cfg.batch, cfg.seed, self.step_count)
        stats: dict[str, torch.Tensor] = {}

        self.model.requires_grad_(True)
        self.D.requires_grad_(False)
        self.opt.zero_grad(set_to_none=True)
        structure, style = self.model.encode(images)
        reconstruction = self.model.decode(structure, style)
        swapped = self.model.decode(structure, style.roll(1, dims=0))
        edited, region_masks = self._edit(structure, style, masks)
        blended = region_masks * edited + (1 - region_masks) * images
        stats["l1"] = (reconstruction - images).abs().mean()
        mask_logits = self.model.mask_logits(structure)
        stats["mask_ce"] = F.cross_entropy(mask_logits, masks)
        stats["mask_dice"] = soft_dice_loss(mask_logits, masks)
        kernel = 2 * cfg.locality_dilation + 1
        outside = 1 - F.max_pool2d(region_masks, kernel, stride=1, padding=cfg.locality_dilation)
        change = (edited - reconstruction.detach()).abs().mean(dim=1, keepdim=True)
        stats["locality"] = (change * outside).sum() / outside.sum().clamp(min=1)
        inside = (change * region_masks).sum(dim=[1, 2, 3]) / region_masks.sum(dim=[1, 2, 3]).clamp(min=1)
        stats["edit_hinge"] = F.relu(cfg.edit_margin - inside).mean()
        fakes = torch.cat([reconstruction, swapped, blended])
        stats["loss_adv"] = F.softplus(-self._discriminate(fakes)).mean()
        loss = (cfg.l1_weight * stats["l1"] + cfg.mask_weight * stats["mask_ce"]
                + cfg.mask_dice_weight * stats["mask_dice"]
                + cfg.locality_weight * stats["locality"] + cfg.edit_weight * stats["edit_hinge"]
                + cfg.adversarial_weight * stats["loss_adv"])
        if self.identity is not None and cfg.identity_weight > 0:
            similarity = F.cosine_similarity(self.identity.embed_aligned(reconstruction),
                                             self.identity.embed_aligned(images), dim=1)
            stats["identity_cos"] = similarity.mean()
            loss = loss + cfg.identity_weight * (1 - similarity).mean()
        loss.backward()
        stats["nonfinite_grads_G"] = nan_to_num_grads(self.model)
        self.opt.step()

        self.model.requires_grad_(False)
        self.D.requires_grad_(True)
        self.opt_D.zero_grad(set_to_none=True)
        fake_logits = self._discriminate(fakes.detach())
        do_r1 = cfg.r1_gamma > 0 and self.step_count % cfg.r1_interval == 0
        reals = images.detach().requires_grad_(do_r1)
        real_logits = self._discriminate(reals)
        loss_D = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        stats["loss_D"] = loss_D.detach()
        if do_r1:
            (gradient,) = torch.autograd.grad(real_logits.sum(), reals, create_graph=True)
            r1_penalty = gradient.square().sum(dim=[1, 2, 3]).mean()
            loss_D = loss_D + r1_penalty * (cfg.r1_gamma / 2 * cfg.r1_interval)
            stats["r1_penalty"] = r1_penalty.detach()
        loss_D.backward()
        stats["nonfinite_grads_D"] = nan_to_num_grads(self.D)
        self.opt_D.step()
        self.ada.observe(real_logits)

        self.step_count += 1
        if cfg.ada_interval > 0 and self.step_count % cfg.ada_interval == 0:
            self.ada.update(cfg.batch * cfg.ada_interval)
        return {key: value.detach() for key, value in stats.items()}

    @property
    def images_seen(self) -> int:
        return self.step_count * self.config.batch

    # ---- checkpoints, samples, export ----------------------------------------------------------------------

    def log_fields(self) -> dict[str, float]:
        """Extra state for each training log line."""
        return {"augment_p": round(self.ada.p, 5)}

    def save(self, run_dir: str | Path, compact: bool = True) -> None:
        """Write the checkpoint into `run_dir`, keeping log and samples; compact: float16 modules and bfloat16
        moments (else float32)."""
        extra = {"config": dataclasses.asdict(self.config), **self.ada.state()}
        half = torch.float16 if compact else None
        save_checkpoint(run_dir, self.step_count, {"model": self.model, "D": self.D},
                        {"model": self.opt, "D": self.opt_D}, extra,
                        module_dtypes={"model": half, "D": half} if compact else None,
                        moment_dtype=torch.bfloat16 if compact else None)

    def load(self, run_dir: str | Path) -> bool:
        """Restore from `run_dir`; False when it holds no checkpoint."""
        restored = load_checkpoint(run_dir, {"model": self.model, "D": self.D}, {"model": self.opt, "D": self.opt_D})
        if restored is None:
            return False
        self.step_count, extra = restored
        self.ada.load_state(extra)
        return True

    @torch.no_grad()
    def sample_grid(self, path: str | Path) -> None:
        """Columns: the first SAMPLE_COUNT train crops; rows: input, reconstruction, predicted regions, a hair edit
        blended by the predicted mask, a style swap."""
        self.model.eval()
        images = self.data.images[:SAMPLE_COUNT].float() / 127.5 - 1
        structure, style = self.model.encode(images)
        regions = self.model.mask_logits(structure).argmax(dim=1)
        hair = self.model.regions.index("hair") if "hair" in self.model.regions else 0
        noise = torch.randn(style.shape, generator=torch.Generator().manual_seed(0)).to(style)
        edit = self.model.decode(structure, self.model.edit_style(style, noise, hair, 1.0))
        hair_mask = (regions == hair).unsqueeze(1).float()
        rows = [images, self.model.decode(structure, style), edit * hair_mask + images * (1 - hair_mask),
                self.model.decode(structure, style.roll(1, dims=0))]
        self.model.train()
        pictures = [(row.clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                    for row in rows]
        pictures.insert(2, REGION_COLOURS[regions.cpu().numpy() % len(REGION_COLOURS)])
        grid = np.concatenate([np.concatenate(list(row), axis=1) for row in pictures], axis=0)
        Image.fromarray(grid).save(path)

    def export(self, directory: str | Path, log: dict | None = None) -> Path:
        """Write the L2SAE as `model.safetensors` (float16) + `config.json` + a model card (`core.nets.l2sae.load_l2sae`
        reads it; `training.eval_l2sae` adds the metrics)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {"kind": "l2sae", "config": self.model.config.to_dict(),
                  "training": {"recipe": dataclasses.asdict(self.config), "steps": self.step_count,
                               "kimg": self.images_seen / 1000, "augment_p": self.ada.p}}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        (directory / CARD_FILE).write_text(_model_card(self, log))
        return directory


def _model_card(trainer: L2SAETrainer, log: dict | None) -> str:
    cfg, model = trainer.config, trainer.model.config
    return "\n".join([
        f"# Latents2Semantics autoencoder (L2SAE), {model.resolution} px",
        "",
        "`core.nets.l2sae.L2SAE` trained from scratch by `training/train_l2sae.py` (docs/methods.md §2). Used by"
        " `core.pipelines.latents2semantics` for region style edits blended by the predicted region mask.",
        "",
        f"* **Data:** `{cfg.data}`, split `{cfg.split}`, x-flips; region masks from the archive's label maps."
        " Non-commercial research data (see training/data/DATASET.md); check licences before sharing.",
        f"* **Architecture:** structure {model.structure_channels} x {model.structure_resolution}^2"
        f" ({model.channels_per_region} channels per region: {', '.join(model.regions)}), style {model.style_dim},"
        f" channel_base {model.channel_base}, channel_max {model.channel_max}, mask head {model.mask_channels}"
        f" channels; {parameter_count(trainer.model) / 1e6:.2f} M parameters, float16 weights.",
        f"* **Recipe:** batch {cfg.batch}, Adam lr {cfg.lr}/{cfg.lr_d} (D) betas (0, 0.99); weights: L1 {cfg.l1_weight},"
        f" identity {cfg.identity_weight}, mask CE {cfg.mask_weight}, mask Dice {cfg.mask_dice_weight}, adversarial {cfg.adversarial_weight},"
        f" locality {cfg.locality_weight} (dilation {cfg.locality_dilation} px), edit hinge {cfg.edit_weight}"
        f" (margin {cfg.edit_margin}); R1 gamma {cfg.r1_gamma} every {cfg.r1_interval}; augmentation"
        f" `{cfg.augment}` (ADA target {cfg.ada_target}); seed {cfg.seed}.",
        f"* **Iterations:** {trainer.step_count} steps, {trainer.images_seen / 1000:.2f} kimg; final augment p"
        f" {trainer.ada.p:.3f}.",
        f"* **Last training log line:** `{json.dumps(log) if log else 'n/a'}`",
        "* **Evaluation:** not yet measured; run `python -m training.eval_l2sae`.",
        "",
    ])


def read_run_config(run_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig stored in a run folder's checkpoint, or None."""
    stored = stored_config(run_dir)
    return None if stored is None else TrainConfig(**stored)


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (checkpoint, log, samples); resumed if present")
    parser.add_argument("--data", help="training archive (training.data); not needed for --minutes 0 --export")
    add_budget_options(parser)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--export", help="write the L2SAE in the bundled format here at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-json", default=None, help="L2SAEConfig overrides as JSON (new runs only)")
    add_config_options(parser, TrainConfig, skip=("model", "data", "split"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    configure_device(device)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    config = read_run_config(args.run)
    if config is None:
        if args.data is None:
            parser.error("--data is required to start a run")
        recipe = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                  if f.name not in ("model", "data", "split")}
        model = {**defaults.model, **json.loads(args.model_json or "{}")}
        config = TrainConfig(**recipe, model=L2SAEConfig(**model).to_dict(), data=str(args.data))
    else:
        print(f"resuming {args.run}; its stored config is used", flush=True)
    data = None
    if args.minutes > 0:
        data = crops_from_archive(args.data or config.data, split=config.split)
        if data.images.shape[-1] != config.model["resolution"]:
            parser.error(f"archive crops are {data.images.shape[-1]} px, the model wants {config.model['resolution']}")
        print(f"{data.images.shape[0]} training crops of {data.images.shape[-1]} px", flush=True)
    trainer = L2SAETrainer(config, data, device)
    trainer.load(args.run)
    record = None
    if data is not None:
        record = train(trainer, args.run, deadline, max_steps=args.steps, log_every=args.log_every)
    if args.export:
        if record is None:
            record = last_log_record(Path(args.run))
        trainer.export(args.export, record)
        print(f"exported the L2SAE to {args.export}", flush=True)


if __name__ == "__main__":
    main()
