"""Evaluate the beauty optimiser on held-out faces against issue #5's targets, with a run's default settings.

    python -m training.eval_beauty --generator weights/stylegan2_faces128 --encoder weights/style_encoder_faces128 \
        --data datasets/faces/faces256.npz --faces 50 --out runs/eval_beauty.json --card weights/style_encoder_faces128

Each of the first `--faces` crops of the archive's test split goes in as a photo (`core.face.prepare_face` detects and
aligns it) and is optimised with the tab's defaults (`core.pipelines.beauty.DEFAULT_*`), CMA-ES seeded with the
face's index. Per face: the objective's scorer before and after, the independent evaluator (`beauty-evaluator`,
trained on the other half of MEBeauty) before and after, and the identity network's raw-descriptor distance of the
optimised face to the input photo, judged by dlib's same-person threshold (0.6); the same for the reconstruction,
so that what inversion loses and what optimisation moves away can be told apart. The summary is what the issue
asks: the evaluator's mean gain (> 0) and the same-person rate (>= 90 %).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.face import FaceInputError
from core.pipelines.beauty import (DEFAULT_BUDGET, DEFAULT_IDENTITY_WEIGHT, DEFAULT_POPULATION, DEFAULT_STRENGTH,
                                   BeautyOptimizer)
from training.eval.cards import write_card_section
from training.eval.faces import descriptor_distance

CARD_FILE = "README.md"
DEFAULTS = {"budget": DEFAULT_BUDGET, "population": DEFAULT_POPULATION, "identity_weight": DEFAULT_IDENTITY_WEIGHT,
            "strength": DEFAULT_STRENGTH}


def evaluate(optimizer: BeautyOptimizer, photos: list[np.ndarray], budget: int = DEFAULT_BUDGET,
             population: int = DEFAULT_POPULATION, identity_weight: float = DEFAULT_IDENTITY_WEIGHT,
             strength: float = DEFAULT_STRENGTH) -> dict[str, Any]:
    """Per-face rows and their summary; photos without a usable face are counted, not optimised."""
    threshold = float(optimizer.identity.config["same_person_distance"])
    rows, skipped = [], []
    for index, photo in enumerate(photos):
        try:
            result = optimizer(photo, seed=index, budget=budget, population=population,
                               identity_weight=identity_weight, strength=strength)
        except FaceInputError as error:
            skipped.append({"face": index, "reason": str(error)})
            continue
        distances = descriptor_distance([result.input_image] * 2, [result.optimized, result.reconstruction],
                                        optimizer.identity)
        rows.append({
            "face": index, "score_before": result.score_before, "score_after": result.score_after,
            "evaluator_before": result.evaluator_before, "evaluator_after": result.evaluator_after,
            "identity_cosine": result.identity_similarity, "distance_to_input": float(distances[0]),
            "reconstruction_distance_to_input": float(distances[1]), "seconds": result.timings["total_s"],
        })  # fmt: skip
    if not rows:
        raise ValueError("no photo had a usable face")

    def column(key: str) -> np.ndarray:
        return np.array([row[key] for row in rows])

    evaluator_gain = column("evaluator_after") - column("evaluator_before")
    summary = {
        "faces": len(rows), "skipped": len(skipped), "same_person_distance": threshold,
        "settings": {"budget": budget, "population": population, "identity_weight": identity_weight,
                     "strength": strength},
        "identity_barrier": {"margin": optimizer.settings.identity_margin,
                             "weight": optimizer.settings.identity_barrier},
        "scorer_gain_mean": float(np.mean(column("score_after") - column("score_before"))),
        "evaluator_gain_mean": float(np.mean(evaluator_gain)),
        "evaluator_gain_positive_rate": float(np.mean(evaluator_gain > 0)),
        "same_person_rate": float(np.mean(column("distance_to_input") < threshold)),
        "reconstruction_same_person_rate": float(np.mean(column("reconstruction_distance_to_input") < threshold)),
        "identity_cosine_mean": float(np.mean(column("identity_cosine"))),
        "seconds_mean": float(np.mean(column("seconds"))),
    }  # fmt: skip
    return {"summary": summary, "faces": rows, "skipped": skipped}


def card_section(summary: dict[str, Any], data: str, split: str) -> str:
    """Markdown section for a model card: the issue's two targets and what stands behind them."""
    s, settings = summary, summary["settings"]
    return (
        f"\n## Beauty optimisation on held-out faces (`training/eval_beauty.py`, {s['faces']} {split} crops of "
        f"`{Path(data).name}`)\n\n"
        f"Settings: {'the tab defaults' if settings == DEFAULTS else 'not the tab defaults'} "
        f"({settings['budget']} generations x {settings['population']} candidates, "
        f"identity weight {settings['identity_weight']}, strength {settings['strength']}); identity barrier from "
        f"descriptor distance {s['same_person_distance'] - s['identity_barrier']['margin']:g} on, weight "
        f"{s['identity_barrier']['weight']:g}; {s['skipped']} photos skipped (no usable face).\n\n"
        "| measure | value | target |\n|---|---|---|\n"
        f"| independent evaluator: mean gain | {s['evaluator_gain_mean']:+.3f} "
        f"(positive for {100 * s['evaluator_gain_positive_rate']:.0f} % of faces) | > 0 |\n"
        f"| optimised face is the same person as the input (descriptor distance < {s['same_person_distance']}) | "
        f"{100 * s['same_person_rate']:.1f} % | >= 90 % |\n"
        f"| reconstruction is the same person as the input | {100 * s['reconstruction_same_person_rate']:.1f} % | |\n"
        f"| objective's scorer: mean gain | {s['scorer_gain_mean']:+.3f} | |\n"
        f"| identity cosine, optimised vs input (mean) | {s['identity_cosine_mean']:.3f} | |\n"
        f"| seconds per face (mean, this machine) | {s['seconds_mean']:.1f} | |\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from safetensors.torch import load_file

    from core.nets import CONFIG_FILE, WEIGHTS_FILE, load_generator
    from core.nets.encoders import build_style_encoder
    from core.runtime import Runtime
    from training.data.archive import load_archive

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="StyleGAN2 export folder (training.train_stylegan2)")
    parser.add_argument("--encoder", required=True, help="style encoder export folder (training.train_encoder)")
    parser.add_argument("--data", required=True, help="archive whose split supplies the held-out photos")
    parser.add_argument("--split", default="test")
    parser.add_argument("--faces", type=int, default=50)
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    parser.add_argument("--population", type=int, default=DEFAULT_POPULATION)
    parser.add_argument("--identity-weight", type=float, default=DEFAULT_IDENTITY_WEIGHT)
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH)
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--card", help="write the summary into this model folder's README.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    encoder_dir = Path(args.encoder)
    encoder = build_style_encoder(json.loads((encoder_dir / CONFIG_FILE).read_text()),
                                  load_file(str(encoder_dir / WEIGHTS_FILE)))
    optimizer = BeautyOptimizer.from_pretrained(generator=load_generator(args.generator), encoder=encoder,
                                                runtime=Runtime(args.device))
    archive = load_archive(args.data, split=args.split)
    photos = [archive.image(i) for i in range(min(args.faces, len(archive)))]
    results = evaluate(optimizer, photos, budget=args.budget, population=args.population,
                       identity_weight=args.identity_weight, strength=args.strength)
    results.update(generator=args.generator, encoder=args.encoder, data=args.data, split=args.split)
    print(json.dumps(results["summary"], indent=1), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.card:
        write_card_section(Path(args.card) / CARD_FILE, card_section(results["summary"], args.data, args.split))
    return results


if __name__ == "__main__":
    main()
