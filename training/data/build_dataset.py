"""Build the face training archives from the shared data (MEBeauty originals + CelebA999).

    python -m training.data.build_dataset --shared ../shared/data --out <dir> [--stage all|images|3dmm|card]

Stage `images`: for every source photo (byte-identical copies removed first): MediaPipe detection (largest face,
478 landmarks), FFHQ-style alignment at 256 and 128 px (`core.face.align_face`, the runtime's recipe), head pose and
EG3D camera (`core.face.estimate_pose` on the photo), region label maps (`training.data.masks`), a perceptual hash for
near-duplicate removal, then `faces256.npz` and `faces128.npz` (format: `training.data.archive`) and
`build_report.json`. Stage `3dmm` fits ICT-FaceKit identity, expression, pose and SH lighting to each 256-px crop
(`core.face3dmm`) and adds `face3dmm` to both existing archives; it can be rerun on its own. `all` runs both, `card`
neither. Every stage rewrites the dataset card (`--card`, default `training/data/DATASET.md`) and its contact sheet.
Work is spread over a process pool (`--workers`, default 2); the output does not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.face import FaceInputError, align_face, detect_faces, estimate_pose, load_image
from training.data import masks
from training.data.archive import archive_path, pack_bytes, read_archive, write_archive
from training.data.face_regions import LANDMARK_MIRROR
from training.data.sources import SOURCES, SPLITS, SourceImage, collect_images, keep_priority

ARCHIVE_SIZES = (256, 128)
IMAGE_QUALITY = {256: 92, 128: 85}
# Landmarks are stored in the 256-px archive only (the 128-px one must stay under 20 MiB); the 128-px crop uses the
# same square, so its landmarks are (landmarks_256 + 0.5) / 2 - 0.5.
LANDMARK_SIZES = (256,)
# Crops whose FFHQ square is narrower than this many source pixels are skipped as tiny faces.
MIN_CROP_SIDE = 64
# Near-duplicates: crops whose 64-bit perceptual hashes differ in at most NEAR_DUPLICATE_BITS bits are candidates;
# a candidate pair is a duplicate if the normalised cross-correlation of their 64-px grey crops, best over shifts of
# up to 4 px, reaches NEAR_DUPLICATE_CORRELATION. On the full set the same photo re-cropped or re-encoded scores
# >= 0.97 and different photos <= 0.93 (the hash alone cannot separate them: different people come within 6 bits).
NEAR_DUPLICATE_BITS = 14
NEAR_DUPLICATE_CORRELATION = 0.95
_THUMBNAIL = 64
_SHIFT = 4
FORMAT_VERSION = 1
DEFAULT_CARD = Path(__file__).resolve().parent / "DATASET.md"


def perceptual_hash(rgb: np.ndarray) -> int:
    """64-bit DCT hash: signs of the 8x8 lowest frequencies of the 32x32 grey image against their median."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def _encode(array: np.ndarray, fmt: str, quality: int | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "WEBP":
        image.save(buffer, "WEBP", quality=quality, method=6)
    else:
        image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def process_image(image: SourceImage) -> dict:
    """Crops, masks and labels of one photo, or {"name", "skip": reason}."""
    try:
        photo = load_image(image.path)
    except FaceInputError as error:
        return {"name": image.name, "skip": f"unreadable: {error}"}
    faces = detect_faces(photo)
    if not faces:
        return {"name": image.name, "skip": "no face detected"}
    face = faces[0]
    result = {"name": image.name, "faces": len(faces)}
    person = None
    for size in ARCHIVE_SIZES:
        aligned = align_face(photo, face.landmarks, size)
        scale = math.sqrt(abs(np.linalg.det(aligned.transform[:, :2])))
        if size / scale < MIN_CROP_SIDE:
            return {"name": image.name, "skip": f"tiny face (crop side {size / scale:.0f} px < {MIN_CROP_SIDE})"}
        if person is None:
            person = masks.person_probability(aligned.image)
            person_at_size = person
        else:
            person_at_size = cv2.resize(person, (size, size), interpolation=cv2.INTER_AREA)
        label_map = masks.region_label_map(aligned.image, aligned.landmarks, person_at_size)
        result[size] = {
            "image": _encode(aligned.image, "WEBP", IMAGE_QUALITY[size]),
            "mask": _encode(label_map, "PNG"),
            "landmarks": aligned.landmarks.astype(np.float32),
            "source_scale": scale,
        }
        if size == min(ARCHIVE_SIZES):
            result["phash"] = perceptual_hash(aligned.image)
            grey = cv2.cvtColor(aligned.image, cv2.COLOR_RGB2GRAY)
            result["thumbnail"] = cv2.resize(grey, (_THUMBNAIL, _THUMBNAIL), interpolation=cv2.INTER_AREA)
    pose = estimate_pose(face.landmarks, photo.size)
    result["pose"] = np.array([pose.yaw, pose.pitch, pose.roll], np.float32)
    result["camera"] = pose.camera_label.numpy().reshape(25).astype(np.float32)
    return result


def _hash_distances(value: int, others: np.ndarray) -> np.ndarray:
    """Bit differences between one 64-bit hash and an array of them."""
    xor = np.bitwise_xor(np.uint64(value), others.astype(np.uint64))
    return np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def crop_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Best normalised cross-correlation of grey thumbnail `b`'s centre within `a`, over shifts up to 4 px."""
    template = b[_SHIFT:-_SHIFT, _SHIFT:-_SHIFT].astype(np.float32)
    return float(cv2.matchTemplate(a.astype(np.float32), template, cv2.TM_CCOEFF_NORMED).max())


def remove_near_duplicates(results: list[dict], images: dict[str, SourceImage]) -> tuple[list[dict], list]:
    """Keeps one crop of each near-duplicate group (see NEAR_DUPLICATE_*), preferring `sources.keep_priority`;
    returns the kept results in name order and (name, reason) for the dropped ones."""
    kept: list[dict] = []
    hashes = np.zeros(0, np.uint64)
    skipped = []
    for result in sorted(results, key=lambda r: keep_priority(images[r["name"]])):
        twin = None
        for index in np.flatnonzero(_hash_distances(result["phash"], hashes) <= NEAR_DUPLICATE_BITS):
            similarity = crop_similarity(kept[index]["thumbnail"], result["thumbnail"])
            if similarity >= NEAR_DUPLICATE_CORRELATION:
                twin = (kept[index]["name"], similarity)
                break
        if twin:
            skipped.append((result["name"], f"near-duplicate of {twin[0]} (crop correlation {twin[1]:.3f})"))
        else:
            kept.append(result)
            hashes = np.append(hashes, np.uint64(result["phash"]))
    return sorted(kept, key=lambda r: r["name"]), skipped


def _progress(done: int, total: int, started: float, label: str) -> None:
    if done == total or done % 100 == 0:
        elapsed = time.monotonic() - started
        remaining = elapsed / max(done, 1) * (total - done)
        print(f"[{label}] {done}/{total}  {elapsed:6.0f} s elapsed, ~{remaining:4.0f} s left", flush=True)


def _pool_map(function, items: list, workers: int, label: str) -> list:
    """Ordered map over a process pool of `workers` (in-process when 1), printing progress."""
    started = time.monotonic()
    results = []
    if workers <= 1:
        _init_worker()
        for item in items:
            results.append(function(item))
            _progress(len(results), len(items), started, label)
        return results
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        for result in pool.imap(function, items, chunksize=4):
            results.append(result)
            _progress(len(results), len(items), started, label)
    return results


def build_images(
    shared: Path, out_dir: Path, workers: int = 2, limit: int | None = None, hold_out: Path | None = None
) -> dict:
    """Stage `images`: writes both archives and `build_report.json`; returns the report."""
    started = time.monotonic()
    sources, skipped = collect_images(Path(shared), limit, hold_out)
    print(f"{len(sources)} source images ({len(skipped)} byte-identical copies removed)", flush=True)
    by_name = {image.name: image for image in sources}
    processed = _pool_map(process_image, sources, workers, "images")
    skipped += [(r["name"], r["skip"]) for r in processed if "skip" in r]
    results, near = remove_near_duplicates([r for r in processed if "skip" not in r], by_name)
    skipped += near
    groups = sorted({by_name[r["name"]].group for r in results})
    for size in ARCHIVE_SIZES:
        image_data, image_offsets = pack_bytes([r[size]["image"] for r in results])
        mask_data, mask_offsets = pack_bytes([r[size]["mask"] for r in results])
        arrays = {
            "image_data": image_data, "image_offsets": image_offsets,
            "mask_data": mask_data, "mask_offsets": mask_offsets,
            "pose": np.stack([r["pose"] for r in results]).reshape(-1, 3),
            "camera": np.stack([r["camera"] for r in results]).reshape(-1, 25),
            "beauty": np.array([np.nan if by_name[r["name"]].beauty is None else by_name[r["name"]].beauty
                                for r in results], np.float32),
            "split": np.array([SPLITS.index(by_name[r["name"]].split) for r in results], np.uint8),
            "source": np.array([SOURCES.index(by_name[r["name"]].source) for r in results], np.uint8),
            "group": np.array([groups.index(by_name[r["name"]].group) for r in results], np.uint8),
            "phash": np.array([r["phash"] for r in results], np.uint64),
            "source_scale": np.array([r[size]["source_scale"] for r in results], np.float32),
        }  # fmt: skip
        if size in LANDMARK_SIZES:
            arrays["landmarks"] = np.stack([r[size]["landmarks"] for r in results]).reshape(-1, 478, 2)
        metadata = {
            "format_version": FORMAT_VERSION,
            "size": size,
            "names": [r["name"] for r in results],
            "from_crop": [r["name"] for r in results if by_name[r["name"]].from_crop],
            "class_names": list(masks.CLASS_NAMES),
            "splits": list(SPLITS),
            "sources": list(SOURCES),
            "groups": groups,
            "image_format": f"WEBP quality {IMAGE_QUALITY[size]}",
            "mask_format": "PNG, uint8 class ids",
            "landmark_mirror": LANDMARK_MIRROR.tolist(),
        }
        write_archive(archive_path(out_dir, size), arrays, metadata)
    report = {
        "sources": len(sources) + len([s for s in skipped if s[1].startswith("byte-identical")]),
        "kept": len(results),
        "skipped": sorted(skipped),
        "several_faces": sum(r["faces"] > 1 for r in results),
        "images_seconds": round(time.monotonic() - started, 1),
        "workers": workers,
        "limit": limit,
        "near_duplicate_bits": NEAR_DUPLICATE_BITS,
        "near_duplicate_correlation": NEAR_DUPLICATE_CORRELATION,
    }
    (Path(out_dir) / "build_report.json").write_text(json.dumps(report, indent=1))
    return report


_FACE_MODEL = None


def fit_face3dmm(item: tuple[bytes, np.ndarray]) -> np.ndarray:
    """ICT-FaceKit parameter vector (`FaceParams.to_vector`) of one encoded 256-px crop and its landmarks; NaN if the
    fit fails."""
    global _FACE_MODEL
    from core.face3dmm import FaceParams, load_face_model

    if _FACE_MODEL is None:
        _FACE_MODEL = load_face_model()
    encoded, landmarks = item
    rgb = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    height, width = rgb.shape[:2]
    try:
        params = _FACE_MODEL.fit_landmarks(landmarks.astype(np.float32), height, width)
        params = _FACE_MODEL.fit_lighting(rgb, params)
    except ValueError:
        return np.full(FaceParams.vector_size(_FACE_MODEL.num_identity), np.nan, np.float32)
    return params.to_vector().numpy().astype(np.float32)


def build_face3dmm(out_dir: Path, workers: int = 2) -> dict:
    """Stage `3dmm`: fits every 256-px crop and adds `face3dmm` (+ identity mirror map) to both archives."""
    from core.face3dmm import NUM_EXPRESSIONS, SH_COEFFICIENTS, load_face_model
    from training.data.flip import identity_mirror_matrix

    started = time.monotonic()
    big, big_meta = read_archive(archive_path(out_dir, max(ARCHIVE_SIZES)))
    offsets = big["image_offsets"]
    items = [(big["image_data"][offsets[i] : offsets[i + 1]].tobytes(), big["landmarks"][i])
             for i in range(len(offsets) - 1)]  # fmt: skip
    vectors = np.stack(_pool_map(fit_face3dmm, items, workers, "3dmm")) if items else np.zeros((0, 0), np.float32)
    model = load_face_model()
    mirror = identity_mirror_matrix(model)
    # A mirror map is only trustworthy if mirroring twice gives the identity back.
    mirror_ok = bool(np.abs(mirror @ mirror - np.eye(len(mirror))).max() < 0.1)
    layout = {
        "identity": model.num_identity, "expression": NUM_EXPRESSIONS, "rotation_yaw_pitch_roll_deg": 3,
        "translation_uv": 2, "scale": 1, "sh_rgb_x9": 3 * SH_COEFFICIENTS,
        "expression_names": list(model.config["expression_names"]),
        "identity_mirror": "face3dmm_identity_mirror" if mirror_ok else "none (identity kept under flip)",
    }  # fmt: skip
    for size in ARCHIVE_SIZES:
        path = archive_path(out_dir, size)
        arrays, metadata = (big, big_meta) if size == max(ARCHIVE_SIZES) else read_archive(path)
        if metadata["names"] != big_meta["names"]:
            raise RuntimeError(f"{path} and the {max(ARCHIVE_SIZES)}-px archive list different samples")
        arrays["face3dmm"] = vectors
        arrays.pop("face3dmm_identity_mirror", None)
        if mirror_ok:
            arrays["face3dmm_identity_mirror"] = mirror
        metadata["face3dmm_layout"] = layout
        write_archive(path, arrays, metadata)
    report_path = Path(out_dir) / "build_report.json"
    report = json.loads(report_path.read_text())
    report["face3dmm_seconds"] = round(time.monotonic() - started, 1)
    report["face3dmm_failed"] = int(np.isnan(vectors).any(axis=1).sum()) if len(vectors) else 0
    report["face3dmm_mirror_ok"] = mirror_ok
    report_path.write_text(json.dumps(report, indent=1))
    return report


def build(
    shared: Path,
    out_dir: Path,
    stage: str = "all",
    workers: int = 2,
    limit: int | None = None,
    card: Path | None = DEFAULT_CARD,
    contact_sheet: Path | None = None,
    hold_out: Path | None = None,
) -> dict:
    """Run a stage (or all) and rewrite the dataset card; returns the build report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    if stage in ("all", "images"):
        report = build_images(shared, out_dir, workers, limit, hold_out)
    if stage in ("all", "3dmm"):
        report = build_face3dmm(out_dir, workers)
    if card is not None:
        from training.data.card import write_card

        sheet = contact_sheet or Path(card).with_name("contact_sheet.jpg")
        write_card(out_dir, Path(card), sheet, " ".join(["python -m training.data.build_dataset", *sys.argv[1:]]))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"), help="the shared data folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the archives")
    parser.add_argument("--stage", choices=("all", "images", "3dmm", "card"), default="all")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each source (trials)")
    parser.add_argument("--card", type=Path, default=DEFAULT_CARD, help="dataset card path ('-' for none)")
    parser.add_argument("--hold-out", type=Path, default=None, help="photos identical to images here go to test")
    args = parser.parse_args(argv)
    card = None if str(args.card) == "-" else args.card
    started = time.monotonic()
    report = build(args.shared, args.out, args.stage, args.workers, args.limit, card, hold_out=args.hold_out)
    print(json.dumps({k: v for k, v in report.items() if k != "skipped"}), f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
