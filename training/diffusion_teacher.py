"""Small diffusion teachers for 3D head stylization: an epsilon-prediction UNet over two domains, photo and style.

The paper distils Stable Diffusion + ControlNet with the score `guidance * (eps_text - eps_uncond)`. Our stand-in
is trained from scratch on the archive's crops (domain 0, "photo") and the same crops through one
`training.style_filters` filter (domain 1, the style), so `eps(x, style) - eps(x, photo)` plays the text-minus-
unconditional direction. Like ControlNet-canny, it can be conditioned on the Canny edges of the original photo
(one extra input channel, dropped with probability `cond_drop` so that it also works unconditioned).

    python -m training.diffusion_teacher --data datasets/faces128.npz --style toon --run runs/teacher_toon --minutes 9
    python -m training.diffusion_teacher --run runs/teacher_toon --minutes 0 --export runs/teacher_toon/export

UNet: a 3x3 stem, per level `blocks_per_level` residual blocks (GroupNorm, SiLU, the time + domain embedding added
between the two convolutions) and a stride-2 downsampling, a middle pair of blocks, and the mirrored decoder with
skip connections; no attention, so it applies convolutionally to the 2x2 grids of the distillation too. Cosine
noise schedule (Nichol & Dhariwal) over `timesteps` steps, MSE on epsilon, Adam, EMA of the weights (exported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from core.nets import CONFIG_FILE, WEIGHTS_FILE
from training.resumable import LOG_FILE, Deadline, last_log_record, load_checkpoint, save_checkpoint, stored_config
from training.style_filters import stylize

SAMPLES_FILE = "samples.png"
CARD_FILE = "README.md"
PHOTO, STYLE = 0, 1


@dataclass
class TeacherConfig:
    """Architecture and recipe of a teacher run (stored in the checkpoint and in the export's config.json)."""

    style: str = "toon"
    resolution: int = 64
    channels: int = 40
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 2)  # 2.28 M parameters
    blocks_per_level: int = 1
    cond_channels: int = 1  # 1: Canny edges of the original photo, 0: unconditioned
    cond_drop: float = 0.1
    timesteps: int = 1000
    batch: int = 64
    lr: float = 2e-4
    ema_decay: float = 0.999
    seed: int = 0
    data: str | None = None
    split: str = "train"


def cosine_alpha_bar(timesteps: int) -> torch.Tensor:
    """alpha_bar_t for t = 0 .. timesteps - 1 of the cosine schedule (s = 0.008, clipped like iDDPM's betas)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def canny_edges(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] Canny edge maps in {-1, 1} of images [N, 3, H, W] in [-1, 1] (not differentiable)."""
    pixels = ((images.detach().float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    edges = [cv2.Canny(cv2.GaussianBlur(cv2.cvtColor(p, cv2.COLOR_RGB2GRAY), (3, 3), 0), 50, 150) for p in pixels]
    return torch.from_numpy(np.stack(edges)[:, None].astype(np.float32) / 127.5 - 1).to(images.device)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps t [N]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv, + embedding, GroupNorm-SiLU-conv, with a 1x1 skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, out_channels)
        self.norm2, self.conv2 = _norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.embedding(embedding)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class TeacherUNet(nn.Module):
    """eps(x_t, t, edges, domain): images [N, 3, H, W] (H, W multiples of 2^(levels-1)) -> epsilon [N, 3, H, W]."""

    def __init__(self, channels: int = 40, channel_multipliers=(1, 2, 2, 2), blocks_per_level: int = 1,
                 cond_channels: int = 1, domains: int = 2):
        super().__init__()
        self.cond_channels = cond_channels
        self.embedding_dim = channels * 4
        self.time_mlp = nn.Sequential(nn.Linear(channels, self.embedding_dim), nn.SiLU(),
                                      nn.Linear(self.embedding_dim, self.embedding_dim))
        self.domain_embedding = nn.Embedding(domains, self.embedding_dim)
        self.stem = nn.Conv2d(3 + cond_channels, channels, 3, padding=1)
        widths = [channels * m for m in channel_multipliers]
        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        skip_widths, width = [channels], channels
        for level, level_width in enumerate(widths):
            for _ in range(blocks_per_level):
                self.down_blocks.append(ResidualBlock(width, level_width, self.embedding_dim))
                width = level_width
                skip_widths.append(width)
            if level < len(widths) - 1:
                self.downsamples.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)
        self.middle = nn.ModuleList([ResidualBlock(width, width, self.embedding_dim) for _ in range(2)])
        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for level, level_width in reversed(list(enumerate(widths))):
            for _ in range(blocks_per_level + 1):
                self.up_blocks.append(ResidualBlock(width + skip_widths.pop(), level_width, self.embedding_dim))
                width = level_width
            if level > 0:
                self.upsamples.append(nn.Conv2d(width, width, 3, padding=1))
        self.blocks_per_level = blocks_per_level
        self.levels = len(widths)
        self.out = nn.Sequential(_norm(width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                domain: torch.Tensor | int = STYLE) -> torch.Tensor:
        """`t` [N] timesteps, `cond` [N, cond_channels, H, W] in [-1, 1] (None: unconditioned), `domain` 0/1."""
        if self.cond_channels:
            cond = torch.full_like(x[:, :self.cond_channels], -1.0) if cond is None else cond  # -1: no edges
            x = torch.cat([x, cond.to(x.dtype)], 1)
        domain = torch.as_tensor(domain, device=x.device).long().expand(x.shape[0])
        embedding = self.time_mlp(timestep_embedding(t, self.stem.out_channels)) + self.domain_embedding(domain)
        h = self.stem(x)
        skips, blocks = [h], iter(self.down_blocks)
        for level in range(self.levels):
            for _ in range(self.blocks_per_level):
                h = next(blocks)(h, embedding)
                skips.append(h)
            if level < self.levels - 1:
                h = self.downsamples[level](h)
                skips.append(h)
        for block in self.middle:
            h = block(h, embedding)
        blocks, upsamples = iter(self.up_blocks), iter(self.upsamples)
        for level in reversed(range(self.levels)):
            for _ in range(self.blocks_per_level + 1):
                h = next(blocks)(torch.cat([h, skips.pop()], 1), embedding)
            if level > 0:
                h = next(upsamples)(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(h)


def build_unet(config: TeacherConfig) -> TeacherUNet:
    return TeacherUNet(config.channels, config.channel_multipliers, config.blocks_per_level, config.cond_channels)


class DiffusionTeacher(nn.Module):
    """A trained UNet with its noise schedule: `add_noise`, `score` (epsilon) and a DDIM `sample`r."""

    def __init__(self, config: TeacherConfig, unet: TeacherUNet | None = None):
        super().__init__()
        self.config = config
        self.unet = unet if unet is not None else build_unet(config)
        self.register_buffer("alpha_bar", cosine_alpha_bar(config.timesteps), persistent=False)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        a = self.alpha_bar[t].reshape(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def score(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
              domain: int = STYLE) -> torch.Tensor:
        """Predicted epsilon of noisy images x_t [N, 3, H, W] at integer timesteps t [N] in the given domain."""
        return self.unet(x_t, t, cond, domain)

    @torch.no_grad()
    def sample(self, shape, cond: torch.Tensor | None = None, domain: int = STYLE, steps: int = 50,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta 0) samples in [-1, 1] of `shape` [N, 3, H, W] from `steps` steps."""
        device = self.alpha_bar.device
        x = torch.randn(shape, generator=generator).to(device)
        times = torch.linspace(self.config.timesteps - 1, 0, steps).round().long().tolist()
        for index, t in enumerate(times):
            a = self.alpha_bar[t]
            a_next = self.alpha_bar[times[index + 1]] if index + 1 < len(times) else torch.ones_like(a)
            eps = self.score(x, torch.full([shape[0]], t, device=device), cond, domain)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return x


def save_teacher(teacher: DiffusionTeacher, directory: str | Path, card: str | None = None) -> Path:
    """Write the teacher as float16 `model.safetensors` + `config.json` (+ a model card)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in teacher.unet.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"kind": "diffusion_teacher", "config": dataclasses.asdict(teacher.config)}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if card is not None:
        (directory / CARD_FILE).write_text(card)
    return directory


def _config_from_dict(values: dict) -> TeacherConfig:
    values = dict(values)
    values["channel_multipliers"] = tuple(values["channel_multipliers"])
    return TeacherConfig(**values)


def load_teacher(directory: str | Path, device: str | torch.device = "cpu") -> DiffusionTeacher:
    """A frozen float32 teacher from a `save_teacher` folder."""
    directory = Path(directory)
    config = _config_from_dict(json.loads((directory / CONFIG_FILE).read_text())["config"])
    teacher = DiffusionTeacher(config)
    teacher.unet.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return teacher.to(device).eval().requires_grad_(False)


@dataclass
class TeacherData:
    """uint8 [N, 3, R, R] photos and their stylized versions, and [N, 1, R, R] Canny edges of the photos."""

    photos: torch.Tensor
    styled: torch.Tensor
    edges: torch.Tensor


def teacher_data_from_images(images: list[np.ndarray], style: str, resolution: int) -> TeacherData:
    """Stylize each [S, S, 3] uint8 crop at full size, then resize photo and style to `resolution` (area)."""
    def small(image):
        return cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_AREA)

    photos = np.stack([small(image) for image in images])
    styled = np.stack([small(stylize(image, style)) for image in images])
    photos_t = torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous()
    edges = ((canny_edges(photos_t.float() / 127.5 - 1) + 1) * 127.5).round().to(torch.uint8)
    return TeacherData(photos_t, torch.from_numpy(styled).permute(0, 3, 1, 2).contiguous(), edges)


def load_teacher_data(path: str | Path, split: str, style: str, resolution: int) -> TeacherData:
    """All crops of an archive split, stylized (takes seconds: the filters are cheap)."""
    from training.data.archive import load_archive

    archive = load_archive(path, split=split)
    return teacher_data_from_images([archive.image(i) for i in range(len(archive))], style, resolution)


class TeacherTrainer:
    """UNet, EMA teacher, Adam and the step counter of one run; `step()` is one denoising update."""

    def __init__(self, config: TeacherConfig, data: TeacherData | None, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.data = data
        torch.manual_seed(config.seed)
        self.model = DiffusionTeacher(config).to(self.device).train()
        self.ema = DiffusionTeacher(config).to(self.device).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.step_count = 0

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images in [-1, 1], edges or None, domain labels) drawn from (seed, step) only, half photos."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_count)
        index = torch.randint(len(self.data.photos), [cfg.batch], generator=generator)
        domain = (torch.rand([cfg.batch], generator=generator) < 0.5).long()
        flip = torch.rand([cfg.batch], generator=generator) < 0.5
        keep_cond = (torch.rand([cfg.batch], generator=generator) >= cfg.cond_drop).float()
        images = torch.where(domain.bool()[:, None, None, None], self.data.styled[index], self.data.photos[index])
        edges = self.data.edges[index]
        images = torch.where(flip[:, None, None, None], images.flip(-1), images).float() / 127.5 - 1
        edges = torch.where(flip[:, None, None, None], edges.flip(-1), edges).float() / 127.5 - 1
        edges = (edges + 1) * keep_cond[:, None, None, None] - 1  # dropped: all -1, i.e. "no edge anywhere"
        return images.to(self.device), edges.to(self.device), domain.to(self.device)

    def step(self) -> dict[str, float]:
        """One epsilon-MSE update and the EMA update."""
        images, edges, domain = self._batch()
        t = torch.randint(self.config.timesteps, [len(images)], device=self.device)
        noise = torch.randn_like(images)
        eps = self.model.score(self.model.add_noise(images, t, noise), t,
                               edges if self.config.cond_channels else None, domain)
        loss = F.mse_loss(eps, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
                p_ema.lerp_(p, 1 - self.config.ema_decay)
        self.step_count += 1
        return {"loss": float(loss.detach())}

    def save(self, run_dir: str | Path) -> None:
        """Checkpoint (model float32, EMA float16, Adam moments bfloat16), keeping the log and samples."""
        run_dir = Path(run_dir)
        save_checkpoint(run_dir, self.step_count, {"model": self.model, "ema": self.ema}, {"opt": self.optimizer},
                        {"config": dataclasses.asdict(self.config)}, module_dtypes={"ema": torch.float16},
                        moment_dtype=torch.bfloat16)

    def load(self, run_dir: str | Path) -> bool:
        restored = load_checkpoint(run_dir, {"model": self.model, "ema": self.ema}, {"opt": self.optimizer})
        if restored is None:
            return False
        self.step_count = restored[0]
        return True

    def sample_grid(self, path: str | Path, count: int = 8) -> None:
        """Rows: photos, their edges, EMA style samples conditioned on the edges, EMA photo samples."""
        count = min(count, len(self.data.photos))
        photos = self.data.photos[:count].float().to(self.device) / 127.5 - 1
        edges = self.data.edges[:count].float().to(self.device) / 127.5 - 1
        cond = edges if self.config.cond_channels else None
        generator = torch.Generator().manual_seed(0)
        styled = self.ema.sample(photos.shape, cond, STYLE, generator=generator)
        photo_samples = self.ema.sample(photos.shape, cond, PHOTO, generator=generator)
        rows = torch.stack([photos, edges.expand_as(photos), styled, photo_samples])  # [4, count, 3, R, R]
        pixels = ((rows + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()
        r = self.config.resolution
        Image.fromarray(pixels.permute(0, 3, 1, 4, 2).reshape(4 * r, count * r, 3).numpy()).save(path)


def read_run_config(run_dir: str | Path) -> TeacherConfig | None:
    stored = stored_config(run_dir)
    return None if stored is None else _config_from_dict(stored)


def train(trainer: TeacherTrainer, run_dir: str | Path, deadline: Deadline, max_steps: int | None = None,
          log_every: int = 100, save_every_s: float = 240.0) -> dict | None:
    """Steps until the deadline or `max_steps` more; log, save and sample. Returns the last log record."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    first_step, last_save, window_start, losses, record = trainer.step_count, time.monotonic(), time.monotonic(), [], None
    while not deadline.expired() and (max_steps is None or trainer.step_count - first_step < max_steps):
        losses.append(trainer.step()["loss"])
        if trainer.step_count % log_every == 0:
            seconds = time.monotonic() - window_start
            record = {"step": trainer.step_count, "loss": round(float(np.mean(losses)), 5),
                      "images_per_s": round(len(losses) * trainer.config.batch / max(seconds, 1e-9), 1),
                      "elapsed_s": round(deadline.elapsed_s, 1)}
            with open(run_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            window_start, losses = time.monotonic(), []
        if time.monotonic() - last_save > save_every_s:
            trainer.save(run_dir)
            last_save = time.monotonic()
    trainer.save(run_dir)
    trainer.sample_grid(run_dir / SAMPLES_FILE)
    return record


def _model_card(trainer: TeacherTrainer, record: dict | None) -> str:
    cfg = trainer.config
    parameters = sum(p.numel() for p in trainer.ema.parameters())
    return "\n".join([
        f"# Diffusion teacher `{cfg.style}` ({cfg.resolution} px)",
        "",
        "Training-only epsilon-prediction UNet of `training/diffusion_teacher.py` (EMA weights, float16): domain 0 ="
        f" archive photos, domain 1 = the same photos through `training.style_filters` `{cfg.style}`; edge"
        f" conditioning channels {cfg.cond_channels} (Canny of the photo, dropped {cfg.cond_drop}).",
        f"* Data: `{cfg.data}`, split `{cfg.split}`, x-flips. Parameters {parameters / 1e6:.2f} M.",
        f"* Recipe: cosine schedule, {cfg.timesteps} steps, batch {cfg.batch}, Adam lr {cfg.lr}, EMA {cfg.ema_decay},"
        f" seed {cfg.seed}; {trainer.step_count} steps.",
        f"* Last log line: `{json.dumps(record) if record else 'n/a'}`",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    defaults = TeacherConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (checkpoint, log, samples); resumed")
    parser.add_argument("--data", help="training archive (needed while training)")
    parser.add_argument("--style", default=defaults.style, help="training.style_filters name of a new run")
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--reserve-s", type=float, default=40.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=200)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--channels", type=int, default=defaults.channels)
    parser.add_argument("--resolution", type=int, default=defaults.resolution,
                        help="image size of a new run (the distillation tiles 2x2 grids of this size)")
    parser.add_argument("--cond-channels", type=int, default=defaults.cond_channels, choices=(0, 1))
    parser.add_argument("--export", help="write the EMA teacher here at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    run_dir = Path(args.run)
    config = read_run_config(run_dir)
    if config is None:
        if args.data is None:
            parser.error("--data is required to start a run")
        config = dataclasses.replace(defaults, style=args.style, batch=args.batch, lr=args.lr, channels=args.channels,
                                     resolution=args.resolution, cond_channels=args.cond_channels,
                                     data=str(args.data))
    else:
        print(f"resuming {run_dir}; its stored config is used", flush=True)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    data = None
    if args.minutes > 0:
        started = time.monotonic()
        data = load_teacher_data(args.data or config.data, config.split, config.style, config.resolution)
        print(f"{len(data.photos)} {config.style} pairs in {time.monotonic() - started:.1f} s", flush=True)
    trainer = TeacherTrainer(config, data, args.device)
    trainer.load(run_dir)
    record = None
    if args.minutes > 0:
        record = train(trainer, run_dir, deadline, max_steps=args.steps, log_every=args.log_every)
    if args.export:
        if record is None:
            record = last_log_record(run_dir)
        save_teacher(trainer.ema, args.export, _model_card(trainer, record))
        print(f"exported the EMA teacher to {args.export}", flush=True)


if __name__ == "__main__":
    main()
