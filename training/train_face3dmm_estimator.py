"""Train F_R (`core.nets.face3dmm_estimator`), the 3DMM estimator the 'tax-free' conditional GAN uses frozen.

    nice python -m training.train_face3dmm_estimator --data datasets/faces/faces128.npz \
        --out weights/face3dmm_estimator --minutes 14

Recipe: the archive's `face3dmm` labels (ICT-FaceKit fits of the 256-px crops) of the train split, normalised per
dimension by the mean / std of the train labels together with their mirrored copies; random x-flips with the
archive's flip rules (`training.data.flip.flip_face3dmm`: expression L/R swap, yaw/roll/u/odd-SH signs, identity
mirror matrix); loss = the mean over parameter groups of each group's mean squared normalised error, so that the
3 rotation values weigh as much as the 50 identity values; AdamW with a cosine schedule; the epoch with the lowest
validation loss is kept. The test split gives the per-group errors of the model card.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from core.face3dmm import EXPRESSION_NAMES
from core.nets.face3dmm_estimator import CONFIG_FILE, WEIGHTS_FILE, Face3DMMEstimator, parameter_groups
from training.data.archive import load_archive
from training.data.flip import flip_face3dmm

CARD_FILE = "README.md"
# Expressions whose control the card and the GAN evaluation report (jaw open, smiles, blinks, brow raise).
CURATED_EXPRESSIONS = ("jawOpen", "mouthSmile_L", "mouthSmile_R", "eyeBlink_L", "eyeBlink_R", "browInnerUp_L",
                       "browInnerUp_R", "browOuterUp_L", "browOuterUp_R")  # fmt: skip
STD_FLOOR = 1e-4


def load_split(path: str | Path, split: str, input_size: int) -> dict:
    """Images resized to `input_size` (float32 [-1, 1]), raw labels and their mirrored copies of one split (rows
    with NaN labels dropped)."""
    archive = load_archive(path, split=split)
    labels = np.asarray(archive.face3dmm, dtype=np.float32)
    keep = np.flatnonzero(np.isfinite(labels).all(axis=1))
    num_identity = labels.shape[1] - parameter_groups(0)["lighting"].stop
    images = torch.stack([torch.from_numpy(archive.image(int(i))).permute(2, 0, 1) for i in keep])
    resizer = Face3DMMEstimator(num_identity=num_identity, input_size=input_size)
    images = torch.cat([resizer.resize(chunk.float() / 127.5 - 1) for chunk in images.split(256)])
    mirrored = flip_face3dmm(labels[keep], num_identity, archive.identity_mirror)
    return {"images": images, "labels": torch.from_numpy(labels[keep]), "mirrored": torch.from_numpy(mirrored),
            "num_identity": num_identity}  # fmt: skip


def grouped_loss(predicted: torch.Tensor, target: torch.Tensor, groups: dict[str, slice],
                 weights: dict[str, float] | None = None) -> torch.Tensor:
    """Weighted mean over groups of each group's mean squared error (normalised units); weight 1 by default."""
    weights = weights or {name: 1.0 for name in groups}
    total = sum(weights.values())
    return sum(weight * (predicted[:, groups[name]] - target[:, groups[name]]).square().mean()
               for name, weight in weights.items()) / total  # fmt: skip


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64) - np.mean(a), np.asarray(b, np.float64) - np.mean(b)
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def r_squared(predicted: np.ndarray, target: np.ndarray) -> float:
    """1 - SSE / SST over all values of a group (each dimension centred on its own mean)."""
    residual = np.square(predicted - target).sum()
    total = np.square(target - target.mean(axis=0)).sum()
    return float(1 - residual / total) if total > 0 else float("nan")


def parameter_errors(predicted: np.ndarray, target: np.ndarray, num_identity: int) -> dict:
    """Per-group errors of raw (denormalised) parameter vectors [N, D]: rotation MAE / median in degrees, expression
    MAE plus MAE and Pearson r of the curated expressions, lighting / identity / translation / scale MAE and R^2."""
    groups = parameter_groups(num_identity)
    predicted, target = np.asarray(predicted, np.float64), np.asarray(target, np.float64)
    result: dict = {}
    rotation = np.abs(predicted[:, groups["rotation"]] - target[:, groups["rotation"]])
    for index, name in enumerate(("yaw", "pitch", "roll")):
        result[f"{name}_mae_deg"] = float(rotation[:, index].mean())
        result[f"{name}_median_deg"] = float(np.median(rotation[:, index]))
    expression_p, expression_t = predicted[:, groups["expression"]], target[:, groups["expression"]]
    result["expression_mae"] = float(np.abs(expression_p - expression_t).mean())
    result["curated_expressions"] = {
        name: {"mae": float(np.abs(expression_p[:, i] - expression_t[:, i]).mean()),
               "r": pearson(expression_p[:, i], expression_t[:, i])}
        for name in CURATED_EXPRESSIONS for i in [EXPRESSION_NAMES.index(name)]
    }  # fmt: skip
    for name in ("lighting", "identity", "translation", "scale"):
        result[f"{name}_mae"] = float(np.abs(predicted[:, groups[name]] - target[:, groups[name]]).mean())
        result[f"{name}_r2"] = r_squared(predicted[:, groups[name]], target[:, groups[name]])
    return result


@torch.no_grad()
def predict(model: Face3DMMEstimator, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Raw (denormalised) parameter vectors of images in [-1, 1]."""
    model.eval()
    return torch.cat([model.denormalise(model(chunk)) for chunk in images.split(batch)])


def train_estimator(model: Face3DMMEstimator, train: dict, val: dict, epochs: int, minutes: float,
                    batch: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4,
                    seed: int = 0) -> tuple[Face3DMMEstimator, list[dict]]:
    """Train with flips and a cosine schedule until `epochs` or the time budget; returns the best-val model."""
    generator = torch.Generator().manual_seed(seed)
    groups = parameter_groups(model.num_identity)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    count = train["images"].shape[0]
    steps_per_epoch = max(count // batch, 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.1)  # fmt: skip
    targets, mirrored = model.normalise(train["labels"]), model.normalise(train["mirrored"])
    val_targets = model.normalise(val["labels"])
    best, best_loss, history, started = copy.deepcopy(model), float("inf"), [], time.monotonic()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(count, generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * batch:(step + 1) * batch]
            flip = torch.rand(len(index), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], train["images"][index].flip(-1), train["images"][index])
            target = torch.where(flip[:, None], mirrored[index], targets[index])
            loss = grouped_loss(model(images), target, groups)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        model.eval()
        with torch.no_grad():
            val_predicted = torch.cat([model(x) for x in val["images"].split(256)])
            val_loss = float(grouped_loss(val_predicted, val_targets, groups))
        record = {"epoch": epoch + 1, "train_loss": round(total / steps_per_epoch, 5), "val_loss": round(val_loss, 5),
                  "elapsed_s": round(time.monotonic() - started, 1)}  # fmt: skip
        history.append(record)
        print(json.dumps(record), flush=True)
        if val_loss < best_loss:
            best, best_loss = copy.deepcopy(model), val_loss
        if time.monotonic() - started > minutes * 60 * (epoch + 2) / (epoch + 1):  # the next epoch would overrun
            break
    return best.eval(), history


def normalisation_stats(train: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (floored at STD_FLOOR) of the train labels together with their mirrored copies."""
    both = torch.cat([train["labels"], train["mirrored"]])
    return both.mean(0), both.std(0).clamp_min(STD_FLOOR)


def _format_card(config: dict, metrics: dict, baseline: dict, history: list[dict], parameters: int) -> str:
    def row(name: str, key: str, digits: int = 3) -> str:
        return f"| {name} | {metrics[key]:.{digits}f} | {baseline[key]:.{digits}f} |"

    curated = "\n".join(
        f"| {name} | {values['mae']:.3f} | {values['r']:.3f} | {baseline['curated_expressions'][name]['mae']:.3f} |"
        for name, values in metrics["curated_expressions"].items())  # fmt: skip
    best = min(history, key=lambda record: record["val_loss"])
    return f"""# F_R: ICT-FaceKit 3DMM estimator (64 px)

`core.nets.face3dmm_estimator.Face3DMMEstimator`, trained by `training/train_face3dmm_estimator.py` on CPU. It
regresses the {config['out_dim']}-d `core.face3dmm.FaceParams.to_vector()` of an aligned face crop (any square size,
resized to {config['init_kwargs']['input_size']} px inside the network) and is used frozen by
`training/train_taxfree.py` (consistency loss) and `training/eval_taxfree.py` (expression control).

* **Output:** the normalised vector (p - mean) / std; `mean` and `std` (per dimension, from the train split's labels
  and their mirrored copies, std floored at {STD_FLOOR}) are in config.json `normalisation`; `denormalise()` inverts.
* **Targets:** the archive's `face3dmm` labels = landmark + SH-lighting fits of ICT-FaceKit to the 256-px crops
  (`training.data.build_dataset`, stage 3dmm). So the errors below are against fitted labels, not ground truth.
* **Data:** `{config['training']['data']}` ({config['training']['train_count']} train /
  {config['training']['val_count']} val / {config['training']['test_count']} test samples); non-commercial
  research only (MEBeauty, CelebA licences; see the dataset card).
* **Architecture:** {len(config['init_kwargs']['channels'])} stride-2 stages of two 3x3 conv + BatchNorm + SiLU
  (channels {config['init_kwargs']['channels']}), 4 x 4 x 16 features + pooled features -> MLP
  ({config['init_kwargs']['head_features']}) -> {config['out_dim']}; {parameters / 1e6:.3f} M parameters, float16
  weights.
* **Recipe:** random x-flips with the archive's flip rules, group-balanced MSE (each group's mean squared normalised
  error, averaged over identity / expression / rotation / translation / scale / lighting), AdamW lr
  {config['training']['lr']} one-cycle, weight decay {config['training']['weight_decay']}, batch
  {config['training']['batch']}, {len(history)} epochs in
  {history[-1]['elapsed_s']:.0f} s on 2 shared CPU cores; kept epoch {best['epoch']} (val loss {best['val_loss']:.4f}).

## Test-split errors ({config['training']['test_count']} samples)

"Mean baseline" predicts the train mean for every sample.

| group | F_R | mean baseline |
|---|---|---|
{row('yaw MAE (deg)', 'yaw_mae_deg', 2)}
{row('pitch MAE (deg)', 'pitch_mae_deg', 2)}
{row('roll MAE (deg)', 'roll_mae_deg', 2)}
{row('yaw median abs. error (deg)', 'yaw_median_deg', 2)}
{row('pitch median abs. error (deg)', 'pitch_median_deg', 2)}
{row('expression MAE (53 blendshapes, 0-1)', 'expression_mae')}
{row('lighting MAE (27 SH coefficients)', 'lighting_mae')}
{row('lighting R^2', 'lighting_r2')}
{row('identity MAE (50 coefficients, ~N(0,1))', 'identity_mae')}
{row('identity R^2', 'identity_r2')}
{row('translation MAE (normalised image units)', 'translation_mae', 4)}
{row('scale MAE', 'scale_mae', 5)}

Curated expressions (blendshape weights 0-1):

| expression | MAE | Pearson r | mean-baseline MAE |
|---|---|---|---|
{curated}

## Limits

Trained on ~2.5 k faces at 64 px: identity coefficients are the weakest group (only partly recoverable at this size);
pose, jaw opening, smiles and lighting are what the conditional GAN controls. Differentiable, but a GAN can learn to
fool it (adversarial examples), so the evaluation also checks pose with an independent landmark estimator.
"""


def export(model: Face3DMMEstimator, directory: str | Path, training: dict, metrics: dict, baseline: dict,
           history: list[dict]) -> Path:
    """Write model.safetensors (float16), config.json (init kwargs, normalisation, metrics) and the model card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"kind": "face3dmm_estimator", "init_kwargs": model.config(), "out_dim": model.out_dim,
              "layout": "core.face3dmm.FaceParams.to_vector: identity, expression (53), rotation (yaw, pitch, roll "
                        "deg), translation (u, v), scale, sh (3 x 9)",
              "normalisation": {"mean": model.mean.tolist(), "std": model.std.tolist()},
              "training": training, "test_metrics": metrics, "test_metrics_mean_baseline": baseline}  # fmt: skip
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    parameters = sum(p.numel() for p in model.parameters())
    (directory / CARD_FILE).write_text(_format_card(config, metrics, baseline, history, parameters))
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="training archive (faces128.npz)")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--minutes", type=float, default=14.0, help="training time budget")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW (decoupled) weight decay")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    splits = {name: load_split(args.data, name, args.input_size) for name in ("train", "val", "test")}
    train = splits["train"]
    mean, std = normalisation_stats(train)
    model = Face3DMMEstimator(num_identity=train["num_identity"], input_size=args.input_size, mean=mean, std=std)
    model, history = train_estimator(model, train, splits["val"], args.epochs, args.minutes, args.batch, args.lr,
                                     args.weight_decay, args.seed)  # fmt: skip
    with torch.no_grad():  # evaluate what is bundled: float16-rounded weights and BatchNorm statistics
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    test = splits["test"]
    metrics = parameter_errors(predict(model, test["images"]).numpy(), test["labels"].numpy(), model.num_identity)
    baseline = parameter_errors(mean.expand_as(test["labels"]).numpy(), test["labels"].numpy(), model.num_identity)
    training = {"data": str(args.data), "train_count": len(train["labels"]), "val_count": len(splits["val"]["labels"]),
                "test_count": len(test["labels"]), "epochs": len(history), "batch": args.batch, "lr": args.lr,
                "weight_decay": args.weight_decay, "seed": args.seed, "history": history}  # fmt: skip
    export(model, args.out, training, metrics, baseline, history)
    print(json.dumps({"test": metrics}, indent=1), flush=True)


if __name__ == "__main__":
    main()
