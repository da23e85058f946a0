"""Train the base StyleGAN2 generator (`core.nets.stylegan2.Generator`) in resumable chunks.

    python -m training.train_stylegan2 --data faces128.npz --run runs/sg2 --minutes 9
    python -m training.train_stylegan2 --run runs/sg2 --minutes 0 --export weights/sg2_faces128

Recipe (StyleGAN2-ADA, small-data "auto" flavour): non-saturating logistic loss, lazy R1 on reals every
`r1_interval` steps (weighted by the interval, folded into that step's D update), optional path-length
regularisation, G_ema with ramp-up, w_avg tracking, style mixing, DiffAugment-style augmentation of everything D
sees with an ADA-adjusted probability (`training.augment`). On CUDA the `num_fp16_res` highest resolutions of G and
D run in float16 with `conv_clamp` (the official scheme, no loss scaling, non-finite gradients zeroed); on CPU
everything is float32.

The run folder is flat: `state.json` + `tensors-*.safetensors` (the checkpoint, see `training.resumable`),
`log.jsonl` (one JSON line per `log_every` steps) and `samples.png` (G_ema on fixed seeds). A run resumes from it
(its stored config wins over the command line). Compact checkpoints store G, D and G_ema in float16 and Adam's
second moments in bfloat16, and leave out Adam's first moments: with beta1 = 0 they equal the last gradient and
are overwritten before use.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
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
from core.nets.stylegan2 import Generator
from training.augment import AdaptiveProbability, augment, parse_operations
from training.discriminator import Discriminator
from training.resumable import (LOG_FILE, Deadline, add_budget_options, last_log_record, load_checkpoint,
                                save_checkpoint, stored_config)

SAMPLES_FILE = "samples.png"
CARD_FILE = "README.md"
GRID_SHAPE = (4, 6)  # rows, columns of the sample grid


@dataclass
class TrainConfig:
    """Architecture and recipe of a run (stored in the checkpoint; defaults are the 128-px base config)."""

    resolution: int = 128
    c_dim: int = 0
    z_dim: int = 256
    w_dim: int = 256
    mapping_layers: int = 2
    channel_base: int = 16384
    channel_max: int = 64  # 64 channels at every resolution: the bundled-weights budget (training.weights_budget)
    num_fp16_res: int = 4
    conv_clamp: float | None = 256
    mbstd_group: int = 4
    batch: int = 32
    lr_g: float = 0.0025
    lr_d: float = 0.0025
    r1_gamma: float = 0.5
    r1_interval: int = 16
    pl_weight: float = 0.0
    pl_interval: int = 4
    style_mixing: float = 0.9
    ema_kimg: float = 10.0
    ema_rampup: float | None = 0.05
    augment: str = "color,translation,cutout"
    augment_p: float = 0.0
    ada_target: float | None = 0.6
    ada_interval: int = 4
    ada_kimg: float = 100.0
    mirror: bool = True
    seed: int = 0
    data: str | None = None
    split: str | None = "train"
    label_key: str | None = None

    def generator_kwargs(self) -> dict[str, Any]:
        """Official `Generator` constructor kwargs (the `init_kwargs` of the exported config.json)."""
        return dict(z_dim=self.z_dim, c_dim=self.c_dim, w_dim=self.w_dim, img_resolution=self.resolution,
                    img_channels=3, mapping_kwargs=dict(num_layers=self.mapping_layers),
                    synthesis_kwargs=dict(channel_base=self.channel_base, channel_max=self.channel_max,
                                          num_fp16_res=self.num_fp16_res, conv_clamp=self.conv_clamp))

    def discriminator_kwargs(self) -> dict[str, Any]:
        """Official `Discriminator` constructor kwargs."""
        return dict(c_dim=self.c_dim, img_resolution=self.resolution, img_channels=3,
                    channel_base=self.channel_base, channel_max=self.channel_max, num_fp16_res=self.num_fp16_res,
                    conv_clamp=self.conv_clamp, epilogue_kwargs=dict(mbstd_group_size=self.mbstd_group))


@dataclass
class TrainingImages:
    """The training set in memory: uint8 images [N, 3, S, S], float32 labels [N, c_dim] (or None) and the labels
    of the mirrored images (None: mirroring leaves labels unchanged)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    mirrored_labels: torch.Tensor | None = None

    @property
    def c_dim(self) -> int:
        return 0 if self.labels is None else self.labels.shape[1]

    def to(self, device) -> "TrainingImages":
        def move(tensor):
            return None if tensor is None else tensor.to(device)

        return TrainingImages(move(self.images), move(self.labels), move(self.mirrored_labels))


def _image_chw(image) -> torch.Tensor:
    image = torch.as_tensor(np.array(image))  # a writable copy
    if image.ndim == 3 and image.shape[0] not in (1, 3) and image.shape[-1] in (1, 3):
        image = image.permute(2, 0, 1)  # HWC -> CHW
    assert image.dtype == torch.uint8 and image.ndim == 3, "expected uint8 CHW or HWC images"
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def images_from_dataset(dataset) -> TrainingImages:
    """Adapter for any indexable dataset whose items are a uint8 image (CHW or HWC) or (image, c)."""
    images, labels = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        image, label = item if isinstance(item, (tuple, list)) else (item, None)
        images.append(_image_chw(image))
        if label is not None:
            labels.append(torch.as_tensor(np.asarray(label), dtype=torch.float32).reshape(-1))
    return TrainingImages(torch.stack(images), torch.stack(labels) if labels else None)


def images_from_archive(path: str | Path, split: str | None = "train", label_key: str | None = None) -> TrainingImages:
    """Decode a `training.data` archive split into memory; `label_key` (e.g. "face3dmm", "pose") becomes c, and
    samples whose label has NaNs are dropped."""
    from training.data.archive import load_archive

    archive = load_archive(path, split=split)
    keep = np.arange(len(archive))
    labels = mirrored = None
    if label_key is not None:
        values = np.asarray(getattr(archive, label_key), dtype=np.float32).reshape(len(archive), -1)
        keep = np.flatnonzero(np.isfinite(values).all(axis=1))
        labels = torch.from_numpy(values[keep])
        mirrored = torch.stack([torch.as_tensor(archive.sample(int(i), flip=True)[label_key]).reshape(-1).float()
                                for i in keep])
    images = torch.stack([_image_chw(archive.image(int(i))) for i in keep])
    return TrainingImages(images, labels, mirrored)


def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, batch: int, images_seen: int, ema_kimg: float,
               ema_rampup: float | None) -> None:
    """StyleGAN2-ADA's G_ema step: half-life `ema_kimg` (shortened to `images_seen * ema_rampup` early on); buffers
    are copied."""
    ema_images = ema_kimg * 1000
    if ema_rampup is not None:
        ema_images = min(ema_images, images_seen * ema_rampup)
    beta = 0.5 ** (batch / max(ema_images, 1e-8))
    with torch.no_grad():
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(G_ema.buffers(), G.buffers()):
            b_ema.copy_(b)


def nan_to_num_grads(module: torch.nn.Module) -> torch.Tensor:
    """Replace non-finite gradients (float16 overflow) in place, as the official trainer does. Returns the fraction
    of gradient elements that were not finite, which the trainers log: rare float16 overflows show as a small
    fraction, a NaN source in a loss as a steady large one (the whole update is lost where it is zeroed)."""
    nonfinite, total = [], 0
    for parameter in module.parameters():
        if parameter.grad is not None:
            nonfinite.append((~torch.isfinite(parameter.grad)).sum())
            total += parameter.grad.numel()
            torch.nan_to_num_(parameter.grad, nan=0, posinf=1e5, neginf=-1e5)
    return torch.stack(nonfinite).sum() / total if nonfinite else torch.zeros(())


class StyleGAN2Trainer:
    """G, D, G_ema, their optimizers and the training state of one run; `step()` runs one G and one D update."""

    def __init__(self, config: TrainConfig, data: TrainingImages | None, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.data = data.to(self.device) if data is not None else None
        if data is not None:
            assert data.images.shape[-1] == config.resolution and data.c_dim == config.c_dim, "data/config mismatch"
        torch.manual_seed(config.seed)
        self.G = Generator(**config.generator_kwargs()).train().to(self.device)
        self.D = Discriminator(**config.discriminator_kwargs()).train().to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=config.lr_g, betas=(0.0, 0.99), eps=1e-8)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=config.lr_d, betas=(0.0, 0.99), eps=1e-8)
        self.ada = AdaptiveProbability(config.augment_p, config.ada_target, config.ada_kimg)
        self.operations = parse_operations(config.augment)
        self.pl_mean = 0.0
        self.step_count = 0

    # ---- one training step ---------------------------------------------------------------------------------

    def _batch_generator(self) -> torch.Generator:
        """CPU generator seeded by (seed, step): the data order depends only on the step, so resuming keeps it."""
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step_count)

    def _real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = self._batch_generator()
        n, batch = self.data.images.shape[0], self.config.batch
        index = torch.randint(n, [batch], generator=generator).to(self.device)
        mirror = (torch.rand([batch], generator=generator) < (0.5 if self.config.mirror else 0.0)).to(self.device)
        images = self.data.images[index].to(torch.float32) / 127.5 - 1
        images = torch.where(mirror.reshape(-1, 1, 1, 1), images.flip(-1), images)
        labels = self._labels(index, mirror)
        return images, labels

    def _labels(self, index: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
        if self.data is None or self.data.labels is None:
            return torch.zeros([index.shape[0], 0], device=self.device)
        labels = self.data.labels[index]
        if mirror is not None and self.data.mirrored_labels is not None:
            labels = torch.where(mirror.reshape(-1, 1), self.data.mirrored_labels[index], labels)
        return labels

    def _random_label_indices(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of random training samples and whether to use their mirrored labels (as often as for reals)."""
        index = torch.randint(self.data.images.shape[0], [batch], device=self.device)
        mirror = torch.rand([batch], device=self.device) < (0.5 if self.config.mirror else 0.0)
        return index, mirror

    def _fake_labels(self) -> torch.Tensor:
        """Fake c drawn like the reals' c: random samples, mirrored half of the time when reals are x-flipped."""
        return self._labels(*self._random_label_indices(self.config.batch))

    def _mapping(self, z, c, update_emas=False):
        """ws with style mixing: with probability `style_mixing` the ws after a random cutoff come from a new z."""
        ws = self.G.mapping(z, c, update_emas=update_emas)
        if self.config.style_mixing > 0:
            cutoff = int(torch.randint(1, ws.shape[1], []))
            if float(torch.rand([])) < self.config.style_mixing:
                ws[:, cutoff:] = self.G.mapping(torch.randn_like(z), c)[:, cutoff:]
        return ws

    def _discriminate(self, images, c):
        return self.D(augment(images, self.ada.p, self.operations), c)

    def step(self) -> dict[str, float]:
        """One G update (+ path-length term every `pl_interval` steps) and one D update (+ R1 every
        `r1_interval` steps); then the G_ema and ADA updates. Returns detached scalar stats (device tensors)."""
        cfg = self.config
        stats: dict[str, Any] = {}
        real_images, real_c = self._real_batch()

        # Generator: maximise log D(G(z)).
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        self.opt_G.zero_grad(set_to_none=True)
        z, c = torch.randn([cfg.batch, cfg.z_dim], device=self.device), self._fake_labels()
        fake_logits = self._discriminate(self.G.synthesis(self._mapping(z, c, update_emas=True)), c)
        loss_G = F.softplus(-fake_logits).mean()
        loss_G.backward()
        stats["loss_G"] = loss_G.detach()
        if cfg.pl_weight > 0 and self.step_count % cfg.pl_interval == 0:
            stats["pl_penalty"] = self._path_length_backward()
        stats["nonfinite_grads_G"] = nan_to_num_grads(self.G)
        self.opt_G.step()

        # Discriminator: logistic loss on fakes and reals, lazy R1 on the (unaugmented) reals.
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        self.opt_D.zero_grad(set_to_none=True)
        with torch.no_grad():
            z, c = torch.randn([cfg.batch, cfg.z_dim], device=self.device), self._fake_labels()
            fake_images = self.G.synthesis(self._mapping(z, c))
        fake_logits = self._discriminate(fake_images, c)
        do_r1 = cfg.r1_gamma > 0 and self.step_count % cfg.r1_interval == 0
        real_images = real_images.detach().requires_grad_(do_r1)
        real_logits = self._discriminate(real_images, real_c)
        loss_D = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        stats["loss_D"] = loss_D.detach()
        if do_r1:
            (gradient,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
            r1_penalty = gradient.square().sum(dim=[1, 2, 3]).mean()
            loss_D = loss_D + r1_penalty * (cfg.r1_gamma / 2 * cfg.r1_interval)
            stats["r1_penalty"] = r1_penalty.detach()
        loss_D.backward()
        stats["nonfinite_grads_D"] = nan_to_num_grads(self.D)
        self.opt_D.step()
        self.ada.observe(real_logits)
        stats["real_logits"] = real_logits.detach().mean()
        stats["fake_logits"] = fake_logits.detach().mean()

        self._update_ema()
        self.step_count += 1
        if cfg.ada_interval > 0 and self.step_count % cfg.ada_interval == 0:
            r_t = self.ada.update(cfg.batch * cfg.ada_interval)
            stats["r_t"] = r_t
        return stats

    def _path_length_backward(self) -> torch.Tensor:
        cfg = self.config
        batch = max(cfg.batch // 2, 1)
        z, c = torch.randn([batch, cfg.z_dim], device=self.device), self._fake_labels()[:batch]
        ws = self._mapping(z, c)
        images = self.G.synthesis(ws)
        noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
        (gradient,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
        lengths = gradient.square().sum(2).mean(1).sqrt()
        self.pl_mean = self.pl_mean + (float(lengths.detach().mean()) - self.pl_mean) * 0.01
        penalty = (lengths - self.pl_mean).square().mean()
        (penalty * cfg.pl_weight * cfg.pl_interval + images[:, 0, 0, 0].sum() * 0).backward()
        return penalty.detach()

    @property
    def images_seen(self) -> int:
        return self.step_count * self.config.batch

    def _update_ema(self) -> None:
        cfg = self.config
        update_ema(self.G_ema, self.G, cfg.batch, self.images_seen, cfg.ema_kimg, cfg.ema_rampup)

    # ---- checkpoints, samples, export ----------------------------------------------------------------------

    def log_fields(self) -> dict[str, float]:
        """Extra state for each training log line."""
        return {"augment_p": round(self.ada.p, 5)}

    def save(self, run_dir: str | Path, compact: bool = True) -> None:
        """Write the checkpoint into `run_dir` (see the module docstring for `compact`)."""
        extra = {"config": dataclasses.asdict(self.config), **self.ada.state(), "pl_mean": self.pl_mean,
                 "kimg": self.images_seen / 1000}
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
        self.pl_mean = extra["pl_mean"]
        return True

    @torch.no_grad()
    def sample_grid(self, path: str | Path) -> None:
        """G_ema images of seeds 0 .. rows*cols-1 (labels of the first training samples) as one PNG."""
        rows, cols = GRID_SHAPE
        count = rows * cols
        z = torch.stack([torch.randn([self.config.z_dim], generator=torch.Generator().manual_seed(seed))
                         for seed in range(count)]).to(self.device)
        n = self.data.images.shape[0]
        c = self._labels(torch.arange(count, device=self.device) % n)
        images = torch.cat([self.G_ema(z[i:i + 8], c[i:i + 8], noise_mode="const") for i in range(0, count, 8)])
        images = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu()
        size = self.config.resolution
        grid = images.reshape(rows, cols, 3, size, size).permute(0, 3, 1, 4, 2).reshape(rows * size, cols * size, 3)
        Image.fromarray(grid.numpy()).save(path)

    def export(self, directory: str | Path, log: dict | None = None) -> Path:
        """Write G_ema in the bundled format read by `core.nets.load_generator` (float16 weights, config.json,
        model card)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.G_ema.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {"kind": "stylegan2", "init_kwargs": self.config.generator_kwargs(), "rendering_kwargs": None,
                  "neural_rendering_resolution": None,
                  "training": {"recipe": dataclasses.asdict(self.config), "steps": self.step_count,
                               "kimg": self.images_seen / 1000, "augment_p": self.ada.p}}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        (directory / CARD_FILE).write_text(_model_card(self, log))
        return directory


def _model_card(trainer: StyleGAN2Trainer, log: dict | None) -> str:
    cfg = trainer.config
    parameters = sum(p.numel() for p in trainer.G_ema.parameters())
    lines = [
        f"# StyleGAN2 base generator, {cfg.resolution} px",
        "",
        "`core.nets.stylegan2.Generator` (G_ema) trained from scratch by `training/train_stylegan2.py`.",
        "",
        f"* **Data:** `{cfg.data}`, split `{cfg.split}`, conditioning `{cfg.label_key or 'none'}` (c_dim {cfg.c_dim}),"
        f" x-flips {'on' if cfg.mirror else 'off'}. Check the data licences (docs: shared data card) before sharing.",
        f"* **Architecture:** z/w {cfg.z_dim}/{cfg.w_dim}, mapping {cfg.mapping_layers} layers, channel_base"
        f" {cfg.channel_base}, channel_max {cfg.channel_max}, {parameters / 1e6:.2f} M parameters, float16 weights.",
        f"* **Recipe:** batch {cfg.batch}, Adam lr G/D {cfg.lr_g}/{cfg.lr_d} betas (0, 0.99), R1 gamma {cfg.r1_gamma}"
        f" every {cfg.r1_interval}, path length weight {cfg.pl_weight}, style mixing {cfg.style_mixing}, EMA"
        f" {cfg.ema_kimg} kimg (ramp-up {cfg.ema_rampup}), augmentation `{cfg.augment}` (ADA target"
        f" {cfg.ada_target}), fp16 in the {cfg.num_fp16_res} highest resolutions on GPU, seed {cfg.seed}.",
        f"* **Iterations:** {trainer.step_count} steps, {trainer.images_seen / 1000:.2f} kimg; final augment p"
        f" {trainer.ada.p:.3f}.",
        f"* **Last training log line:** `{json.dumps(log) if log else 'n/a'}`",
        "* **Quality metrics:** not measured by the trainer; add them from `training.eval`.",
        "",
    ]
    return "\n".join(lines)


def add_config_options(parser: argparse.ArgumentParser, config_cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--option-name` per field of the dataclass `config_cls` (except `skip`), defaulting to the field's
    default: bools read 1/true/yes, int/float/str fields their type, optional floats also 'none'."""
    for field in dataclasses.fields(config_cls):
        if field.name in skip:
            continue
        option = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(option, type=lambda s: s.lower() in ("1", "true", "yes"), default=field.default)
        elif field.type in ("int", "float", "str"):
            parser.add_argument(option, type={"int": int, "float": float, "str": str}[field.type],
                                default=field.default)
        else:  # optional floats: "none" disables
            parser.add_argument(option, type=lambda s: None if s.lower() == "none" else float(s),
                                default=field.default)


def read_run_config(run_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig stored in a run folder's checkpoint, or None."""
    stored = stored_config(run_dir)
    return None if stored is None else TrainConfig(**stored)


def train(trainer, run_dir: str | Path, deadline: Deadline, max_steps: int | None = None,
          max_kimg: float | None = None, log_every: int = 100, save_every_s: float = 240.0,
          compact: bool = True) -> dict | None:
    """Run steps until the deadline, `max_steps` more steps or `max_kimg` in total; log, save and sample.
    Returns the last log record. `trainer` is a StyleGAN2Trainer or any trainer with the same `step`, `save`,
    `sample_grid`, `log_fields`, `step_count`, `images_seen` and `config.batch` (the 3D head trainer)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    first_step, last_save = trainer.step_count, time.monotonic()
    window_start, window_steps, record, sums = time.monotonic(), 0, None, {}
    while not deadline.expired():
        if max_steps is not None and trainer.step_count - first_step >= max_steps:
            break
        if max_kimg is not None and trainer.images_seen >= max_kimg * 1000:
            break
        stats = trainer.step()
        window_steps += 1
        for key, value in stats.items():
            if value is not None:
                total, count = sums.get(key, (0.0, 0))
                sums[key] = (total + value, count + 1)
        if trainer.step_count % log_every == 0:
            seconds = time.monotonic() - window_start
            record = {"step": trainer.step_count, "kimg": round(trainer.images_seen / 1000, 3),
                      **{k: round(float(total) / count, 5) for k, (total, count) in sums.items()},
                      **trainer.log_fields(),
                      "images_per_s": round(window_steps * trainer.config.batch / max(seconds, 1e-9), 2),
                      "elapsed_s": round(deadline.elapsed_s, 1)}
            with open(run_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            window_start, window_steps, sums = time.monotonic(), 0, {}
        if time.monotonic() - last_save > save_every_s:
            trainer.save(run_dir, compact=compact)
            last_save = time.monotonic()
    trainer.save(run_dir, compact=compact)
    trainer.sample_grid(run_dir / SAMPLES_FILE)
    return record


def configure_device(device: torch.device, benchmark: bool = True) -> None:
    """On CUDA: TF32 matmuls and convolutions, and cuDNN autotuning unless `benchmark` is False."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = benchmark


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (checkpoint, log, samples); resumed if present")
    parser.add_argument("--data", help="training archive (training.data); not needed for --minutes 0 --export")
    parser.add_argument("--split", default=defaults.split)
    parser.add_argument("--label-key", default=None, help="archive label used as conditioning c (e.g. face3dmm)")
    add_budget_options(parser)
    parser.add_argument("--kimg", type=float, default=None, help="stop when the run has seen this many kimg")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--exact-checkpoint", action="store_true",
                        help="store float32 weights and moments (bigger; resumes bit-exactly)")
    parser.add_argument("--export", help="write G_ema in the bundled format here at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_config_options(parser, TrainConfig, skip=("data", "split", "label_key", "c_dim", "resolution"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    configure_device(device)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    config = read_run_config(args.run)
    if config is None:
        if args.data is None:
            parser.error("--data is required to start a run")
        recipe = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
        config = TrainConfig(**recipe)
    else:
        print(f"resuming {args.run}; its stored config is used", flush=True)
    data = None
    if args.minutes > 0:
        data_path = args.data or config.data
        data = images_from_archive(data_path, split=config.split, label_key=config.label_key)
        config = dataclasses.replace(config, data=str(data_path), resolution=data.images.shape[-1],
                                     c_dim=data.c_dim)
        print(f"{data.images.shape[0]} training images of {config.resolution} px, c_dim {config.c_dim}", flush=True)
    trainer = StyleGAN2Trainer(config, data, device)
    trainer.load(args.run)
    record = None
    if data is not None:
        record = train(trainer, args.run, deadline, max_steps=args.steps, max_kimg=args.kimg,
                       log_every=args.log_every, compact=not args.exact_checkpoint)
    if args.export:
        if record is None:
            record = last_log_record(Path(args.run))
        trainer.export(args.export, record)
        print(f"exported G_ema to {args.export}", flush=True)


if __name__ == "__main__":
    main()
