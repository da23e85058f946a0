"""Train the photo -> W+ encoder (`core.nets.encoders.StyleEncoder`) against a frozen StyleGAN2 export, resumably.

    python -m training.train_encoder --generator weights/stylegan2_faces128 --data datasets/faces128.npz \
        --run runs/encoder128 --minutes 9
    python -m training.train_encoder --generator weights/stylegan2_faces128 --run runs/encoder128 --minutes 0 \
        --export weights/style_encoder_faces128

Recipe (e4e without its latent discriminator, which would not fit the size budget): each batch holds real
training crops and, with `synthetic_fraction`, generator samples whose W+ is known. Losses: pixel L2 of the
reconstruction, identity loss 1 - cos on the `core.identity` network (frozen), e4e's delta regulariser (squared
norm of the per-layer deltas) and, for the generator samples, L2 to the true W+. Progressive training switches on
one more per-layer delta every `progressive_steps` steps (0: all from the start). Adam, seeded data order.

The run folder is flat: `state.json` + `tensors-*.safetensors` (`training.resumable`; the encoder and Adam in
float32, 15.9 MiB at 128 px) and `log.jsonl`. A run resumes from it; its stored config wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from core.nets import CONFIG_FILE, WEIGHTS_FILE, load_generator
from core.nets.encoders import StyleEncoder, style_encoder_config
from training.resumable import LOG_FILE, Deadline, last_log_record, load_checkpoint, save_checkpoint, stored_config

CARD_FILE = "README.md"


@dataclass
class EncoderTrainConfig:
    """Recipe of an encoder run (stored in the checkpoint)."""

    generator: str = ""
    data: str = ""
    split: str = "train"
    identity: str = "identity-resnet"
    batch: int = 16
    lr: float = 2e-4
    pixel_weight: float = 1.0
    identity_weight: float = 0.5
    delta_weight: float = 2e-4
    latent_weight: float = 1.0
    synthetic_fraction: float = 0.5
    progressive_steps: int = 400
    mirror: bool = True
    seed: int = 0
    encoder_overrides: dict = dataclasses.field(default_factory=dict)


class EncoderTrainer:
    """The encoder, its optimizer and the frozen generator and identity network of one run."""

    def __init__(self, config: EncoderTrainConfig, generator: torch.nn.Module, identity: torch.nn.Module,
                 images: torch.Tensor | None, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.identity = identity.to(self.device).eval().requires_grad_(False)
        resolution = generator.img_resolution
        if images is not None and images.shape[-1] != resolution:
            images = F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                                   align_corners=False).round().clamp(0, 255).to(torch.uint8)
        self.images = images.to(self.device) if images is not None else None
        torch.manual_seed(config.seed)
        encoder_config = style_encoder_config(generator.num_ws, generator.w_dim, resolution,
                                              **config.encoder_overrides)
        self.encoder = StyleEncoder(encoder_config).to(self.device).train()
        with torch.no_grad():
            self.encoder.w_avg.copy_(generator.mapping.w_avg)
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=config.lr, betas=(0.9, 0.999))
        self.step_count = 0
        self._update_stage()

    def _update_stage(self) -> None:
        last = self.encoder.num_ws - 1
        steps = self.config.progressive_steps
        self.encoder.delta_layers = last if steps <= 0 else min(last, self.step_count // steps)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Real crops then generator samples (in [-1, 1]) and the true W+ of the samples."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step_count)
        synthetic = int(round(self.config.batch * self.config.synthetic_fraction)) if self.images is not None \
            else self.config.batch
        real = self.config.batch - synthetic
        index = torch.randint(self.images.shape[0], [real], generator=generator) if real else torch.zeros(0).long()
        mirror = torch.rand([real], generator=generator) < (0.5 if self.config.mirror else 0.0)
        z = torch.randn([synthetic, self.generator.z_dim], generator=generator).to(self.device)
        parts = []
        if real:
            images = self.images[index.to(self.device)].float() / 127.5 - 1
            parts.append(torch.where(mirror.to(self.device).view(-1, 1, 1, 1), images.flip(-1), images))
        with torch.no_grad():
            c = torch.zeros([synthetic, self.generator.c_dim], device=self.device)
            ws_true = self.generator.mapping(z, c)
            if synthetic:
                parts.append(self.generator.synthesis(ws_true, noise_mode="const").clamp(-1, 1))
        return torch.cat(parts), ws_true

    def step(self) -> dict[str, float]:
        """One Adam step; returns the loss terms."""
        cfg = self.config
        targets, ws_true = self._batch()
        base, deltas = self.encoder.offsets(targets)
        ws = self.encoder.w_avg + base[:, None, :] + deltas
        reconstruction = self.generator.synthesis(ws, noise_mode="const")
        pixel = F.mse_loss(reconstruction, targets)
        with torch.no_grad():
            target_embedding = self.identity.embed_aligned(targets)
        identity = (1 - (self.identity.embed_aligned(reconstruction) * target_embedding).sum(dim=1)).mean()
        delta = deltas.square().sum(dim=2).sum(dim=1).mean()
        latent = F.mse_loss(ws[ws.shape[0] - ws_true.shape[0]:], ws_true) if ws_true.shape[0] else ws.new_zeros(())
        loss = cfg.pixel_weight * pixel + cfg.identity_weight * identity + cfg.delta_weight * delta \
            + cfg.latent_weight * latent
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        stage = self.encoder.delta_layers
        self._update_stage()
        return {"loss": loss.item(), "pixel": pixel.item(), "identity": identity.item(), "delta": delta.item(),
                "latent": latent.item(), "delta_layers": stage}

    # ---- checkpoints and export ----------------------------------------------------------------------------

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
        self._update_stage()
        return True

    def export(self, directory: str | Path, log: dict | None = None) -> Path:
        """Write the encoder in the bundled format (`model.safetensors` float16, `config.json`, model card)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.encoder.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {**self.encoder.config, "delta_layers": self.encoder.delta_layers,
                  "training": {"recipe": dataclasses.asdict(self.config), "steps": self.step_count}}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        (directory / CARD_FILE).write_text(model_card(self, log))
        return directory


def model_card(trainer: EncoderTrainer, log: dict | None) -> str:
    cfg = trainer.config
    parameters = sum(p.numel() for p in trainer.encoder.parameters())
    return "\n".join([
        "# Style encoder: aligned face crop -> W+",
        "",
        "`core.nets.encoders.StyleEncoder` (e4e-style: feature pyramid, base code + per-layer deltas from w_avg)"
        " trained by `training/train_encoder.py` against the frozen generator"
        f" `{cfg.generator}`. Only valid with that generator (its w_avg is stored in the weights).",
        "",
        f"* **Data:** `{cfg.data}`, split `{cfg.split}`, x-flips {'on' if cfg.mirror else 'off'}, generator samples"
        f" {cfg.synthetic_fraction:.0%} of each batch. Check the data licences before sharing.",
        f"* **Architecture:** {parameters / 1e6:.2f} M parameters, float16 weights, input"
        f" {trainer.encoder.input_size} px, {trainer.encoder.num_ws} x {trainer.encoder.w_dim} codes,"
        f" {trainer.encoder.delta_layers} deltas active.",
        f"* **Recipe:** Adam lr {cfg.lr}, batch {cfg.batch}, pixel L2 {cfg.pixel_weight}, identity"
        f" ({cfg.identity}) {cfg.identity_weight}, delta {cfg.delta_weight}, latent L2 {cfg.latent_weight}, one more"
        f" delta every {cfg.progressive_steps} steps, seed {cfg.seed}; no latent discriminator.",
        f"* **Iterations:** {trainer.step_count} steps.",
        f"* **Last training log line:** `{json.dumps(log) if log else 'n/a'}`",
        "* **Evaluation:** run `python -m training.eval_encoder ... --card` to add identity similarity and PSNR on"
        " the test split.",
        "",
    ])


def read_run_config(run_dir: str | Path) -> EncoderTrainConfig | None:
    """The config stored in a run folder's checkpoint, or None."""
    stored = stored_config(run_dir)
    return None if stored is None else EncoderTrainConfig(**stored)


def train(trainer: EncoderTrainer, run_dir: str | Path, deadline: Deadline, max_steps: int | None = None,
          log_every: int = 50, save_every_s: float = 240.0) -> dict | None:
    """Steps until the deadline or `max_steps` more steps; log, save periodically and at the end."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    first_step, last_save, window_start = trainer.step_count, time.monotonic(), time.monotonic()
    record, sums, window_steps = None, {}, 0
    while not deadline.expired() and (max_steps is None or trainer.step_count - first_step < max_steps):
        for key, value in trainer.step().items():
            sums[key] = sums.get(key, 0.0) + value
        window_steps += 1
        if trainer.step_count % log_every == 0:
            seconds = time.monotonic() - window_start
            record = {"step": trainer.step_count, **{k: round(v / window_steps, 5) for k, v in sums.items()},
                      "images_per_s": round(window_steps * trainer.config.batch / max(seconds, 1e-9), 2),
                      "elapsed_s": round(deadline.elapsed_s, 1)}
            with open(run_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            window_start, sums, window_steps = time.monotonic(), {}, 0
        if time.monotonic() - last_save > save_every_s:
            trainer.save(run_dir)
            last_save = time.monotonic()
    trainer.save(run_dir)
    return record


def main(argv: list[str] | None = None) -> None:
    from core.beauty import load_identity_encoder
    from training.train_stylegan2 import configure_device, images_from_archive

    defaults = EncoderTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="frozen generator export (core.nets.load_generator)")
    parser.add_argument("--run", required=True, help="run folder; resumed if present")
    parser.add_argument("--data", help="training archive; not needed for --minutes 0 --export")
    parser.add_argument("--split", default=defaults.split)
    parser.add_argument("--identity", default=defaults.identity, help="registry name of the identity network")
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--reserve-s", type=float, default=45.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--export", help="write the encoder in the bundled format here at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in ("batch", "lr", "pixel_weight", "identity_weight", "delta_weight", "latent_weight",
                 "synthetic_fraction", "progressive_steps", "seed"):
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--mirror", type=lambda s: s.lower() in ("1", "true", "yes"), default=defaults.mirror)
    parser.add_argument("--encoder-channels", type=lambda s: [int(c) for c in s.split(",")], default=None,
                        help="backbone widths, e.g. 32,48,96,128,128 (default: core.nets.encoders)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    configure_device(device)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    config = read_run_config(args.run)
    if config is None:
        if args.data is None and args.minutes > 0:
            parser.error("--data is required to start a run")
        fields = {f.name for f in dataclasses.fields(EncoderTrainConfig)}
        config = EncoderTrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
        if args.encoder_channels:
            config.encoder_overrides = {"channels": args.encoder_channels}
    else:
        print(f"resuming {args.run}; its stored config is used", flush=True)
    config = dataclasses.replace(config, generator=args.generator, data=args.data or config.data)
    generator = load_generator(args.generator, device)
    images = None
    if args.minutes > 0:
        images = images_from_archive(config.data, split=config.split).images
        print(f"{images.shape[0]} training images of {images.shape[-1]} px", flush=True)
    trainer = EncoderTrainer(config, generator, load_identity_encoder(config.identity), images, device)
    trainer.load(args.run)
    record = None
    if images is not None:
        record = train(trainer, args.run, deadline, max_steps=args.steps, log_every=args.log_every)
    if args.export:
        if record is None:
            record = last_log_record(Path(args.run))
        trainer.export(args.export, record)
        print(f"exported the encoder to {args.export}", flush=True)


if __name__ == "__main__":
    main()
