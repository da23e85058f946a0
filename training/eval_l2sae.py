"""Model-card metrics of an exported L2SAE on an archive split (default: test).

    python -m training.eval_l2sae --model weights/l2sae_faces128 --data datasets/faces128.npz [--edit-limit 100]

Writes `metrics.json` into the model folder and replaces the card's "Evaluation" line/section with a table:
* reconstruction: PSNR (dB, uint8 at model resolution) and identity cosine (`core.identity`, registry
  `identity-resnet`) between each crop and its reconstruction;
* mask IoU per region: argmax of the predicted mask logits == region vs the archive's label map (1.0 where both are
  empty), mean over images; `mean_mask_iou` over regions (target >= 0.7);
* edits through `core.pipelines.latents2semantics` (random style, strength 1, seed = image index, crop = archive
  crop): per region, locality = mean |edit - input| / 255 outside the predicted region mask dilated by `dilation`
  px (target <= 1/255; 0 by construction when `dilation` >= 2 * feather) and strength = the same inside the
  predicted region, also with `keep_detail` (the tab's default: the decoded change added to the photo);
  `edit_seconds` = median time of one edit on the evaluating device.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.identity import IdentityEncoder
from core.pipelines.latents2semantics import FEATHER_FRACTION, MODES, Latents2SemanticsPipeline, load_pipeline
from training.eval.metrics import mask_iou, psnr

METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(tensor, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy() > 0


@torch.no_grad()
def evaluate(pipeline: Latents2SemanticsPipeline, images: np.ndarray, masks: np.ndarray,
             identity: IdentityEncoder | None = None, edit_limit: int = 100, batch: int = 16) -> dict:
    """Metrics (see module docstring) on uint8 crops [N, S, S, 3] and label maps [N, S, S] at the model's size."""
    model = pipeline.model
    parameter = next(model.parameters())
    regions = model.regions
    psnrs, cosines, ious = [], [], {region: [] for region in regions}
    for start in range(0, len(images), batch):
        crops = images[start:start + batch]
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).to(parameter.device, torch.float32) / 127.5 - 1
        structure, style = model.encode(x.to(parameter.dtype))
        reconstruction = model.decode(structure, style).float().clamp(-1, 1)
        predicted = model.mask_logits(structure).argmax(dim=1).cpu().numpy()
        rounded = (reconstruction * 127.5 + 127.5).round().permute(0, 2, 3, 1).cpu().numpy()
        psnrs += [psnr(a, b) for a, b in zip(crops, rounded)]
        if identity is not None:
            cosines += F.cosine_similarity(identity.embed_aligned(x), identity.embed_aligned(reconstruction)).tolist()
        for index, region in enumerate(regions):
            ious[region] += [mask_iou(p == index, m == index) for p, m in zip(predicted, masks[start:start + batch])]

    feather = max(int(round(FEATHER_FRACTION * images.shape[1])), 1)
    dilation = 2 * feather + 1
    locality, seconds = {r: [] for r in regions}, []
    strength, strength_detail = {r: [] for r in regions}, {r: [] for r in regions}
    for index, crop in enumerate(images[:edit_limit]):
        for region in regions:
            result, detail = (pipeline(crop, region, MODES[0], strength=1.0, seed=index, keep_detail=keep)
                              for keep in (False, True))
            change, change_detail = (np.abs(r.edited[0].astype(np.float32) - crop).mean(axis=2) / 255
                                     for r in (result, detail))
            region_mask = result.blend_mask >= 1
            outside = ~_dilate(region_mask, dilation)
            locality[region].append(float(max(change[outside].mean(), change_detail[outside].mean()))
                                    if outside.any() else 0.0)
            if region_mask.any():
                strength[region].append(float(change[region_mask].mean()))
                strength_detail[region].append(float(change_detail[region_mask].mean()))
            seconds.append(result.seconds)

    def mean(values):
        return float(np.mean(values)) if values else None

    per_region = {region: {"mask_iou": mean(ious[region]), "locality": mean(locality[region]),
                           "strength": mean(strength[region]), "strength_keep_detail": mean(strength_detail[region])}
                  for region in regions}
    return {
        "images": int(len(images)), "edited_images": int(min(edit_limit, len(images))),
        "reconstruction_psnr": mean([p for p in psnrs if np.isfinite(p)]),
        "identity_cosine": mean(cosines),
        "mean_mask_iou": mean([v["mask_iou"] for v in per_region.values()]),
        "max_locality": max((v["locality"] or 0.0) for v in per_region.values()),
        "locality_dilation_px": dilation, "feather_px": feather,
        "edit_seconds_median": float(np.median(seconds)) if seconds else None,
        "device": str(parameter.device),
        "regions": per_region,
    }


def _format(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def card_section(metrics: dict, split: str) -> str:
    """The "## Evaluation" markdown section for the model card."""
    lines = [
        "## Evaluation", "",
        f"`training/eval_l2sae.py` on the `{split}` split ({metrics['images']} crops; edits on the first"
        f" {metrics['edited_images']}, random style, strength 1).", "",
        f"* Reconstruction PSNR {_format(metrics['reconstruction_psnr'], 2)} dB, identity cosine"
        f" {_format(metrics['identity_cosine'])}.",
        f"* Mean mask IoU {_format(metrics['mean_mask_iou'])} (target >= 0.7).",
        f"* Edit locality: max over regions of the mean change outside the predicted mask dilated by"
        f" {metrics['locality_dilation_px']} px = {_format(metrics['max_locality'] * 255, 3)}/255 (target <= 1/255;"
        f" the blend leaves pixels beyond {2 * metrics['feather_px']} px of the region untouched).",
        f"* Median edit time {_format(metrics['edit_seconds_median'])} s on {metrics['device']}.", "",
        "Locality and strength are mean |edit - input| x 255, outside the dilated region and on it; strength with"
        " the decoded image pasted (the paper's blend) and with the decoded change added to the photo (keep detail,"
        " the tab's default). Locality is the larger of the two.", "",
        "| region | mask IoU | locality | strength | strength, keep detail |", "|---|---|---|---|---|",
    ]

    def scaled(value):
        return None if value is None else value * 255

    for region, values in metrics["regions"].items():
        cells = [_format(values["mask_iou"])] + [_format(scaled(values[key]), 2)
                                                 for key in ("locality", "strength", "strength_keep_detail")]
        lines.append(f"| {region} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def write_metrics(model_dir: str | Path, metrics: dict, split: str) -> None:
    """`metrics.json` + the card's evaluation section (replacing the trainer's placeholder or an older section)."""
    model_dir = Path(model_dir)
    (model_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    card_path = model_dir / CARD_FILE
    card = card_path.read_text() if card_path.exists() else ""
    card = re.sub(r"\* \*\*Evaluation:\*\*[^\n]*\n", "", card)
    card = card.split("## Evaluation")[0].rstrip() + "\n\n" + card_section(metrics, split)
    card_path.write_text(card)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported L2SAE folder (training.train_l2sae --export)")
    parser.add_argument("--data", required=True, help="archive at the model's resolution")
    parser.add_argument("--split", default="test")
    parser.add_argument("--edit-limit", type=int, default=100, help="images used for the per-region edits")
    parser.add_argument("--no-identity", action="store_true", help="skip the identity cosine")
    args = parser.parse_args(argv)

    from core.runtime import Runtime
    from training.data.archive import load_archive
    from training.train_l2sae import load_identity_encoder

    runtime = Runtime("cpu")
    pipeline = load_pipeline(args.model, runtime)
    archive = load_archive(args.data, split=args.split)
    images = np.stack([archive.image(i) for i in range(len(archive))])
    masks = np.stack([archive.mask(i) for i in range(len(archive))])
    identity = None if args.no_identity else load_identity_encoder(runtime.device)
    metrics = evaluate(pipeline, images, masks, identity, args.edit_limit)
    write_metrics(args.model, metrics, args.split)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
