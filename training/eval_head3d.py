"""Model-card metrics of a 3D head generator export (and of its photo encoder), as JSON.

    python -m training.eval_head3d --generator weights/head3d_faces128 --data datasets/faces/faces128.npz \
        [--encoder weights/head3d_encoder_faces128] --seeds 64 --photos 32 --out runs/head3d_eval.json [--card]

With `--card`, the generator's model card gets (or has replaced) an "Evaluation (eval_head3d)" section with the
metrics against the issue's targets.

* `face_detection_rate`: fraction of renders (seeds x yaw -40, -20, 0, 20, 40) in which `core.face` finds a face;
  `face_detection_by_yaw` the same per yaw.
  Renders smaller than 128 px (the 64-px CPU preview) are upsampled bicubically to 128 px for every detection.
* `identity_consistency`: identity cosine of each seed's frontal render to its yaw -30 and +30 renders (mean).
* `same_person_rate`: fraction of seeds whose frontal, -30 and +30 renders all show a detected face and whose turned
  renders are the frontal's person by dlib's descriptor distance (below 0.6): the issue's "for most heads". Renders
  that are no faces do not count as the same person, however alike their embeddings.
* Depth sanity (frontal renders): the renderer's depth at the nose tip against the cheeks, at MediaPipe landmarks
  when the render has a detected face, else at the FFHQ-aligned mean positions. `nose_in_front_rate` is the
  fraction of seeds whose nose is nearer than both cheeks, `nose_depth_margin` the mean (cheek - nose) depth in
  world units (positive: nose in front).
* `mesh_bulge_rate` (the issue's "nose tip is the frontmost point of the face region", read on the mesh the app
  exports): fraction of seeds whose mesh (`Head3DPipeline.extract_mesh`, 128^3 at the official level) has a
  largest piece whose front (largest z, toward the frontal camera) across the middle fifth of its width is ahead of
  its front across both outer fifths; a flat slab of fog or a concave shell fails. Seeds without a surface fail.
* `fd_id`: Frechet distance of identity embeddings, frontal renders vs the archive's test crops.
* Diversity (issue #9's "no collapse to one face" starts at the base): `identity_between_seeds`, the mean identity
  cosine between the frontal renders of different seeds, against `identity_between_test_crops`, the same over the
  test crops (different real people); `distinct_people_rate`, the fraction of neighbouring seeds (i, i + 1) whose
  frontal renders are different people by dlib's descriptor distance (at least 0.6), against
  `distinct_people_rate_test_crops` for neighbouring test crops.
* With an encoder, over `--photos` test crops, once per `--refine-steps` setting (e.g. `0,30`), a row of
  `inversion`: `identity` (mean identity cosine of each aligned crop to the frontal render of its inversion) and
  `same_person_rate` (fraction whose render at the crop's own camera is the crop's person by dlib's descriptor
  distance, below 0.6). With `--card`, the encoder's model card gets its own "Evaluation (eval_head3d)" section
  with these. `--seeds 0` measures the encoder alone (no generator metrics, the generator's card untouched).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from safetensors.torch import load_file

from core.face import detect_faces
from core.nets import CONFIG_FILE, WEIGHTS_FILE, load_generator
from core.nets.encoders import build_head3d_encoder
from core.pipelines.head3d import Head3DPipeline
from core.runtime import Runtime
from training.eval.cards import write_card_section
from training.eval.faces import (descriptor_distance, embed_aligned_faces, face_descriptors, frechet_identity_distance,
                                 identity_encoder)
from training.eval.metrics import distinct_neighbour_rate, mean_cross_cosine
from training.eval_taxfree import resize_like

DETECTION_YAWS = (-40.0, -20.0, 0.0, 20.0, 40.0)
CONSISTENCY_YAW = 30.0
NOSE_TIP, RIGHT_CHEEK, LEFT_CHEEK = 1, 50, 280  # MediaPipe face-mesh indices
# (x, y) of the nose tip and the cheeks in an FFHQ-aligned crop, as fractions of its side
ALIGNED_NOSE_AND_CHEEKS = ((0.5, 0.56), (0.35, 0.55), (0.65, 0.55))
DETECTION_MIN_SIDE = 128  # MediaPipe misses most faces in 64-px images


def detect(image: np.ndarray) -> list:
    """`core.face.detect_faces` on the render, upsampled bicubically to DETECTION_MIN_SIDE when smaller; landmarks
    are in the upsampled image's pixels."""
    if image.shape[1] < DETECTION_MIN_SIDE:
        image = resize_like(image[None], np.zeros((1, DETECTION_MIN_SIDE, DETECTION_MIN_SIDE, 3), np.uint8))[0]
    return detect_faces(image)


def nose_and_cheek_positions(image: np.ndarray) -> np.ndarray:
    """[3, 2] (x, y) fractions of the image side of the nose tip and the two cheeks of a frontal render."""
    faces = detect(image)
    if not faces:
        return np.asarray(ALIGNED_NOSE_AND_CHEEKS, np.float32)
    points = faces[0].landmarks[[NOSE_TIP, RIGHT_CHEEK, LEFT_CHEEK]]
    return (points / max(image.shape[1], DETECTION_MIN_SIDE)).astype(np.float32)


@torch.no_grad()
def nose_depth_margin(pipeline: Head3DPipeline, ws: torch.Tensor, image: np.ndarray) -> float:
    """Mean cheek depth minus nose depth (world units) of the frontal render of ws; positive = nose in front."""
    out = pipeline.generator.synthesis(ws, pipeline.camera(0, 0), deterministic=True, noise_mode="const")
    depth = out["image_depth"][0, 0].cpu().numpy()
    size = depth.shape[-1]
    positions = np.clip((nose_and_cheek_positions(image) * size).astype(int), 0, size - 1)
    nose, *cheeks = (float(depth[y, x]) for x, y in positions)
    return min(cheeks) - nose


def evaluate(pipeline: Head3DPipeline, test_crops: list[np.ndarray], seeds: int = 64, photos: int = 0,
             refine_steps: tuple[int, ...] = (0,), truncation_psi: float = 0.7) -> dict[str, Any]:
    """The metrics above for `seeds` seeds (none for 0) and `photos` inversions per refinement setting when the
    pipeline has an encoder."""
    if seeds == 1:
        raise ValueError("need at least 2 seeds (FD-id), or 0 for the encoder alone")
    metrics: dict[str, Any] = generator_metrics(pipeline, test_crops, seeds, truncation_psi) if seeds else {}
    if photos and pipeline.encoder is not None:
        threshold = pipeline.identity.config["same_person_distance"]
        metrics["inversion"] = []
        for steps in refine_steps:
            inversions = [pipeline.invert(crop, steps) for crop in test_crops[:photos]]
            distances = descriptor_distance([item.aligned for item in inversions],
                                            [item.reconstruction for item in inversions], pipeline.identity)
            metrics["inversion"].append({
                "refine_steps": steps, "photos": len(inversions),
                "identity": float(np.mean([item.identity_similarity for item in inversions])),
                "same_person_rate": float(np.mean(distances < threshold))})
    return metrics


def generator_metrics(pipeline: Head3DPipeline, test_crops: list[np.ndarray], seeds: int,
                      truncation_psi: float) -> dict[str, Any]:
    """The generator's metrics above over `seeds` seeds."""
    views = [(yaw, 0.0) for yaw in DETECTION_YAWS] + [(-CONSISTENCY_YAW, 0.0), (CONSISTENCY_YAW, 0.0)]
    renders, frontal, turned, margins, bulges = [], [], [], [], []
    for seed in range(seeds):
        ws = pipeline.latent(seed, truncation_psi)
        images = pipeline.render_views(ws, views)
        renders.extend(images[:len(DETECTION_YAWS)])
        frontal.append(images[DETECTION_YAWS.index(0.0)])
        turned.append(images[len(DETECTION_YAWS):])
        margins.append(nose_depth_margin(pipeline, ws, frontal[-1]))
        bulges.append(mesh_bulges(pipeline, ws))
    consistency = [pipeline.identity_similarity(np.stack([front, front]), pair)
                   for front, pair in zip(frontal, turned)]
    detected = [bool(detect(image)) for image in renders]
    frontal_detected = detected[DETECTION_YAWS.index(0.0)::len(DETECTION_YAWS)]
    threshold = pipeline.identity.config["same_person_distance"]
    same_person = [found and all(detect(view) for view in pair)
                   and bool(np.all(descriptor_distance([front, front], list(pair), pipeline.identity) < threshold))
                   for found, front, pair in zip(frontal_detected, frontal, turned)]
    metrics: dict[str, Any] = {
        "seeds": seeds,
        "face_detection_rate": float(np.mean(detected)),
        "face_detection_by_yaw": {f"{yaw:g}": float(np.mean(detected[index::len(DETECTION_YAWS)]))
                                  for index, yaw in enumerate(DETECTION_YAWS)},
        "identity_consistency": float(np.mean(consistency)),
        "same_person_rate": float(np.mean(same_person)),
        "nose_in_front_rate": float(np.mean([margin > 0 for margin in margins])),
        "nose_depth_margin": float(np.mean(margins)),
        "mesh_bulge_rate": float(np.mean(bulges)),
        "fd_id": frechet_identity_distance(frontal, test_crops, pipeline.identity),
        "test_crops": len(test_crops),
    }
    return {**metrics, **diversity(frontal, test_crops[:seeds], pipeline.identity, threshold)}


def mesh_bulges(pipeline: Head3DPipeline, ws: torch.Tensor) -> bool:
    """Whether the largest piece of the head's mesh is frontmost across the middle fifth of its width (see
    `mesh_bulge_rate` in the module doc); False when there is no surface."""
    try:
        vertices, faces, _ = pipeline.extract_mesh(ws)
    except ValueError:  # no surface at the level
        return False
    pieces = trimesh.Trimesh(vertices=vertices, faces=faces, process=False).split(only_watertight=False)
    piece = max(pieces, key=lambda part: len(part.faces))
    x, z = piece.vertices[:, 0], piece.vertices[:, 2]
    fifth = np.clip(((x - x.min()) / max(float(np.ptp(x)), 1e-9) * 5).astype(int), 0, 4)
    if not (fifth == 2).any():  # a gap across the middle
        return False
    left, middle, right = (z[fifth == index].max() for index in (0, 2, 4))
    return bool(middle > left and middle > right)


def diversity(frontal: list[np.ndarray], crops: list[np.ndarray], identity, threshold: float) -> dict[str, float]:
    """How different the heads of different seeds are, next to as many real test crops (see the module doc)."""
    return {"identity_between_seeds": mean_cross_cosine(embed_aligned_faces(frontal, identity)),
            "identity_between_test_crops": mean_cross_cosine(embed_aligned_faces(crops, identity)),
            "distinct_people_rate": distinct_neighbour_rate(face_descriptors(frontal, identity), threshold),
            "distinct_people_rate_test_crops": distinct_neighbour_rate(face_descriptors(crops, identity), threshold)}


def card_section(metrics: dict[str, Any]) -> str:
    """The model card's "## Evaluation (eval_head3d)" markdown section."""
    def check(ok: bool) -> str:
        return "✓" if ok else "✗"

    rows = [
        ("face detected, yaw -40..40 (5 views per head)", f"{metrics['face_detection_rate']:.1%}", ">= 95 %",
         check(metrics["face_detection_rate"] >= 0.95)),
    ]
    if "face_detection_by_yaw" in metrics:
        by_yaw = metrics["face_detection_by_yaw"]
        rows.append((f"face detected at yaw {' / '.join(by_yaw)}",
                     " / ".join(f"{rate:.0%}" for rate in by_yaw.values()), "reported", ""))
    rows += [
        ("identity cosine frontal vs ±30°", f"{metrics['identity_consistency']:.3f}", "reported", ""),
        ("same person frontal vs ±30° (dlib distance < 0.6, faces detected)", f"{metrics['same_person_rate']:.1%}",
         "most heads", check(metrics["same_person_rate"] > 0.5)),
        ("nose nearer than both cheeks (frontal depth)", f"{metrics['nose_in_front_rate']:.1%}", ">= 95 %",
         check(metrics["nose_in_front_rate"] >= 0.95)),
        ("mean cheek - nose depth (world units)", f"{metrics['nose_depth_margin']:+.4f}", "> 0",
         check(metrics["nose_depth_margin"] > 0)),
    ]
    if "mesh_bulge_rate" in metrics:
        rows.append(("mesh's largest piece frontmost across its middle fifth (GLB shape, 128³)",
                     f"{metrics['mesh_bulge_rate']:.1%}", ">= 95 %", check(metrics["mesh_bulge_rate"] >= 0.95)))
    rows += [
        (f"FD-id, frontal renders vs {metrics['test_crops']} {metrics.get('split', 'test')} crops",
         f"{metrics['fd_id']:.3f}", "reported", ""),
    ]
    if "identity_between_seeds" in metrics:
        rows += [
            ("identity cosine between different seeds' frontal renders (different test crops)",
             f"{metrics['identity_between_seeds']:.3f} ({metrics['identity_between_test_crops']:.3f})", "reported",
             ""),
            ("neighbouring seeds that are different people, dlib distance >= 0.6 (neighbouring test crops)",
             f"{metrics['distinct_people_rate']:.1%} ({metrics['distinct_people_rate_test_crops']:.1%})", "reported",
             ""),
        ]
    rows += inversion_rows(metrics)
    lines = ["", "## Evaluation (eval_head3d)", "",
             f"`python -m training.eval_head3d` on {metrics['seeds']} seeds (truncation 0.7); renders smaller than "
             f"{DETECTION_MIN_SIDE} px are upsampled to it for face detection.", "",
             "| metric | value | target | |", "|---|---|---|---|"]
    lines += [f"| {name} | {value} | {target} | {ok} |" for name, value, target, ok in rows]
    return "\n".join(lines) + "\n"


def inversion_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The photo-inversion rows of a card table, two per refinement setting (none without an encoder)."""
    rows = []
    for row in metrics.get("inversion", []):
        setting = f"{row['photos']} test crops, {row['refine_steps']} refinement steps"
        rows += [(f"photo inversion: identity cosine, crop vs frontal render ({setting})", f"{row['identity']:.3f}",
                  "reported", ""),
                 (f"photo inversion: same person, crop vs render at its camera (dlib distance < 0.6; {setting})",
                  f"{row['same_person_rate']:.1%}", "reported", "")]
    return rows


def encoder_card_section(metrics: dict[str, Any]) -> str:
    """The encoder's model card section "## Evaluation (eval_head3d)": the photo-inversion rows."""
    lines = ["", "## Evaluation (eval_head3d)", "",
             f"`python -m training.eval_head3d --encoder` with the generator `{metrics['generator']}`; each crop is "
             "aligned and its camera estimated as in the app (`core.face.prepare_face`).", "",
             "| metric | value | target | |", "|---|---|---|---|"]
    lines += [f"| {name} | {value} | {target} | {ok} |" for name, value, target, ok in inversion_rows(metrics)]
    return "\n".join(lines) + "\n"


def load_pipeline(generator_dir: str | Path, encoder_dir: str | Path | None = None,
                  device: str = "cpu") -> Head3DPipeline:
    """A pipeline over a head3d export (and an encoder export) with the bundled identity network."""
    encoder = None
    if encoder_dir is not None:
        config = json.loads((Path(encoder_dir) / CONFIG_FILE).read_text())
        encoder = build_head3d_encoder(config, load_file(str(Path(encoder_dir) / WEIGHTS_FILE)))
    return Head3DPipeline(load_generator(generator_dir), Runtime(device), model_name=str(generator_dir),
                          encoder=encoder, identity=identity_encoder())


def main(argv: list[str] | None = None) -> None:
    from training.data.archive import load_archive

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="head3d export folder")
    parser.add_argument("--encoder", help="Head3DEncoder export folder (adds the photo inversion metric)")
    parser.add_argument("--data", required=True, help="archive whose test split is the FD-id reference and photos")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--refine-steps", default="0", help="refinement settings of the inversion rows, e.g. 0,30")
    parser.add_argument("--max-crops", type=int, default=1000)
    parser.add_argument("--out", help="write the metrics JSON here")
    parser.add_argument("--card", action="store_true", help="write the evaluation sections of the generator's card"
                        " (and of the encoder's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    archive = load_archive(args.data, split=args.split)
    crops = [archive.image(i) for i in range(min(len(archive), args.max_crops))]
    pipeline = load_pipeline(args.generator, args.encoder, args.device)
    refine_steps = tuple(int(steps) for steps in args.refine_steps.split(","))
    metrics = evaluate(pipeline, crops, args.seeds, args.photos, refine_steps)
    metrics.update(generator=str(args.generator), encoder=args.encoder, data=args.data, split=args.split)
    text = json.dumps(metrics, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text, flush=True)
    if args.card:
        if args.seeds:
            write_card_section(Path(args.generator) / "README.md", card_section(metrics),
                               key="Evaluation (eval_head3d)")
        if metrics.get("inversion"):
            write_card_section(Path(args.encoder) / "README.md", encoder_card_section(metrics),
                               key="Evaluation (eval_head3d)")


if __name__ == "__main__":
    main()
