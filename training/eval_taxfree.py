"""Evaluate 3DMM-conditioned generators against the unconditional base on the test split (methods.md section 1).

    python -m training.eval_taxfree --data datasets/faces/faces128.npz --base weights/stylegan2_faces128 \
        --taxfree weights/taxfree_faces128 --overconstrained weights/overconstrained_faces128 \
        --out runs/eval_taxfree.json --update-cards

For each generator: one image per test sample (seed-fixed z; conditional models get that sample's 3DMM vector p,
normalised as in their config.json `conditioning`), then
* FD-id (`training.eval.metrics.frechet_distance` of `core.identity` embeddings) against the real test crops; the
  difference to the base generator is the measured quality tax;
* pose control: MediaPipe landmarks (`core.face.detect_faces`) -> `core.face.estimate_pose` on the generated image,
  compared with the same landmark pose of the real test crop whose p was requested (one estimator on both sides, so
  no 3DMM-to-landmark convention enters); median absolute yaw and pitch error in degrees, and the detection rate;
* expression control: F_R (`weights/face3dmm_estimator`) on the generated image vs the requested p (curated
  expressions MAE / Pearson r, and all groups), plus an estimator-independent check: Pearson r between the
  requested jawOpen and the landmark mouth opening (inner-lip gap / face height).
* slider control, what the tab does: for `slider_seeds` seeds (random identity from the seed, the other groups at
  the training mean, as `core.pipelines.taxfree.TaxFreePipeline` builds p), only the yaw (then only the pitch) is
  swept over `SLIDER_YAWS` (`SLIDER_PITCHES`) and the landmark pose of each image is measured. The landmark pose is
  the camera's look-at angle, not the head's 3DMM rotation, so the expected landmark angle of a request comes from
  a line fitted to the test split's (3DMM angle, landmark angle) pairs; reported: the median absolute error to that
  line (deg), the Pearson r of requested vs measured angle and the fitted slope next to the data's;
* seed variety: how much the image changes with z at a fixed p against how much it changes with p at a fixed z
  (`seed_variety`): a conditional generator that memorised its training labels ignores z.
The real test crops go through the same measurements as a reference row (F_R's own error; pose error 0 by
construction); its FD-id is that of as many real train crops against the test crops (the floor at this sample
count: FD-id grows as the count shrinks, so compare rows of one run only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.face import FaceInputError, detect_faces, estimate_pose
from core.face3dmm import EXPRESSION_NAMES
from core.nets import CONFIG_FILE, load_generator
from core.nets.face3dmm_estimator import Face3DMMEstimator, load_face3dmm_estimator
from training.eval.cards import write_card_section
from training.eval.faces import embed_aligned_faces
from training.eval.metrics import frechet_distance
from training.train_face3dmm_estimator import parameter_errors, pearson
from training.train_taxfree import DEFAULT_ESTIMATOR, estimator_path

# MediaPipe Face Mesh indices: inner upper / lower lip midpoints, forehead top, chin bottom.
UPPER_INNER_LIP, LOWER_INNER_LIP, FOREHEAD, CHIN = 13, 14, 10, 152
MODEL_NAMES = ("base", "taxfree", "overconstrained")
SLIDER_YAWS = (-30.0, -15.0, 0.0, 15.0, 30.0)  # the control range: yaw in [-30, 30] deg
SLIDER_PITCHES = (-20.0, -10.0, 0.0, 10.0, 20.0)


def landmark_measurements(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image (uint8 [N, H, W, 3]): yaw, pitch (degrees) and mouth opening of the largest face; NaN if none."""
    poses, mouths = np.full((len(images), 2), np.nan), np.full(len(images), np.nan)
    for i, image in enumerate(images):
        faces = detect_faces(image)
        if not faces:
            continue
        points = faces[0].landmarks
        try:
            pose = estimate_pose(points, (image.shape[1], image.shape[0]))
        except FaceInputError:
            continue
        poses[i] = pose.yaw, pose.pitch
        height = np.linalg.norm(points[FOREHEAD] - points[CHIN])
        mouths[i] = np.linalg.norm(points[UPPER_INNER_LIP] - points[LOWER_INNER_LIP]) / max(height, 1e-6)
    return {"pose": poses, "mouth_opening": mouths}


@torch.no_grad()
def generate(generator: torch.nn.Module, labels: torch.Tensor | None, count: int, seed: int = 0,
             batch: int = 32) -> np.ndarray:
    """uint8 [count, H, W, 3] images of seed-fixed z; `labels` (normalised c, [count, c_dim]) or None."""
    z = torch.randn([count, generator.z_dim], generator=torch.Generator().manual_seed(seed))
    c = torch.zeros([count, 0]) if labels is None else labels
    images = torch.cat([generator(z[i:i + batch], c[i:i + batch], noise_mode="const") for i in range(0, count, batch)])
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def resize_like(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`images` (uint8 [N, h, w, 3]) bicubically resized to the size of `reference`'s images: a generator smaller
    than the archive (a CPU pilot, `training.data.downscale`) is measured like the real crops it is compared with."""
    size = reference.shape[1:3]
    if images.shape[1:3] == size:
        return images
    writable = np.require(images, requirements="W")  # read-only arrays (decoded images) are copied
    x = F.interpolate(torch.from_numpy(writable).permute(0, 3, 1, 2).float(), size=size, mode="bicubic",
                      align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def conditioning_of(directory: str | Path) -> dict | None:
    """The `conditioning` block of a generator's config.json (None for an unconditional one)."""
    return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("conditioning")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def evaluate_images(images: np.ndarray, requested: np.ndarray | None, real_embeddings: np.ndarray,
                    real_landmarks: dict[str, np.ndarray], estimator: Face3DMMEstimator) -> dict:
    """All metrics of one image set; `requested` (raw p per image) is None for an unconditional generator."""
    result = {"count": len(images), "fd_id": frechet_distance(embed_aligned_faces(list(images)), real_embeddings)}
    if requested is None:
        return result
    landmarks = landmark_measurements(images)
    found = np.isfinite(landmarks["pose"]).all(1) & np.isfinite(real_landmarks["pose"]).all(1)
    error = np.abs(landmarks["pose"][found] - real_landmarks["pose"][found])
    result["pose_control"] = {
        "detected": float(np.isfinite(landmarks["pose"]).all(1).mean()), "pairs": int(found.sum()),
        "yaw_median_deg": float(np.median(error[:, 0])) if len(error) else float("nan"),
        "pitch_median_deg": float(np.median(error[:, 1])) if len(error) else float("nan"),
    }  # fmt: skip
    predicted = torch.cat([estimator.denormalise(estimator(x)) for x in _to_tensor(images).split(64)]).numpy()
    result["estimator_vs_requested"] = parameter_errors(predicted, requested, estimator.num_identity)
    jaw = requested[:, estimator.num_identity + EXPRESSION_NAMES.index("jawOpen")]
    opened = np.isfinite(landmarks["mouth_opening"])
    result["jaw_open_vs_mouth_opening_r"] = pearson(jaw[opened], landmarks["mouth_opening"][opened]) \
        if opened.sum() > 2 else float("nan")  # fmt: skip
    return result


def angle_relation(face3dmm: np.ndarray, pose: np.ndarray, axis: int) -> tuple[float, float]:
    """Slope and intercept of the landmark angle (`pose[:, axis]`, look-at yaw or pitch) against the 3DMM rotation
    angle (`face3dmm` rotation entry `axis`) over the samples where both exist."""
    from core.nets.face3dmm_estimator import parameter_groups

    num_identity = face3dmm.shape[1] - parameter_groups(0)["lighting"].stop
    angle = face3dmm[:, parameter_groups(num_identity)["rotation"].start + axis]
    ok = np.isfinite(angle) & np.isfinite(pose[:, axis])
    slope, intercept = np.polyfit(angle[ok], pose[ok, axis], 1)
    return float(slope), float(intercept)


@torch.no_grad()
def slider_control(generator: torch.nn.Module, conditioning: dict, relations: dict[str, tuple[float, float]],
                   seeds: int, reference_size: int) -> dict:
    """The tab's sliders: per seed, sweep only the yaw (then only the pitch) and measure the landmark angle of the
    image (resized to `reference_size`); errors against the data's (3DMM angle -> landmark angle) line."""
    from core.pipelines.taxfree import FaceControls, TaxFreePipeline

    pipeline = TaxFreePipeline({"model": generator}, {"model": conditioning})
    result = {"seeds": seeds}
    for axis, (name, values) in enumerate((("yaw", SLIDER_YAWS), ("pitch", SLIDER_PITCHES))):
        requested, images = [], []
        for seed in range(seeds):
            for value in values:
                controls = FaceControls(**{name: value})
                images.append(pipeline(controls, seed=seed, random_identity=True).images["model"])
                requested.append(value)
        images = resize_like(np.stack(images), np.zeros((1, reference_size, reference_size, 3), np.uint8))
        measured = landmark_measurements(images)["pose"][:, axis]
        requested = np.asarray(requested)
        found = np.isfinite(measured)
        slope, intercept = relations[name]
        error = np.abs(measured[found] - (slope * requested[found] + intercept))
        fitted = np.polyfit(requested[found], measured[found], 1)[0] if found.sum() > 2 else float("nan")
        result[name] = {
            "detected": float(found.mean()), "median_error_deg": float(np.median(error)) if found.any() else float("nan"),
            "r": pearson(requested[found], measured[found]) if found.sum() > 2 else float("nan"),
            "slope": float(fitted), "data_slope": slope,
        }  # fmt: skip
    return result


@torch.no_grad()
def seed_variety(generator: torch.nn.Module, c: torch.Tensor, seeds: int = 8) -> dict:
    """How much z matters next to c: the per-pixel standard deviation over `seeds` latents at each fixed c (rows of
    `c`), and over the rows of `c` at each fixed latent, both averaged (images in [0, 1])."""
    z = torch.randn([seeds, generator.z_dim], generator=torch.Generator().manual_seed(0))
    images = torch.stack([generator(z, row.expand(seeds, -1), noise_mode="const") for row in c])  # [labels, seeds, ...]
    images = (images.clamp(-1, 1) + 1) / 2
    over_seeds, over_labels = float(images.std(dim=1).mean()), float(images.std(dim=0).mean())
    return {"labels": len(c), "seeds": seeds, "std_over_seeds": over_seeds, "std_over_labels": over_labels,
            "ratio": over_seeds / over_labels}


def evaluate(data: str | Path, generators: dict[str, str | Path], estimator_dir: str | Path = DEFAULT_ESTIMATOR,
             count: int | None = None, seed: int = 0, slider_seeds: int = 20) -> dict:
    """Metrics of the real test crops ("real") and of each named generator folder on the archive's test split."""
    from training.data.archive import load_archive

    archive = load_archive(data, split="test")
    labels = np.asarray(archive.face3dmm, dtype=np.float32)
    keep = np.flatnonzero(np.isfinite(labels).all(axis=1))[:count]
    reals = np.stack([archive.image(int(i)) for i in keep])
    requested = labels[keep]
    estimator = load_face3dmm_estimator(estimator_path(estimator_dir))
    real_embeddings = embed_aligned_faces(list(reals))
    real_landmarks = landmark_measurements(reals)
    relations = {name: angle_relation(labels, np.asarray(archive.pose, dtype=np.float32), axis)
                 for axis, name in enumerate(("yaw", "pitch"))}
    results = {"data": str(data), "split": "test", "count": len(keep), "seed": seed,
               "angle_relations": {name: {"slope": a, "intercept": b} for name, (a, b) in relations.items()}}
    real = evaluate_images(reals, requested, real_embeddings, real_landmarks, estimator)
    train = load_archive(data, split="train")  # floor: as many real train crops as generated images, vs test
    picks = np.random.default_rng(seed).choice(len(train), min(len(keep), len(train)), replace=False)
    real["fd_id"] = frechet_distance(embed_aligned_faces([train.image(int(i)) for i in picks]), real_embeddings)
    results["real"] = real
    for name, directory in generators.items():
        generator = load_generator(directory)
        conditioning = conditioning_of(directory)
        c = None
        if conditioning is not None:
            mean, std = (torch.tensor(conditioning[key]) for key in ("mean", "std"))
            c = (torch.from_numpy(requested) - mean) / std
        images = generate(generator, c, len(keep), seed)
        generated_px = images.shape[1]
        images = resize_like(images, reals)
        results[name] = evaluate_images(images, None if c is None else requested, real_embeddings, real_landmarks,
                                        estimator)  # fmt: skip
        results[name].update(generator=str(directory), generated_px=generated_px)
        if c is not None:
            results[name]["seed_variety"] = seed_variety(generator, c[:8])
        if conditioning is not None and slider_seeds:
            results[name]["slider_control"] = slider_control(generator, conditioning, relations, slider_seeds,
                                                             reals.shape[1])
    return results


def summary_table(results: dict) -> str:
    """Markdown table: FD-id, pose control and curated expression control per image set."""

    def cell(value, digits=2):
        return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    lines = ["| images | FD-id (vs test) | face detected | yaw err. median (deg) | pitch err. median (deg) | "
             "jawOpen r (F_R) | smile r (F_R, L/R mean) | jawOpen vs mouth opening r |", "|---" * 8 + "|"]
    for name in ("real", *MODEL_NAMES):
        if name not in results:
            continue
        row = results[name]
        pose = row.get("pose_control", {})
        curated = row.get("estimator_vs_requested", {}).get("curated_expressions", {})
        smile = np.mean([curated[k]["r"] for k in ("mouthSmile_L", "mouthSmile_R")]) if curated else None
        label = "real (FD-id: train crops)" if name == "real" else f"{name} (`{row['generator']}`)"
        lines.append(f"| {label} | {cell(row['fd_id'], 4)} | {cell(pose.get('detected'))} | "
                     f"{cell(pose.get('yaw_median_deg'))} | {cell(pose.get('pitch_median_deg'))} | "
                     f"{cell(curated.get('jawOpen', {}).get('r'))} | {cell(smile)} | "
                     f"{cell(row.get('jaw_open_vs_mouth_opening_r'))} |")
    sliders = [(name, results[name]["slider_control"]) for name in MODEL_NAMES if "slider_control" in results.get(name, {})]
    if sliders:
        lines += ["", f"Sliders (only yaw, then only pitch changed; {sliders[0][1]['seeds']} seeds with random identity; "
                  f"yaw {', '.join(f'{v:g}' for v in SLIDER_YAWS)}, pitch {', '.join(f'{v:g}' for v in SLIDER_PITCHES)} "
                  "deg; landmark angle vs the data's 3DMM-to-landmark line):", "",
                  "| generator | yaw err. median (deg) | yaw r | yaw slope (data) | pitch err. median (deg) | pitch r | "
                  "pitch slope (data) | face detected |", "|---" * 8 + "|"]
        for name, row in sliders:
            yaw, pitch = row["yaw"], row["pitch"]
            lines.append(f"| {name} | {cell(yaw['median_error_deg'])} | {cell(yaw['r'])} | {cell(yaw['slope'])} "
                         f"({cell(yaw['data_slope'])}) | {cell(pitch['median_error_deg'])} | {cell(pitch['r'])} | "
                         f"{cell(pitch['slope'])} ({cell(pitch['data_slope'])}) | "
                         f"{cell(min(yaw['detected'], pitch['detected']))} |")
    varieties = [(name, results[name]["seed_variety"]) for name in MODEL_NAMES if "seed_variety" in results.get(name, {})]
    if varieties:
        lines += ["", f"How much the latent z matters next to p ({varieties[0][1]['labels']} test labels x "
                  f"{varieties[0][1]['seeds']} seeds; per-pixel std, images in [0, 1]):", "",
                  "| generator | std over seeds (fixed p) | std over labels (fixed z) | ratio |", "|---|---|---|---|"]
        lines += [f"| {name} | {cell(v['std_over_seeds'], 3)} | {cell(v['std_over_labels'], 3)} | {cell(v['ratio'])} |"
                  for name, v in varieties]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="archive whose test split is used (faces128.npz)")
    for name in MODEL_NAMES:
        parser.add_argument(f"--{name}", help=f"{name} generator folder (core.nets.load_generator)")
    parser.add_argument("--estimator", default=DEFAULT_ESTIMATOR)
    parser.add_argument("--count", type=int, default=None, help="at most this many test samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slider-seeds", type=int, default=20, help="seeds of the yaw/pitch slider sweeps (0: none)")
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--update-cards", action="store_true",
                        help="write the summary table into each evaluated generator's README.md")
    args = parser.parse_args(argv)
    generators = {name: getattr(args, name) for name in MODEL_NAMES if getattr(args, name)}
    results = evaluate(args.data, generators, args.estimator, args.count, args.seed, args.slider_seeds)
    table = summary_table(results)
    print(table, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.update_cards:
        section = (f"\n## Measured metrics (`training/eval_taxfree.py`, test split, {results['count']} samples, "
                   f"seed {args.seed})\n\n{table}\n")  # fmt: skip
        for directory in generators.values():
            write_card_section(Path(directory) / "README.md", section, key="`training/eval_taxfree.py`")


if __name__ == "__main__":
    main()
