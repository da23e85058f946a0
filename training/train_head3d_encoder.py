"""Train the photo -> W+ encoder of the 3D head generator (`core.nets.encoders.Head3DEncoder`), resumably.

    python -m training.train_head3d_encoder --generator weights/head3d_faces128 \
        --data datasets/faces/faces128.npz --run runs/head3d_encoder --minutes 9
    python -m training.train_head3d_encoder --generator weights/head3d_faces128 --run runs/head3d_encoder \
        --minutes 0 --export weights/head3d_encoder_faces128

Recipe (the 2D e4e recipe of `training/train_encoder.py`, made multi-view): a batch holds real training crops with
their archive camera labels and, with `synthetic_fraction`, the frozen generator's own renders of random latents
(truncation `truncation_psi`, frontal conditioning as in `core.pipelines.head3d`) from random cameras (yaw within
+-`view_yaw`, pitch within +-`view_pitch`), whose W+ and camera are known. The encoder sees each crop with its
camera. Losses: pixel L2 and identity loss (1 - cos on the frozen `core.identity` network) of the render at the
input camera; L2 to the true W+ for the synthetic samples; e4e's delta regulariser; and the multi-view identity
consistency: the inverted latent rendered from another random camera must keep the input's identity (weight
`multiview_weight`). The generator and identity network are frozen; Adam; seeded data order and cameras.

The run folder is flat (`training.resumable`: `state.json`, `tensors-*.safetensors`, `log.jsonl`); the stored
config wins when a run resumes. The export is float16 `model.safetensors` + `config.json` + model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from core.nets import CONFIG_FILE, WEIGHTS_FILE, load_generator
from core.nets.camera import camera_label
from core.nets.encoders import Head3DEncoder, head3d_encoder_config
from training.resumable import Deadline, last_log_record, load_checkpoint, save_checkpoint, stored_config
from training.train_encoder import train

CARD_FILE = "README.md"


@dataclass
class Head3DEncoderConfig:
    """Recipe of a 3D head encoder run (stored in the checkpoint)."""

    generator: str = ""
    data: str = ""
    split: str = "train"
    identity: str = "identity-resnet"
    batch: int = 8
    lr: float = 2e-4
    pixel_weight: float = 1.0
    identity_weight: float = 0.5
    multiview_weight: float = 0.5
    latent_weight: float = 1.0
    delta_weight: float = 2e-4
    synthetic_fraction: float = 0.5
    truncation_psi: float = 0.7
    view_yaw: float = 40.0
    view_pitch: float = 15.0
    mirror: bool = True
    seed: int = 0
    encoder_overrides: dict = dataclasses.field(default_factory=dict)


def random_cameras(count: int, max_yaw: float, max_pitch: float, generator: torch.Generator, radius: float,
                   pivot) -> torch.Tensor:
    """[count, 25] labels of cameras with yaw and pitch uniform in +-max_yaw, +-max_pitch degrees."""
    angles = (torch.rand([count, 2], generator=generator) * 2 - 1) * torch.tensor([max_yaw, max_pitch])
    return torch.cat([camera_label(float(yaw), float(pitch), radius=radius, lookat=pivot) for yaw, pitch in angles])


def render(generator: torch.nn.Module, ws: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
    """Deterministic renders [B, 3, S, S] of W+ codes from camera labels (what the losses compare)."""
    return generator.synthesis(ws, cameras, deterministic=True, noise_mode="const")["image"]


def identity_distance(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine) of unit identity embeddings to their references, row by row."""
    return (1 - (embeddings * reference).sum(dim=1)).mean()


def delta_penalty(deltas: torch.Tensor) -> torch.Tensor:
    """e4e's delta regulariser: the squared norm of the per-layer offsets, summed over layers, batch mean."""
    return deltas.square().sum(dim=2).sum(dim=1).mean()


def latent_loss(ws: torch.Tensor, ws_true: torch.Tensor) -> torch.Tensor:
    """L2 to the true W+ of the synthetic samples, which come last in a batch (zero without any)."""
    count = ws_true.shape[0]
    return F.mse_loss(ws[len(ws) - count:], ws_true) if count else ws.new_zeros(())


class Head3DEncoderTrainer:
    """The encoder, its optimizer, the frozen tri-plane generator and identity network of one run."""

    def __init__(self, config: Head3DEncoderConfig, generator: torch.nn.Module, identity: torch.nn.Module,
                 images: torch.Tensor | None = None, cameras: torch.Tensor | None = None,
                 mirrored_cameras: torch.Tensor | None = None, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.identity = identity.to(self.device).eval().requires_grad_(False)
        self.images = images.to(self.device) if images is not None else None
        self.cameras = cameras.to(self.device) if cameras is not None else None
        self.mirrored_cameras = mirrored_cameras.to(self.device) if mirrored_cameras is not None else None
        rendering = generator.rendering_kwargs
        self.radius = float(rendering.get("avg_camera_radius", 2.7))
        self.pivot = tuple(rendering.get("avg_camera_pivot", (0.0, 0.0, 0.2)))
        torch.manual_seed(config.seed)
        self.encoder = Head3DEncoder(head3d_encoder_config(
            generator.backbone.num_ws, generator.w_dim, generator.img_resolution, **config.encoder_overrides,
        )).to(self.device).train()
        with torch.no_grad():
            self.encoder.w_avg.copy_(generator.backbone.mapping.w_avg)
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=config.lr, betas=(0.9, 0.999))
        self.step_count = 0

    def _cameras(self, count: int, generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        return random_cameras(count, cfg.view_yaw, cfg.view_pitch, generator, self.radius, self.pivot).to(self.device)

    def _batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(crops in [-1, 1]: real then synthetic, their cameras, the synthetic samples' true W+)."""
        cfg = self.config
        synthetic = cfg.batch if self.images is None else int(round(cfg.batch * cfg.synthetic_fraction))
        real = cfg.batch - synthetic
        images, cameras = [], []
        if real:
            index = torch.randint(self.images.shape[0], [real], generator=generator).to(self.device)
            mirror = (torch.rand([real], generator=generator) < (0.5 if cfg.mirror else 0.0)).to(self.device)
            crops = self.images[index].float() / 127.5 - 1
            images.append(torch.where(mirror.view(-1, 1, 1, 1), crops.flip(-1), crops))
            cameras.append(torch.where(mirror[:, None], self.mirrored_cameras[index], self.cameras[index]))
        z = torch.randn([synthetic, self.generator.z_dim], generator=generator).to(self.device)
        with torch.no_grad():
            frontal = camera_label(0, 0, radius=self.radius, lookat=self.pivot).to(self.device)
            ws_true = self.generator.mapping(z, frontal.expand(synthetic, -1), truncation_psi=cfg.truncation_psi)
            if synthetic:
                synthetic_cameras = self._cameras(synthetic, generator)
                images.append(render(self.generator, ws_true, synthetic_cameras).clamp(-1, 1))
                cameras.append(synthetic_cameras)
        return torch.cat(images), torch.cat(cameras), ws_true

    def encode(self, images: torch.Tensor, cameras: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W+ codes, the encoder's per-layer deltas) of input crops seen from their cameras."""
        base, deltas = self.encoder.offsets(images)
        base = base + self.encoder.camera_offset(cameras)
        return self.encoder.w_avg + base[:, None, :] + deltas, deltas

    def step(self) -> dict[str, float]:
        """One Adam step; returns the loss terms."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_count)
        targets, cameras, ws_true = self._batch(generator)
        ws, deltas = self.encode(targets, cameras)
        reconstruction = render(self.generator, ws, cameras)
        novel = render(self.generator, ws, self._cameras(len(targets), generator))
        with torch.no_grad():
            target_embedding = self.identity.embed_aligned(targets)
        pixel = F.mse_loss(reconstruction, targets)
        identity = identity_distance(self.identity.embed_aligned(reconstruction), target_embedding)
        multiview = identity_distance(self.identity.embed_aligned(novel), target_embedding)
        delta = delta_penalty(deltas)
        latent = latent_loss(ws, ws_true)
        loss = cfg.pixel_weight * pixel + cfg.identity_weight * identity + cfg.multiview_weight * multiview \
            + cfg.latent_weight * latent + cfg.delta_weight * delta
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return {"loss": loss.item(), "pixel": pixel.item(), "identity": identity.item(),
                "multiview": multiview.item(), "latent": latent.item(), "delta": delta.item()}

    def save(self, run_dir: str | Path) -> None:
        """Write the checkpoint into `run_dir` (its log and other files stay)."""
        save_checkpoint(run_dir, self.step_count, {"encoder": self.encoder}, {"encoder": self.optimizer},
                        {"config": dataclasses.asdict(self.config)})

    def load(self, run_dir: str | Path) -> bool:
        """Restore from `run_dir`; False when it holds no checkpoint."""
        restored = load_checkpoint(run_dir, {"encoder": self.encoder}, {"encoder": self.optimizer})
        if restored is None:
            return False
        self.step_count = restored[0]
        return True

    def export(self, directory: str | Path, log: dict | None = None) -> Path:
        """Write the encoder in the bundled format (`model.safetensors` float16, `config.json`, model card)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.encoder.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {**self.encoder.config,
                  "training": {"recipe": dataclasses.asdict(self.config), "steps": self.step_count}}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        (directory / CARD_FILE).write_text(model_card(self, log))
        return directory


def model_card(trainer: Head3DEncoderTrainer, log: dict | None) -> str:
    cfg = trainer.config
    parameters = sum(p.numel() for p in trainer.encoder.parameters())
    return "\n".join([
        "# 3D head encoder (photo + camera -> W+ of the 3D head generator)",
        "",
        "`core.nets.encoders.Head3DEncoder` trained by `training/train_head3d_encoder.py`.",
        "",
        f"* **Generator (frozen):** `{cfg.generator}`; identity network `{cfg.identity}` (frozen).",
        f"* **Data:** `{cfg.data}`, split `{cfg.split}` with its camera labels, plus the generator's own renders"
        f" (synthetic fraction {cfg.synthetic_fraction}, psi {cfg.truncation_psi}, yaw +-{cfg.view_yaw},"
        f" pitch +-{cfg.view_pitch}).",
        f"* **Losses:** pixel {cfg.pixel_weight}, identity {cfg.identity_weight}, multi-view identity"
        f" {cfg.multiview_weight}, latent {cfg.latent_weight}, delta {cfg.delta_weight}; batch {cfg.batch},"
        f" Adam lr {cfg.lr}, seed {cfg.seed}.",
        f"* **Size:** {parameters / 1e6:.2f} M parameters, float16 weights. **Iterations:** {trainer.step_count}.",
        f"* **Last training log line:** `{json.dumps(log) if log else 'n/a'}`",
        "* **Quality metrics:** `python -m training.eval_head3d --encoder <this folder>` (photo inversion identity).",
        "",
    ])


def read_run_config(run_dir: str | Path) -> Head3DEncoderConfig | None:
    """The config stored in a run folder's checkpoint, or None."""
    stored = stored_config(run_dir)
    return None if stored is None else Head3DEncoderConfig(**stored)


def main(argv: list[str] | None = None) -> None:
    from core.beauty import load_identity_encoder
    from training.train_stylegan2 import configure_device, images_from_archive

    defaults = Head3DEncoderConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="frozen head3d export (core.nets.load_generator)")
    parser.add_argument("--run", required=True, help="run folder; resumed if present")
    parser.add_argument("--data", help="training archive with camera labels; not needed for --minutes 0 --export")
    parser.add_argument("--split", default=defaults.split)
    parser.add_argument("--identity", default=defaults.identity, help="registry name of the identity network")
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--reserve-s", type=float, default=45.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--export", help="write the encoder in the bundled format here at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in ("batch", "lr", "pixel_weight", "identity_weight", "multiview_weight", "latent_weight",
                 "delta_weight", "synthetic_fraction", "truncation_psi", "view_yaw", "view_pitch", "seed"):
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--mirror", type=lambda s: s.lower() in ("1", "true", "yes"), default=defaults.mirror)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    configure_device(device, benchmark=False)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    config = read_run_config(args.run)
    if config is None:
        if args.data is None and args.minutes > 0:
            parser.error("--data is required to start a run")
        fields = {f.name for f in dataclasses.fields(Head3DEncoderConfig)}
        config = Head3DEncoderConfig(**{k: v for k, v in vars(args).items() if k in fields})
    else:
        print(f"resuming {args.run}; its stored config is used", flush=True)
    config = dataclasses.replace(config, generator=args.generator, data=args.data or config.data)
    generator = load_generator(args.generator, device)
    data = None
    if args.minutes > 0:
        data = images_from_archive(config.data, split=config.split, label_key="camera")
        print(f"{data.images.shape[0]} training crops of {data.images.shape[-1]} px", flush=True)
    trainer = Head3DEncoderTrainer(config, generator, load_identity_encoder(config.identity),
                                   *((data.images, data.labels, data.mirrored_labels) if data else ()), device=device)
    trainer.load(args.run)
    record = None
    if data is not None:
        record = train(trainer, args.run, deadline, max_steps=args.steps, log_every=args.log_every)
    if args.export:
        if record is None:
            record = last_log_record(Path(args.run))
        trainer.export(args.export, record)
        print(f"exported the encoder to {args.export}", flush=True)


if __name__ == "__main__":
    main()
