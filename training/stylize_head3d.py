"""Identity-preserving 3D head stylization by multiview score distillation (docs/methods.md section 3), in chunks.

    python -m training.stylize_head3d --base weights/head3d_faces128 --teacher runs/teacher_toon/export \
        --style toon --run runs/style_toon --minutes 9 [--objective ld|sds] [--export weights/head3d_style_toon]

A copy of the base `TriPlaneGenerator` is fine-tuned; as in the paper only the backbone synthesis and the
super-resolution train, without their biases (mapping, decoder, raw ToRGB, background and t_mapping stay frozen).
Each step, per latent (z, truncation 0.75, frontal conditioning):

* Multiview grid: 4 views at stratified random yaws in [-yaw_range, yaw_range] and pitches in +-pitch_range, the
  final images resized to the teacher's resolution and tiled 2x2. The teacher (`training.diffusion_teacher`) is
  conditioned on the Canny edges of the frozen copy's grid (the paper's ControlNet on the frozen renders).
* Noise at t in [t_min, t_max] x T (low noise, like the paper's DDIM start index 35-49 of 50).
  `ld`: gradient = guidance (eps_style - eps_photo) sqrt(alpha_bar_t), the paper's likelihood distillation with the
  photo domain as the unconditional branch. `sds`: gradient = (eps_cfg - noise) sqrt(1 - alpha_bar_t), with
  eps_cfg = eps_photo + guidance (eps_style - eps_photo).
* Score rank weighing: per sample, the C x HW gradient is rebuilt from its top singular values weighted
  1, 0.75, 0.5, 0.25, then re-standardised to the original's per-channel mean and std.
* The gradient is multiplied by the frozen copy's opacity, clamped to +-1 and injected into the renders
  (loss = sum(gradient * render)); mirror gradients: the views rendered from the mirrored cameras (-yaw) get the
  x-flipped gradient (weights 1 - mirror_weight and mirror_weight).
* Identity reference: 1 - identity cosine (`core.identity`) between the tuned and frozen renders of the views
  with |yaw| <= identity_max_yaw. Mask reference: mean |opacity - frozen opacity|.

Not reproduced: the paper's Tweedie x0 MSE, LPIPS and LDIS losses, the single-view branch and DepthAnything depth
conditioning (our teacher is conditioned on edges only). Export = a `core.nets.style_delta` delta over the base
(`rank`-r factors of the changed weights), with identity metrics in the model card.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from core.beauty import load_identity_encoder
from core.identity import IdentityEncoder
from core.nets import load_generator
from core.nets.camera import camera_label
from core.nets.style_delta import make_style_delta, save_style_delta
from core.nets.triplane import TriPlaneGenerator
from training.diffusion_teacher import PHOTO, STYLE, DiffusionTeacher, canny_edges, load_teacher
from training.eval.metrics import mean_cross_cosine
from training.resumable import LOG_FILE, Deadline, last_log_record, load_checkpoint, save_checkpoint, stored_config

SAMPLES_FILE = "samples.png"
CARD_FILE = "README.md"
GRID_VIEWS = 4
TRAINED_PREFIXES = ("backbone.synthesis.", "superresolution.")
RANK_WEIGHTS = (1.0, 0.75, 0.5, 0.25)
EVAL_YAWS = (-30, 0, 30)


@dataclass
class StylizeConfig:
    """Recipe of a stylization run (stored in the checkpoint; the stored one wins when resuming)."""

    style: str = "toon"
    objective: str = "ld"  # "ld" (likelihood distillation) or "sds"
    base: str = ""
    teacher: str = ""
    base_name: str = "head3d-faces128"
    batch: int = 1
    lr: float = 1e-4
    guidance: float = 7.5
    t_min: float = 0.02
    t_max: float = 0.3
    yaw_range: float = 60.0
    pitch_range: float = 10.0
    truncation_psi: float = 0.75
    mirror_weight: float = 0.25
    rank_weighing: bool = True
    gradient_clamp: float = 1.0
    identity_weight: float = 0.5
    identity_max_yaw: float = 45.0
    mask_weight: float = 1.0
    delta_rank: int = 8
    seed: int = 0


def trainable_names(generator: torch.nn.Module) -> list[str]:
    """Parameters the paper fine-tunes: backbone synthesis and super-resolution, biases excluded."""
    return [name for name, _ in generator.named_parameters()
            if name.startswith(TRAINED_PREFIXES) and not name.endswith(".bias")]


def tile_grid(views: torch.Tensor) -> torch.Tensor:
    """[B * 4, C, S, S] (views of one latent consecutive) -> [B, C, 2S, 2S] 2x2 grids."""
    n, c, s, _ = views.shape
    return views.reshape(n // 4, 2, 2, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(n // 4, c, 2 * s, 2 * s)


def untile_grid(grids: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_grid`."""
    b, c, h, _ = grids.shape
    s = h // 2
    return grids.reshape(b, c, 2, s, 2, s).permute(0, 2, 4, 1, 3, 5).reshape(b * 4, c, s, s)


def rank_weighed(score: torch.Tensor, weights=RANK_WEIGHTS) -> torch.Tensor:
    """Score rank weighing: per sample, rebuild C x HW from its top singular values times `weights`, then give it
    the original's per-channel mean and std (instance normalisation)."""
    b, c, h, w = score.shape
    matrix = score.reshape(b, c, h * w).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(len(weights), s.shape[1])
    s_weighed = s[:, :k] * torch.tensor(weights[:k], device=score.device)
    rebuilt = (u[:, :, :k] * s_weighed[:, None]) @ vh[:, :k]
    mean, std = matrix.mean(2, keepdim=True), matrix.std(2, keepdim=True)
    rebuilt = (rebuilt - rebuilt.mean(2, keepdim=True)) / rebuilt.std(2, keepdim=True).clamp_min(1e-8) * std + mean
    return rebuilt.reshape(b, c, h, w).to(score.dtype)


def distillation_gradient(teacher: DiffusionTeacher, grid: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
                          noise: torch.Tensor, objective: str, guidance: float) -> torch.Tensor:
    """The image-space gradient of LD (guidance (eps_style - eps_photo) sqrt(ab)) or SDS ((eps_cfg - noise)
    sqrt(1 - ab)) for clean grids [B, 3, H, W] at timesteps t [B]."""
    with torch.no_grad():
        x_t = teacher.add_noise(grid, t, noise)
        eps_style = teacher.score(x_t, t, cond, STYLE)
        eps_photo = teacher.score(x_t, t, cond, PHOTO)
        alpha_bar = teacher.alpha_bar[t].reshape(-1, 1, 1, 1)
        if objective == "ld":
            return guidance * (eps_style - eps_photo) * alpha_bar.sqrt()
        if objective == "sds":
            return (eps_photo + guidance * (eps_style - eps_photo) - noise) * (1 - alpha_bar).sqrt()
    raise ValueError(f"objective must be 'ld' or 'sds', got {objective!r}")


def render_views(generator: TriPlaneGenerator, ws: torch.Tensor, yaws: torch.Tensor, pitches: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """Deterministic renders of ws [N, L, W] from cameras (yaw, pitch) degrees [N] (camera at the origin's orbit)."""
    cameras = torch.cat([camera_label(float(y), float(p)) for y, p in zip(yaws, pitches)]).to(ws.device)
    return generator.synthesis(ws, cameras, noise_mode="const", deterministic=True)


class StylizeTrainer:
    """Frozen base, tuned copy, teacher, identity encoder and Adam of one run; `step()` is one distillation update."""

    def __init__(self, config: StylizeConfig, base: TriPlaneGenerator, teacher: DiffusionTeacher,
                 identity: IdentityEncoder | None, device: str | torch.device = "cpu"):
        if config.objective not in ("ld", "sds"):
            raise ValueError(f"objective must be 'ld' or 'sds', got {config.objective!r}")
        self.config = config
        self.device = torch.device(device)
        self.frozen = base.to(self.device).eval().requires_grad_(False)
        self.tuned = copy.deepcopy(self.frozen).train()
        names = set(trainable_names(self.tuned))
        for name, parameter in self.tuned.named_parameters():
            parameter.requires_grad_(name in names)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.identity = identity.to(self.device).eval().requires_grad_(False) if identity is not None else None
        self.optimizer = torch.optim.Adam([p for p in self.tuned.parameters() if p.requires_grad], lr=config.lr,
                                          betas=(0.9, 0.99))
        self.step_count = 0

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z [B, z_dim], yaws [B*4], pitches [B*4], t [B]) from (seed, step) only: stratified yaws per grid."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_count)
        z = torch.randn([cfg.batch, self.frozen.z_dim], generator=generator)
        strata = torch.arange(GRID_VIEWS).repeat(cfg.batch)
        yaws = ((strata + torch.rand(len(strata), generator=generator)) / GRID_VIEWS * 2 - 1) * cfg.yaw_range
        pitches = (torch.rand(len(strata), generator=generator) * 2 - 1) * cfg.pitch_range
        steps = self.teacher.config.timesteps
        t = (torch.rand(cfg.batch, generator=generator) * (cfg.t_max - cfg.t_min) + cfg.t_min) * (steps - 1)
        return z.to(self.device), yaws, pitches, t.round().long().to(self.device)

    def latents(self, z: torch.Tensor) -> torch.Tensor:
        """ws of z through the (frozen) mapping with frontal conditioning and the run's truncation."""
        frontal = camera_label(0, 0).to(self.device).expand(len(z), -1)
        return self.frozen.mapping(z, frontal, truncation_psi=self.config.truncation_psi)

    def step(self) -> dict[str, float]:
        """One distillation update; returns scalar stats."""
        cfg = self.config
        z, yaws, pitches, t = self._draw()
        ws = self.latents(z).repeat_interleave(GRID_VIEWS, 0)
        tile = self.teacher.config.resolution

        def to_tiles(images):
            return F.interpolate(images, size=(tile, tile), mode="bilinear", align_corners=False, antialias=True)

        with torch.no_grad():
            reference = render_views(self.frozen, ws, yaws, pitches)
            cond = tile_grid(canny_edges(to_tiles(reference["image"]))) if self.teacher.config.cond_channels else None
            opacity = tile_grid(to_tiles(reference["image_mask"].clamp(0, 1)))
        out = render_views(self.tuned, ws, yaws, pitches)
        tiles = to_tiles(out["image"])
        grid = tile_grid(tiles)
        noise = torch.randn(grid.shape, generator=torch.Generator().manual_seed(cfg.seed + 7 * self.step_count))
        gradient = distillation_gradient(self.teacher, grid.detach(), cond, t, noise.to(self.device), cfg.objective,
                                         cfg.guidance)
        if cfg.rank_weighing:
            gradient = rank_weighed(gradient)
        gradient = torch.nan_to_num(gradient * opacity).clamp(-cfg.gradient_clamp, cfg.gradient_clamp)
        view_gradient = untile_grid(gradient)
        normaliser = view_gradient[0].numel()
        distill = (view_gradient * tiles).sum() / normaliser * (1 - cfg.mirror_weight)
        if cfg.mirror_weight > 0:
            mirrored = render_views(self.tuned, ws, -yaws, pitches)
            distill = distill + (view_gradient.flip(-1) * to_tiles(mirrored["image"])).sum() / normaliser * cfg.mirror_weight
        loss = distill
        stats = {"gradient_abs": float(gradient.abs().mean()), "t": float(t.float().mean())}
        if self.identity is not None and cfg.identity_weight > 0:
            near = (yaws.abs() <= cfg.identity_max_yaw).to(self.device)
            if near.any():
                cosine = F.cosine_similarity(self.identity.embed_aligned(out["image"][near]),
                                             self.identity.embed_aligned(reference["image"][near]), dim=-1)
                loss = loss + cfg.identity_weight * (1 - cosine).mean()
                stats["identity_cosine"] = float(cosine.detach().mean())
        if cfg.mask_weight > 0 and "image_mask" in out:
            mask_loss = (out["image_mask"] - reference["image_mask"]).abs().mean()
            loss = loss + cfg.mask_weight * mask_loss
            stats["mask_l1"] = float(mask_loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for parameter in self.optimizer.param_groups[0]["params"]:
            if parameter.grad is not None:
                torch.nan_to_num_(parameter.grad, nan=0, posinf=0, neginf=0)
        self.optimizer.step()
        self.step_count += 1
        return stats

    # ---- checkpoints, samples, export ----------------------------------------------------------------------

    def save(self, run_dir: str | Path) -> None:
        """Checkpoint: the tuned generator (float32) and Adam (bfloat16 moments), keeping the log and samples."""
        run_dir = Path(run_dir)
        save_checkpoint(run_dir, self.step_count, {"tuned": self.tuned}, {"opt": self.optimizer},
                        {"config": dataclasses.asdict(self.config)}, moment_dtype=torch.bfloat16)

    def load(self, run_dir: str | Path) -> bool:
        restored = load_checkpoint(run_dir, {"tuned": self.tuned}, {"opt": self.optimizer})
        if restored is None:
            return False
        self.step_count = restored[0]
        return True

    @torch.no_grad()
    def sample_grid(self, path: str | Path, seeds=range(3), yaws=(-45, 0, 45)) -> None:
        """Rows per seed: base then stylized renders at `yaws` (columns), one PNG."""
        from PIL import Image

        z = torch.stack([torch.randn([self.frozen.z_dim], generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(self.device)
        ws = self.latents(z).repeat_interleave(len(yaws), 0)
        yaw_list = torch.tensor(yaws, dtype=torch.float32).repeat(len(seeds))
        rows = [render_views(g.eval(), ws, yaw_list, torch.zeros_like(yaw_list))["image"]
                for g in (self.frozen, self.tuned)]
        self.tuned.train()
        size = rows[0].shape[-1]
        images = torch.stack(rows, 1).reshape(len(seeds), len(yaws), 2, 3, size, size).permute(0, 2, 1, 3, 4, 5)
        pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu()  # [seeds, 2, yaws, 3, S, S]
        grid = pixels.permute(0, 1, 4, 2, 5, 3).reshape(len(seeds) * 2 * size, len(yaws) * size, 3)
        Image.fromarray(grid.numpy()).save(path)

    @torch.no_grad()
    def evaluate(self, seeds=range(8), yaws=EVAL_YAWS) -> dict[str, float]:
        """Style strength (mean absolute change of the renders, in [0, 1]) and identity cosines: base vs stylized
        render of each (seed, yaw) (high = identity kept), and between the frontal renders of different seeds,
        stylized and base (low = no mode collapse). Without an identity network only the strength."""
        z = torch.stack([torch.randn([self.frozen.z_dim], generator=torch.Generator().manual_seed(1000 + s))
                         for s in seeds]).to(self.device)
        ws = self.latents(z).repeat_interleave(len(yaws), 0)
        yaw_list = torch.tensor(yaws, dtype=torch.float32).repeat(len(seeds))
        pitches = torch.zeros_like(yaw_list)
        images = [render_views(g.eval(), ws, yaw_list, pitches)["image"].clamp(-1, 1) for g in (self.frozen, self.tuned)]
        self.tuned.train()
        strength = {"heads": len(seeds), "style_strength": round(float((images[1] - images[0]).abs().mean() / 2), 4)}
        if self.identity is None:
            return strength
        embeddings = [self.identity.embed_aligned(image) for image in images]
        frontal = yaws.index(0) if 0 in yaws else 0

        def between_people(embedding):
            return mean_cross_cosine(embedding.reshape(len(seeds), len(yaws), -1)[:, frontal].double().cpu().numpy())

        return {**strength, "identity_base_vs_stylized": float((embeddings[0] * embeddings[1]).sum(-1).mean()),
                "identity_between_people_stylized": between_people(embeddings[1]),
                "identity_between_people_base": between_people(embeddings[0])}

    def export(self, directory: str | Path, record: dict | None = None, metrics: dict | None = None) -> Path:
        """Write the style as a delta over the base (`core.nets.style_delta`) plus a model card."""
        cfg = self.config
        delta = make_style_delta(self.frozen, self.tuned, cfg.base_name, rank=cfg.delta_rank)
        directory = save_style_delta(delta, directory, extra_config={
            "method": "stylize3d", "style": cfg.style, "objective": cfg.objective, "steps": self.step_count,
            "training": dataclasses.asdict(cfg), "metrics": metrics or {}})
        (Path(directory) / CARD_FILE).write_text(_model_card(self, delta, record, metrics))
        return Path(directory)


def _model_card(trainer: StylizeTrainer, delta, record: dict | None, metrics: dict | None) -> str:
    cfg = trainer.config
    stored = sum(t.numel() for t in delta.tensors().values())
    trained = sum(p.numel() for p in trainer.tuned.parameters() if p.requires_grad)
    lines = [
        f"# 3D head style `{cfg.style}` over `{cfg.base_name}`",
        "",
        "A `core.nets.style_delta` delta (float16) over the base 3D head generator, trained by"
        " `training/stylize_head3d.py` (identity-preserving multiview score distillation, docs/methods.md §3).",
        "",
        f"* **Objective:** `{cfg.objective}` ({'likelihood distillation' if cfg.objective == 'ld' else 'SDS'}),"
        f" guidance {cfg.guidance}, t in [{cfg.t_min}, {cfg.t_max}] x T, 2x2 multiview grid (yaw +-{cfg.yaw_range},"
        f" pitch +-{cfg.pitch_range}), mirror weight {cfg.mirror_weight}, rank weighing {cfg.rank_weighing},"
        f" identity weight {cfg.identity_weight} (|yaw| <= {cfg.identity_max_yaw}), mask weight {cfg.mask_weight}.",
        f"* **Teacher:** `{cfg.teacher}` (our own small diffusion model trained on `training.style_filters`"
        f" `{cfg.style}` images; stands in for Stable Diffusion + ControlNet).",
        f"* **Training:** {trainer.step_count} steps, batch {cfg.batch}, Adam lr {cfg.lr}, seed {cfg.seed};"
        f" {trained / 1e6:.2f} M trained parameters (backbone synthesis + super-resolution, no biases).",
        f"* **Delta:** rank {cfg.delta_rank}, {len(delta.tensors())} tensors, {stored / 1e3:.0f} k values"
        f" ({stored * 2 / 2**10:.0f} KiB in float16).",
        f"* **Last training log line:** `{json.dumps(record) if record else 'n/a'}`",
        f"* **Evaluation** (style strength and identity cosines, `heads` seeds from 1000, yaws {list(EVAL_YAWS)}):"
        f" `{json.dumps(metrics) if metrics else 'not measured'}`",
        "* Licence: non-commercial research (the base and the teacher's data are non-commercial).",
        "",
    ]
    return "\n".join(lines)


def read_run_config(run_dir: str | Path) -> StylizeConfig | None:
    stored = stored_config(run_dir)
    return None if stored is None else StylizeConfig(**stored)


def train(trainer: StylizeTrainer, run_dir: str | Path, deadline: Deadline, max_steps: int | None = None,
          log_every: int = 50, save_every_s: float = 240.0) -> dict | None:
    """Steps until the deadline or `max_steps` more; log, save and sample. Returns the last log record."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    first_step, last_save, window_start, sums, record = trainer.step_count, time.monotonic(), time.monotonic(), {}, None
    while not deadline.expired() and (max_steps is None or trainer.step_count - first_step < max_steps):
        for key, value in trainer.step().items():
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + value, count + 1)
        if trainer.step_count % log_every == 0:
            steps = sums["t"][1]
            record = {"step": trainer.step_count, **{k: round(total / count, 5) for k, (total, count) in sums.items()},
                      "steps_per_s": round(steps / max(time.monotonic() - window_start, 1e-9), 3),
                      "elapsed_s": round(deadline.elapsed_s, 1)}
            with open(run_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
            window_start, sums = time.monotonic(), {}
        if time.monotonic() - last_save > save_every_s:
            trainer.save(run_dir)
            last_save = time.monotonic()
    trainer.save(run_dir)
    trainer.sample_grid(run_dir / SAMPLES_FILE)
    return record


def main(argv: list[str] | None = None) -> None:
    defaults = StylizeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (checkpoint, log, samples); resumed")
    parser.add_argument("--base", help="base generator folder (core.nets.load_generator)")
    parser.add_argument("--base-name", default=defaults.base_name,
                        help="registry name of the base, which the exported delta names")
    parser.add_argument("--teacher", help="teacher folder (training.diffusion_teacher export)")
    parser.add_argument("--style", default=defaults.style)
    parser.add_argument("--objective", default=defaults.objective, choices=("ld", "sds"))
    parser.add_argument("--identity", default="identity-resnet", help="identity network (registry name; '' for none)")
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--reserve-s", type=float, default=40.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=50)
    for name in ("lr", "guidance", "t_min", "t_max", "identity_weight", "mask_weight", "mirror_weight"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--delta-rank", type=int, default=defaults.delta_rank)
    parser.add_argument("--export", help="write the style delta + model card here at the end")
    parser.add_argument("--no-eval", action="store_true", help="skip the identity metrics of the export")
    parser.add_argument("--eval-seeds", type=int, default=8, help="heads (seeds 1000, 1001, ...) of the export's metrics")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    run_dir = Path(args.run)
    config = read_run_config(run_dir)
    if config is None:
        if not (args.base and args.teacher):
            parser.error("--base and --teacher are required to start a run")
        config = dataclasses.replace(defaults, style=args.style, objective=args.objective, base=args.base,
                                     base_name=args.base_name, teacher=args.teacher, batch=args.batch, delta_rank=args.delta_rank,
                                     **{k: getattr(args, k) for k in ("lr", "guidance", "t_min", "t_max",
                                                                      "identity_weight", "mask_weight",
                                                                      "mirror_weight")})
    else:
        print(f"resuming {run_dir}; its stored config is used", flush=True)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    identity = load_identity_encoder(args.identity) if args.identity else None
    trainer = StylizeTrainer(config, load_generator(args.base or config.base), load_teacher(args.teacher or config.teacher),
                             identity, args.device)
    trainer.load(run_dir)
    record = None
    if args.minutes > 0:
        record = train(trainer, run_dir, deadline, max_steps=args.steps, log_every=args.log_every)
    if args.export:
        if record is None:
            record = last_log_record(run_dir)
        metrics = {} if args.no_eval else trainer.evaluate(seeds=range(args.eval_seeds))
        trainer.export(args.export, record, metrics)
        print(f"exported the {config.style} delta to {args.export}: {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    main()
