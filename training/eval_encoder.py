"""Evaluate a style encoder export: reconstruction identity similarity and PSNR on an archive split.

    python -m training.eval_encoder --generator weights/stylegan2_faces128 --encoder weights/style_encoder_faces128 \
        --data datasets/faces128.npz --split test --card

Each crop is encoded, rendered by the generator (constant noise) and compared with the crop at the generator's
resolution: PSNR on uint8 pixels (`training.eval.metrics.psnr`) and cosine similarity of `core.identity`
embeddings. Prints JSON; `--card` also writes `eval.json` into the encoder folder and appends the numbers to its
model card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.eval.metrics import psnr

EVAL_FILE = "eval.json"
CARD_FILE = "README.md"


def _to_pixels(images: torch.Tensor) -> np.ndarray:
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def evaluate_encoder(generator: torch.nn.Module, encoder: torch.nn.Module, identity: torch.nn.Module,
                     images: torch.Tensor, batch: int = 16) -> dict[str, float]:
    """Mean/min identity similarity and mean PSNR (dB) of the reconstructions of uint8 crops [N, 3, S, S]."""
    device = generator.mapping.w_avg.device
    resolution = generator.img_resolution
    similarities, psnrs = [], []
    for chunk in images.split(batch):
        targets = chunk.to(device).float() / 127.5 - 1
        if targets.shape[-1] != resolution:
            targets = F.interpolate(targets, size=(resolution, resolution), mode="bilinear", antialias=True,
                                    align_corners=False)
        reconstruction = generator.synthesis(encoder(targets), noise_mode="const").clamp(-1, 1)
        similarities.append((identity.embed_aligned(reconstruction) * identity.embed_aligned(targets)).sum(dim=1))
        psnrs.extend(psnr(a, b) for a, b in zip(_to_pixels(reconstruction), _to_pixels(targets)))
    similarity = torch.cat(similarities).cpu().double().numpy()
    return {"count": int(len(similarity)), "identity_similarity": float(similarity.mean()),
            "identity_similarity_min": float(similarity.min()), "psnr_db": float(np.mean(psnrs))}


def write_card_section(encoder_dir: str | Path, metrics: dict, data: str, split: str) -> None:
    """Write `eval.json` and append an evaluation section to the model card of `encoder_dir`."""
    encoder_dir = Path(encoder_dir)
    (encoder_dir / EVAL_FILE).write_text(json.dumps({**metrics, "data": data, "split": split}, indent=1))
    card = encoder_dir / CARD_FILE
    text = card.read_text() if card.exists() else ""
    text += (f"\n## Evaluation ({split} split of `{Path(data).name}`, {metrics['count']} crops)\n\n"
             f"* identity similarity (cosine, `core.identity`): mean {metrics['identity_similarity']:.3f},"
             f" min {metrics['identity_similarity_min']:.3f}\n"
             f"* PSNR at the generator resolution: {metrics['psnr_db']:.2f} dB\n")
    card.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    from safetensors.torch import load_file

    from core.beauty import load_identity_encoder
    from core.nets import CONFIG_FILE, WEIGHTS_FILE, load_generator
    from core.nets.encoders import build_style_encoder
    from training.train_stylegan2 import images_from_archive

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True)
    parser.add_argument("--encoder", required=True, help="encoder export folder (training.train_encoder --export)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--identity", default="identity-resnet", help="registry name of the identity network")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--card", action="store_true", help="write eval.json and extend the model card")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    generator = load_generator(args.generator, device)
    encoder_dir = Path(args.encoder)
    encoder = build_style_encoder(json.loads((encoder_dir / CONFIG_FILE).read_text()),
                                  load_file(str(encoder_dir / WEIGHTS_FILE))).to(device)
    identity = load_identity_encoder(args.identity).to(device)
    images = images_from_archive(args.data, split=args.split).images
    metrics = evaluate_encoder(generator, encoder, identity, images, args.batch)
    print(json.dumps(metrics), flush=True)
    if args.card:
        write_card_section(encoder_dir, metrics, args.data, args.split)
    return metrics


if __name__ == "__main__":
    main()
