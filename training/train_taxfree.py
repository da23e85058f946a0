"""'Tax-free' 3DMM-conditioned StyleGAN2 (methods.md section 1): our base trainer with the ICT-FaceKit vector p as c.

    python -m training.train_taxfree --recipe taxfree --data datasets/faces/faces128.npz --run runs/taxfree128 \
        --minutes 9
    python -m training.train_taxfree --run runs/taxfree128 --minutes 0 --export weights/taxfree_faces128

Both recipes extend `training.train_stylegan2.StyleGAN2Trainer` (same G, D, losses, augmentation, checkpoints):

* c = p normalised with the frozen estimator F_R's statistics, (p - mean) / std (`core.nets.face3dmm_estimator`);
  reals are x-flipped with their labels (archive flip rules); fakes get the labels of random training samples,
  mirrored as often as the reals are, so that real and fake c follow one distribution; D is conditioned on c by
  the StyleGAN2-ADA projection head.
* `taxfree`: the paper's "only two objectives": the adversarial loss plus one consistency loss
  ||F_R(G(z, c)) - c||^2 (normalised units, group-balanced) on the controlled parameters only: expression,
  rotation (pose) and SH lighting. Identity, translation and scale are left to the generator.
* `overconstrained`: the prior-work baseline: the same plus consistency on every parameter group at full weight
  (identity, translation and scale too) and an image-space L1 loss between G(z, c), downsampled to
  `render_resolution`, and the 3DMM's SH-shaded render of p inside its coverage mask (DiscoFaceGAN-style
  imitation). The renders are precomputed once per run (`renders.npz` in the run folder).

The consistency (+ render) term runs as its own G update before each adversarial step, like StyleGAN2's lazy
regularisers (every `consistency_interval` steps, weighted by the interval). Its labels are factorised for a
`factorised_fraction` of the batch: the groups the tab's sliders set (expression, rotation, lighting:
`SLIDER_GROUPS`) each come from another random training sample. Real labels alone never change one group with the
others held, so a generator trained on them read the pose from correlated groups (identity, light) and ignored the
rotation entries: in the 32-px CPU pilot, changing only the yaw of a test label from -25 to +25 deg moved the
landmark yaw of the image by a few degrees, while whole test labels were followed to 2.3 deg. The render loss
(over-constrained) uses the unfactorised rows only, whose renders are precomputed. Two options act on the adversarial
step: `adversarial_factorised_fraction` factorises the fakes' labels the same way, and `discriminator_groups`
restricts what D sees of c (for reals and fakes alike), e.g. to the slider groups, so that D cannot reward tying the
whole image to a unique training label. The run folder, resumption and the
compact checkpoint are the base trainer's; the recipe is part of the stored config.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.nets import CONFIG_FILE
from core.nets.face3dmm_estimator import WEIGHTS_FILE, Face3DMMEstimator, load_face3dmm_estimator, parameter_groups
from training.resumable import Deadline, add_budget_options, last_log_record, stored_config
from training.train_face3dmm_estimator import grouped_loss
from training.train_stylegan2 import (CARD_FILE, StyleGAN2Trainer, TrainConfig, TrainingImages,
                                      configure_device, nan_to_num_grads, images_from_archive, train)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ESTIMATOR = "weights/face3dmm_estimator"  # relative: the run folder moves between machines
RENDERS_FILE = "renders.npz"
ALL_GROUPS = "identity,expression,rotation,translation,scale,lighting"
SLIDER_GROUPS = ("expression", "rotation", "lighting")  # what the tab sets independently of the rest
RECIPES = {
    "taxfree": {"consistency_groups": "expression,rotation,lighting", "render_weight": 0.0},
    "overconstrained": {"consistency_groups": ALL_GROUPS, "render_weight": 1.0},
}


@dataclass
class TaxFreeConfig(TrainConfig):
    """The base recipe plus the conditioning losses (`RECIPES` fills the recipe-specific fields)."""

    recipe: str = "taxfree"
    estimator: str = DEFAULT_ESTIMATOR
    estimator_sha256: str | None = None  # set when a run starts; a resumed run refuses another F_R
    consistency_groups: str = RECIPES["taxfree"]["consistency_groups"]
    consistency_weight: float = 1.0
    consistency_interval: int = 1
    render_weight: float = 0.0
    render_resolution: int = 32
    factorised_fraction: float = 0.5
    adversarial_factorised_fraction: float = 0.0  # the same factorisation for the adversarial fakes' labels
    discriminator_groups: str = ALL_GROUPS  # the groups of c that D sees; the others are zeroed for reals and fakes
    label_key: str | None = "face3dmm"

    @classmethod
    def for_recipe(cls, recipe: str, **overrides) -> "TaxFreeConfig":
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
        return cls(**{"recipe": recipe, **RECIPES[recipe], **overrides})


def estimator_path(path: str | Path) -> Path:
    """A relative estimator path is taken from the working directory if it exists there, else from the repo root."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def normalised_data(data: TrainingImages, estimator: Face3DMMEstimator) -> TrainingImages:
    """The training set with its raw 3DMM labels (and mirrored labels) normalised by F_R's statistics."""
    mirrored = None if data.mirrored_labels is None else estimator.normalise(data.mirrored_labels)
    return TrainingImages(data.images, estimator.normalise(data.labels), mirrored)


def _render_one(item: tuple[np.ndarray, int]) -> np.ndarray:
    from core.face3dmm import FaceParams, load_face_model

    vector, resolution = item
    model = load_face_model()
    render = model.render(FaceParams.from_vector(torch.from_numpy(vector), model.num_identity), resolution)
    return np.concatenate([render.shaded, (render.mask[..., None] * 255).astype(np.uint8)], -1)


def render_targets(raw_labels: torch.Tensor, resolution: int, workers: int = 1) -> torch.Tensor:
    """uint8 [N, 4, r, r]: the SH-shaded 3DMM render (RGB) and its coverage mask (255 inside) of each label."""
    items = [(vector, resolution) for vector in raw_labels.numpy()]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:  # CUDA-safe
            renders = list(pool.map(_render_one, items, chunksize=16))
    else:
        renders = [_render_one(item) for item in items]
    return torch.from_numpy(np.stack(renders)).permute(0, 3, 1, 2).contiguous()


def cached_render_targets(run_dir: str | Path, raw_labels: torch.Tensor, resolution: int,
                          workers: int) -> torch.Tensor:
    """`render_targets`, stored in the run folder and reused while the labels and resolution are the same."""
    path = Path(run_dir) / RENDERS_FILE
    key = hashlib.sha256(raw_labels.numpy().tobytes() + str(resolution).encode()).hexdigest()
    if path.exists():
        with np.load(path) as cached:
            if str(cached["key"]) == key:
                return torch.from_numpy(cached["renders"])
    renders = render_targets(raw_labels, resolution, workers)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, renders=renders.numpy(), key=np.array(key))
    return renders


class TaxFreeTrainer(StyleGAN2Trainer):
    """`StyleGAN2Trainer` whose G also minimises the recipe's consistency (+ render) loss through the frozen F_R.

    `data` holds normalised labels (`normalised_data`); `renders` (uint8 [N, 4, r, r], `render_targets`) is needed
    when `render_weight > 0`."""

    def __init__(self, config: TaxFreeConfig, data: TrainingImages | None, estimator: Face3DMMEstimator,
                 renders: torch.Tensor | None = None, device: str | torch.device = "cpu"):
        super().__init__(config, data, device)
        self.estimator = estimator.eval().requires_grad_(False).to(self.device)
        groups = parameter_groups(estimator.num_identity)
        self.consistency_weights = {name: 1.0 for name in config.consistency_groups.split(",")}
        unknown = set(self.consistency_weights) - set(groups)
        if unknown:
            raise ValueError(f"unknown parameter groups {sorted(unknown)}; expected some of {ALL_GROUPS}")
        self.groups = {name: groups[name] for name in self.consistency_weights}
        self.slider_slices = [groups[name] for name in SLIDER_GROUPS]
        unseen = set(config.discriminator_groups.split(",")) - set(groups)
        if unseen:
            raise ValueError(f"unknown discriminator groups {sorted(unseen)}; expected some of {ALL_GROUPS}")
        self.discriminator_mask = torch.zeros([estimator.mean.numel()], device=self.device)
        for name in config.discriminator_groups.split(","):
            self.discriminator_mask[groups[name]] = 1
        if data is not None and config.render_weight > 0:
            if renders is None or renders.shape[0] != data.images.shape[0]:
                raise ValueError("render_weight > 0 needs one render per training image")
            self.renders = renders.to(self.device)

    def _factorise(self, c: torch.Tensor, fraction: float) -> torch.Tensor:
        """Which rows of c (in place) get each slider group from another random training sample, in `fraction`."""
        factorised = torch.rand([c.shape[0]], device=self.device) < fraction
        for group in self.slider_slices:
            other = self._labels(*self._random_label_indices(c.shape[0]))
            c[:, group] = torch.where(factorised[:, None], other[:, group], c[:, group])
        return factorised

    def _conditioning_labels(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """c drawn like `_fake_labels`, then factorised in a `factorised_fraction` of the rows; with the base
        samples' indices and mirror flags, and which rows are factorised."""
        index, mirror = self._random_label_indices(batch)
        c = self._labels(index, mirror)
        factorised = self._factorise(c, self.config.factorised_fraction)
        return c, index, mirror, factorised

    def _fake_labels(self) -> torch.Tensor:
        """The base trainer's fake c, factorised in an `adversarial_factorised_fraction` of the rows."""
        c = super()._fake_labels()
        if self.config.adversarial_factorised_fraction > 0:
            self._factorise(c, self.config.adversarial_factorised_fraction)
        return c

    def _discriminate(self, images: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """D on images with c restricted to `discriminator_groups` (the same for reals and fakes)."""
        return super()._discriminate(images, c * self.discriminator_mask)

    def _conditioning_losses(self, batch: int) -> dict[str, torch.Tensor]:
        """Consistency (and render) losses of G(z, c) with c from `_conditioning_labels`."""
        cfg = self.config
        c, index, mirror, factorised = self._conditioning_labels(batch)
        z = torch.randn([batch, cfg.z_dim], device=self.device)
        images = self.G.synthesis(self.G.mapping(z, c))
        losses = {"consistency": grouped_loss(self.estimator(images), c, self.groups, self.consistency_weights)}
        if cfg.render_weight > 0:
            target = self.renders[index].to(torch.float32) / 127.5 - 1
            target = torch.where(mirror.reshape(-1, 1, 1, 1), target.flip(-1), target)  # render of the mirrored p
            mask = (target[:, 3:] > 0).to(torch.float32) * (~factorised).to(torch.float32).reshape(-1, 1, 1, 1)
            small = F.interpolate(images, size=target.shape[-2:], mode="area")
            losses["render"] = ((small - target[:, :3]).abs() * mask).sum() / (mask.sum() * 3).clamp_min(1)
        return losses

    def step(self) -> dict[str, torch.Tensor]:
        """The conditioning G update (every `consistency_interval` steps), then the base adversarial step."""
        cfg = self.config
        stats = {}
        if self.step_count % cfg.consistency_interval == 0:
            self.G.requires_grad_(True)
            self.opt_G.zero_grad(set_to_none=True)
            losses = self._conditioning_losses(cfg.batch)
            total = cfg.consistency_weight * losses["consistency"] + cfg.render_weight * losses.get("render", 0)
            (total * cfg.consistency_interval).backward()
            stats["nonfinite_grads_conditioning"] = nan_to_num_grads(self.G)
            self.opt_G.step()
            stats.update({f"loss_{name}": value.detach() for name, value in losses.items()})
        stats.update(super().step())
        return stats

    def export(self, directory: str | Path, log: dict | None = None) -> Path:
        """The base export (G_ema, config.json, card) plus the conditioning spec and a recipe model card."""
        directory = super().export(directory, log)
        config = json.loads((directory / CONFIG_FILE).read_text())
        config["conditioning"] = {
            "label": "face3dmm", "layout": "core.face3dmm.FaceParams.to_vector",
            "normalisation": "c = (p - mean) / std", "mean": self.estimator.mean.tolist(),
            "std": self.estimator.std.tolist(), "recipe": self.config.recipe,
            "controlled_groups": self.config.consistency_groups.split(","),
        }  # fmt: skip
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        (directory / CARD_FILE).write_text(_model_card(self, log))
        return directory


def _model_card(trainer: TaxFreeTrainer, log: dict | None) -> str:
    cfg = trainer.config
    parameters = sum(p.numel() for p in trainer.G_ema.parameters())
    recipe = {
        "taxfree": "adversarial loss + consistency ||F_R(G(z, c)) - c||^2 on expression, rotation and lighting only "
                   "(the paper's 'only two objectives')",
        "overconstrained": "adversarial loss + consistency on every 3DMM group at full weight (identity, expression, "
                           "rotation, translation, scale, lighting) + image-space L1 to the 3DMM's SH-shaded render "
                           f"at {cfg.render_resolution} px inside its mask (weight {cfg.render_weight}): the extra "
                           "constraints prior work (DiscoFaceGAN, 3D-FM GAN) adds; the baseline that shows the tax",
    }[cfg.recipe]  # fmt: skip
    return "\n".join([
        f"# 3DMM-conditioned StyleGAN2, recipe `{cfg.recipe}`, {cfg.resolution} px",
        "",
        "Our reimplementation of the idea of 'Removing the Quality Tax in Controllable Face Generation' (Huang et al.,"
        " WACV 2024); no official code or checkpoint exists. `core.nets.stylegan2.Generator` (G_ema) trained from"
        " scratch by `training/train_taxfree.py`; c = the ICT-FaceKit vector p (`FaceParams.to_vector`, "
        f"{cfg.c_dim}-d) normalised as in config.json `conditioning`.",
        "",
        f"* **Objectives:** {recipe}; consistency weight {cfg.consistency_weight}, every {cfg.consistency_interval}"
        f" step(s), on labels whose slider groups ({', '.join(SLIDER_GROUPS)}) are drawn from independent samples"
        f" in {cfg.factorised_fraction:.0%} of the rows. F_R = `weights/face3dmm_estimator` (frozen).",
        f"* **Discriminator:** conditioned on the groups {cfg.discriminator_groups.replace(',', ', ')} of c (the others"
        f" zeroed); the adversarial fakes' slider groups come from independent samples in"
        f" {cfg.adversarial_factorised_fraction:.0%} of the rows.",
        f"* **Data:** `{cfg.data}`, split `{cfg.split}`, x-flips with label flips {'on' if cfg.mirror else 'off'}."
        " Non-commercial research only (dataset licences).",
        f"* **Architecture:** z/w {cfg.z_dim}/{cfg.w_dim}, mapping {cfg.mapping_layers} layers, channel_base"
        f" {cfg.channel_base}, channel_max {cfg.channel_max}, {parameters / 1e6:.2f} M parameters, float16 weights.",
        f"* **Base recipe:** batch {cfg.batch}, lr G/D {cfg.lr_g}/{cfg.lr_d}, R1 gamma {cfg.r1_gamma}, augmentation"
        f" `{cfg.augment}` (ADA target {cfg.ada_target}), seed {cfg.seed}.",
        f"* **Iterations:** {trainer.step_count} steps, {trainer.images_seen / 1000:.2f} kimg.",
        f"* **Last training log line:** `{json.dumps(log) if log else 'n/a'}`",
        "* **Metrics:** `python -m training.eval_taxfree` (FD-id vs the unconditional base, pose and expression"
        " control) appends them below.",
        "",
    ])


def read_taxfree_config(run_dir: str | Path) -> TaxFreeConfig | None:
    """The TaxFreeConfig stored in a run folder's checkpoint, or None."""
    stored = stored_config(run_dir)
    return None if stored is None else TaxFreeConfig(**stored)


def _parse_overrides(pairs: list[str]) -> dict:
    """`name=value` pairs for TaxFreeConfig fields, typed by the field's default ("none" -> None)."""
    fields = {field.name: field for field in dataclasses.fields(TaxFreeConfig)}
    overrides = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown config field {name!r}")
        default = fields[name].default
        if text.lower() == "none":
            overrides[name] = None
        elif isinstance(default, bool):
            overrides[name] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            overrides[name] = int(text)
        elif isinstance(default, float):
            overrides[name] = float(text)
        else:
            overrides[name] = text
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (checkpoint, log, samples, renders); resumed")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="taxfree", help="only used to start a run")
    parser.add_argument("--data", help="training archive (faces128.npz); not needed for --minutes 0 --export")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="TaxFreeConfig/TrainConfig overrides when starting a run, e.g. batch=16 r1_gamma=1")
    add_budget_options(parser)
    parser.add_argument("--kimg", type=float, default=None, help="stop when the run has seen this many kimg")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--render-workers", type=int, default=8, help="processes rendering the 3DMM targets")
    parser.add_argument("--export", help="write G_ema in the bundled format here at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    configure_device(device)
    deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
    config = read_taxfree_config(args.run)
    if config is None:
        if args.data is None:
            parser.error("--data is required to start a run")
        config = TaxFreeConfig.for_recipe(args.recipe, data=args.data, **_parse_overrides(args.set))
    else:
        print(f"resuming {args.run} (recipe {config.recipe}); its stored config is used", flush=True)
    estimator_dir = estimator_path(config.estimator)
    digest = hashlib.sha256((estimator_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    if config.estimator_sha256 is None:
        config = dataclasses.replace(config, estimator_sha256=digest)
    elif config.estimator_sha256 != digest:
        parser.error(f"{estimator_dir} is not the F_R this run started with (its c normalisation and loss differ)")
    estimator = load_face3dmm_estimator(estimator_dir)
    data = renders = None
    if args.minutes > 0:
        raw = images_from_archive(args.data or config.data, split=config.split, label_key=config.label_key)
        data = normalised_data(raw, estimator)
        config = dataclasses.replace(config, resolution=data.images.shape[-1], c_dim=data.c_dim)
        print(f"{data.images.shape[0]} training images of {config.resolution} px, c_dim {config.c_dim}", flush=True)
        if config.render_weight > 0:
            renders = cached_render_targets(args.run, raw.labels, config.render_resolution, args.render_workers)
    elif config.c_dim == 0:
        parser.error("the run folder has no trained checkpoint to export")
    trainer = TaxFreeTrainer(config, data, estimator, renders, device)
    trainer.load(args.run)
    record = None
    if data is not None:
        record = train(trainer, args.run, deadline, max_steps=args.steps, max_kimg=args.kimg,
                       log_every=args.log_every)  # fmt: skip
    if args.export:
        if record is None:
            record = last_log_record(Path(args.run))
        trainer.export(args.export, record)
        print(f"exported G_ema to {args.export}", flush=True)


if __name__ == "__main__":
    main()
