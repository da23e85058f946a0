"""Second stage of the L2SAE recipe: refine the Semantic Mask Prediction Network of a trained L2SAE.

    python -m training.refine_l2sae_masks --model weights/l2sae_faces128 --data datasets/faces128.npz \
        --run runs/l2sae_masks --minutes 9
    python -m training.refine_l2sae_masks --run runs/l2sae_masks --minutes 0 --export weights/l2sae_faces128

Everything but `mask_predictor` stays frozen, so the structure tensor, the decoder and every edit's colours are
unchanged: only which pixels an edit may touch moves. Each step encodes a batch of train-split crops (x-flipped with
their label maps with probability 0.5) with the frozen encoder and fits the per-region mask logits with cross-entropy
plus `dice_weight` times a soft Dice loss (one minus the mean over images and regions present in the label map of
2|P∩M| / (|P| + |M|), P the softmax probabilities). Cross-entropy alone is dominated by the large regions; the
Dice term weighs a 3-px brow like the background, which is how the evaluation's per-region IoU weighs them.

The run folder (`training.resumable`) holds the mask head and its optimizer, `log.jsonl` and `samples.png` (rows:
input, predicted regions, label map); the source model is recorded by path and SHA-256 and must not change while the
run resumes. `--export` writes the source model with the refined head, its config and its card, with a section on
this stage in place of the card's old evaluation (run `training.eval_l2sae --update-card` next).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from core.nets import CONFIG_FILE, WEIGHTS_FILE
from core.nets.l2sae import L2SAE, load_l2sae
from training.resumable import (Deadline, add_budget_options, last_log_record, load_checkpoint, save_checkpoint,
                                stored_config)
from training.train_l2sae import (CARD_FILE, REGION_COLOURS, SAMPLE_COUNT, FaceCrops, crops_from_archive,
                                  soft_dice_loss)
from training.train_stylegan2 import configure_device, train

SECTION_TITLE = "## Mask head refinement"


@dataclass
class RefineConfig:
    """The source model and the recipe of a refinement run (stored in the checkpoint)."""

    model: str
    model_sha256: str
    data: str | None = None
    split: str = "train"
    batch: int = 8
    lr: float = 0.002
    dice_weight: float = 1.0
    seed: int = 0


class MaskRefiner:
    """Trains `model.mask_predictor` of a frozen L2SAE on crops and label maps; the interface
    `training.train_stylegan2.train` drives (step, save, sample_grid, log_fields, step_count, images_seen)."""

    def __init__(self, config: RefineConfig, model: L2SAE, data: FaceCrops | None, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device).float().requires_grad_(False)
        self.model.mask_predictor.requires_grad_(True)
        self.data = None if data is None else data.to(self.device)
        self.opt = torch.optim.Adam(self.model.mask_predictor.parameters(), lr=config.lr, betas=(0.9, 0.99))
        self.step_count = 0

    @property
    def images_seen(self) -> int:
        return self.step_count * self.config.batch

    def step(self) -> dict[str, torch.Tensor]:
        """One update of the mask head; returns detached scalar stats."""
        images, masks = self.data.draw(self.config.batch, self.config.seed, self.step_count)
        with torch.no_grad():
            structure, _ = self.model.encode(images)
        logits = self.model.mask_logits(structure)
        stats = {"mask_ce": F.cross_entropy(logits, masks), "mask_dice": soft_dice_loss(logits, masks)}
        loss = stats["mask_ce"] + self.config.dice_weight * stats["mask_dice"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_count += 1
        return {key: value.detach() for key, value in stats.items()}

    def log_fields(self) -> dict[str, float]:
        return {}

    def save(self, run_dir: str | Path, compact: bool = True) -> None:
        """Write the mask head and its optimizer (the head in float32: it is small)."""
        save_checkpoint(run_dir, self.step_count, {"mask_predictor": self.model.mask_predictor},
                        {"mask_predictor": self.opt}, {"config": dataclasses.asdict(self.config)})

    def load(self, run_dir: str | Path) -> bool:
        """Restore from `run_dir`; False when it holds no checkpoint."""
        restored = load_checkpoint(run_dir, {"mask_predictor": self.model.mask_predictor},
                                   {"mask_predictor": self.opt})
        if restored is None:
            return False
        self.step_count, _ = restored
        return True

    @torch.no_grad()
    def sample_grid(self, path: str | Path) -> None:
        """Columns: the first SAMPLE_COUNT crops; rows: input, predicted regions, label map."""
        images = self.data.images[:SAMPLE_COUNT]
        structure, _ = self.model.encode(images.float() / 127.5 - 1)
        predicted = self.model.mask_logits(structure).argmax(dim=1).cpu().numpy()
        labels = self.data.masks[:SAMPLE_COUNT].long().cpu().numpy()
        rows = [images.permute(0, 2, 3, 1).cpu().numpy()] + [REGION_COLOURS[m % len(REGION_COLOURS)]
                                                             for m in (predicted, labels)]
        Image.fromarray(np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)).save(path)

    def export(self, directory: str | Path, source: str | Path, log: dict | None = None) -> Path:
        """The source model folder's files with the refined head: weights (float16), config (with this stage's
        recipe under `training.mask_refinement`) and card (a section on this stage; the old evaluation dropped)."""
        directory, source = Path(directory), Path(source)
        directory.mkdir(parents=True, exist_ok=True)
        config = json.loads((source / CONFIG_FILE).read_text())
        card = (source / CARD_FILE).read_text() if (source / CARD_FILE).exists() else ""
        weights = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        recipe = {key: value for key, value in dataclasses.asdict(self.config).items() if key != "model"}
        config.setdefault("training", {})["mask_refinement"] = {**recipe, "steps": self.step_count}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        card = card.split(SECTION_TITLE)[0].split("## Evaluation")[0].rstrip()
        (directory / CARD_FILE).write_text(card + "\n\n" + _card_section(self, log))
        return directory


def _card_section(refiner: MaskRefiner, log: dict | None) -> str:
    cfg = refiner.config
    return "\n".join([
        SECTION_TITLE, "",
        "`training/refine_l2sae_masks.py`: only the Semantic Mask Prediction Network trained further, everything else"
        " frozen (structure, style, decoder and so the edits' colours are unchanged).",
        "",
        f"* **Recipe:** `{cfg.data}` split `{cfg.split}`, x-flips; batch {cfg.batch}, Adam lr {cfg.lr} betas (0.9,"
        f" 0.99); loss cross-entropy + {cfg.dice_weight} x soft Dice over the regions present; seed {cfg.seed}.",
        f"* **Iterations:** {refiner.step_count} steps, {refiner.images_seen / 1000:.2f} kimg.",
        f"* **Last training log line:** `{json.dumps(log) if log else 'n/a'}`",
        "",
    ])


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (checkpoint, log, samples); resumed if present")
    parser.add_argument("--model", help="the bundled-format L2SAE to refine (only to start a run)")
    parser.add_argument("--data", help="training archive at the model's size; not needed for --minutes 0 --export")
    add_budget_options(parser, reserve_s=30.0)
    parser.add_argument("--log-every", type=int, default=200)
    parser.add_argument("--export", help="write the refined L2SAE in the bundled format here at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in ("batch", "lr", "dice_weight", "seed"):
        default = getattr(RefineConfig, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                            help=f"recipe (new runs only; default {default})")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    configure_device(device)
    stored = stored_config(args.run)
    if stored is None:
        if args.model is None:
            parser.error("--model is required to start a run")
        config = RefineConfig(model=args.model, model_sha256=file_sha256(Path(args.model) / WEIGHTS_FILE),
                              data=args.data, batch=args.batch, lr=args.lr, dice_weight=args.dice_weight,
                              seed=args.seed)
    else:
        config = RefineConfig(**stored)
        print(f"resuming {args.run} (refining {config.model}); its stored config is used", flush=True)
        if file_sha256(Path(config.model) / WEIGHTS_FILE) != config.model_sha256:
            parser.error(f"{config.model} changed since this run started; refine into another folder")
    data = None
    if args.minutes > 0:
        data = crops_from_archive(args.data or config.data, split=config.split)
        config = dataclasses.replace(config, data=args.data or config.data)
    model = load_l2sae(config.model)
    if data is not None and data.images.shape[-1] != model.config.resolution:
        parser.error(f"the archive's crops are {data.images.shape[-1]} px, the model's {model.config.resolution} px")
    refiner = MaskRefiner(config, model, data, device)
    if not refiner.load(args.run) and args.minutes <= 0:
        parser.error("the run folder has no checkpoint to export")
    record = None
    if data is not None:
        deadline = Deadline(max(args.minutes * 60, args.reserve_s + 1), args.reserve_s)
        record = train(refiner, args.run, deadline, max_steps=args.steps, log_every=args.log_every)
    if args.export:
        refiner.export(args.export, config.model, record or last_log_record(Path(args.run)))
        print(f"exported the refined L2SAE to {args.export}", flush=True)


if __name__ == "__main__":
    main()
