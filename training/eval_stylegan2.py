"""Evaluate an unconditional base generator (issue #5's targets for the suite's 2D StyleGAN2).

    python -m training.eval_stylegan2 --generator weights/stylegan2_faces128 --data datasets/faces/faces128.npz \
        --samples 1000 --out runs/eval_stylegan2.json --update-card

* Face-detection rate: `--samples` images of seeds 0.. at truncation `--psi` (0.7, as the beauty tab samples), resized
  to the archive's crop size like `training.eval_taxfree` does, through MediaPipe (`core.face.detect_faces`).
* FD-id (`training.eval.metrics.frechet_distance` of `core.identity` embeddings) of as many untruncated samples
  (psi 1) as the test split has crops, against those crops; as many real train crops give the floor at that count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from core.face import detect_faces
from core.nets import load_generator
from training.eval.cards import write_card_section
from training.eval.faces import embed_aligned_faces
from training.eval.metrics import frechet_distance
from training.eval_taxfree import resize_like

CARD_FILE = "README.md"


@torch.no_grad()
def sample(generator: torch.nn.Module, count: int, psi: float, batch: int = 32) -> np.ndarray:
    """uint8 [count, H, W, 3] images of z = seeds 0..count-1 (`np.random.RandomState(seed)`, the NVlabs convention)."""
    z = torch.from_numpy(np.stack([np.random.RandomState(seed).randn(generator.z_dim) for seed in range(count)])).float()
    c = torch.zeros([count, generator.c_dim])
    images = torch.cat([generator(z[i:i + batch], c[i:i + batch], truncation_psi=psi, noise_mode="const")
                        for i in range(0, count, batch)])
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def evaluate(generator_dir: str | Path, data: str | Path, samples: int = 1000, psi: float = 0.7,
             seed: int = 0) -> dict:
    """Detection rate at `psi` and FD-id at psi 1 of the generator in `generator_dir` on `data`'s test split."""
    from training.data.archive import load_archive

    generator = load_generator(generator_dir).eval()
    test, train = load_archive(data, split="test"), load_archive(data, split="train")
    reals = np.stack([test.image(i) for i in range(len(test))])
    truncated = resize_like(sample(generator, samples, psi), reals)
    detected = float(np.mean([bool(detect_faces(image)) for image in truncated]))
    real_embeddings = embed_aligned_faces(list(reals))
    untruncated = resize_like(sample(generator, len(reals), 1.0), reals)
    picks = np.random.default_rng(seed).choice(len(train), min(len(reals), len(train)), replace=False)
    floor = frechet_distance(embed_aligned_faces([train.image(int(i)) for i in picks]), real_embeddings)
    return {"generator": str(generator_dir), "data": str(data), "generated_px": generator.img_resolution,
            "crop_px": reals.shape[1], "samples": samples, "psi": psi, "face_detected": detected, "fd_id_count": len(reals),
            "fd_id": frechet_distance(embed_aligned_faces(list(untruncated)), real_embeddings), "fd_id_real_floor": floor}


def card_section(result: dict) -> str:
    return (f"\n## Measured metrics (`training/eval_stylegan2.py`)\n\n"
            f"| metric | value |\n|---|---|\n"
            f"| face detected (MediaPipe), {result['samples']} samples at psi {result['psi']} | "
            f"{result['face_detected']:.1%} |\n"
            f"| FD-id vs the test split, {result['fd_id_count']} samples at psi 1 | {result['fd_id']:.4f} |\n"
            f"| FD-id of as many real train crops (the floor at that count) | {result['fd_id_real_floor']:.4f} |\n"
            + (f"\nThe {result['generated_px']}-px images are resized to the crops' {result['crop_px']} px before both "
               "measurements.\n" if result["generated_px"] != result["crop_px"] else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="export folder (core.nets.load_generator)")
    parser.add_argument("--data", required=True, help="archive whose test split is used (faces128.npz)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--psi", type=float, default=0.7)
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--update-card", action="store_true", help="write the table into the generator's README.md")
    args = parser.parse_args(argv)
    result = evaluate(args.generator, args.data, args.samples, args.psi)
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.update_card:
        write_card_section(Path(args.generator) / CARD_FILE, card_section(result), key="`training/eval_stylegan2.py`")


if __name__ == "__main__":
    main()
