"""The training-set builder on the fixture faces: crops, pose, flip rules, masks, de-duplication, determinism,
loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.nets.camera import camera_label
from training.data import masks
from training.data.archive import archive_path, load_archive, read_archive
from training.data.build_dataset import build, perceptual_hash
from training.data.downscale import downscale_archive
from training.data.flip import flip_camera, flip_sample

FACES = Path(__file__).resolve().parent / "fixtures" / "faces"
GROUP = "mebeauty/female/caucasian"
MIRRORED_OF = "sebastian-pociecha-9AdKSLh2320-unsplash.jpg"
SCORED = "emma-valerio-Hz_hQrk9hQ8-unsplash.jpg"
SCORE = 6.25
HELD_OUT = "derek-owens-YCbJCM249KE-unsplash.jpg"


def _make_shared(root: Path) -> Path:
    """A miniature `shared/data` with the six fixtures plus a byte copy, a resized copy, a mirror and a blank."""
    folder = root / "mebeauty" / "original_images" / "female" / "caucasian"
    folder.mkdir(parents=True)
    for photo in sorted(FACES.glob("*.jpg")):
        shutil.copyfile(photo, folder / photo.name)
    shutil.copyfile(FACES / "raamin-ka-hdra4gfbznU-unsplash.jpg", folder / "zz-byte-copy.jpg")
    source = Image.open(FACES / "cris-trung-LRLxSTpq2Ds-unsplash.jpg").convert("RGB")
    source.resize((source.width * 9 // 10, source.height * 9 // 10), Image.LANCZOS).save(
        folder / "zz-resized-copy.jpg", quality=85
    )
    mirrored = np.asarray(Image.open(FACES / MIRRORED_OF).convert("RGB"))[:, ::-1]
    Image.fromarray(np.ascontiguousarray(mirrored)).save(folder / "zz-mirrored.png")
    Image.new("RGB", (200, 200), (128, 128, 128)).save(folder / "zz-blank.png")
    scores = root / "mebeauty" / "scores"
    scores.mkdir()
    (scores / "train_2022.txt").write_text(
        f"./cropped_images/images_crop_align_mtcnn/female/caucasian/{SCORED} {SCORE}\n"
    )
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two builds of the miniature set (2 worker processes, then 1) and the first one's folder."""
    root = tmp_path_factory.mktemp("dataset")
    shared = _make_shared(root / "shared")
    held_out = root / "held_out"
    held_out.mkdir()
    shutil.copyfile(FACES / HELD_OUT, held_out / "any-name.jpg")
    first, second = root / "first", root / "second"
    build(shared, first, workers=2, card=first / "DATASET.md", hold_out=held_out)
    build(shared, second, workers=1, card=None, hold_out=held_out)
    return first, second


def _index(archive, file_name: str) -> int:
    return archive.names.index(f"{GROUP}/{file_name}")


def test_crop_sizes_and_dtypes(built):
    for size in (256, 128):
        archive = load_archive(archive_path(built[0], size))
        assert len(archive) == 7  # six fixtures + the mirror
        for i in range(len(archive)):
            image, mask = archive.image(i), archive.mask(i)
            assert image.shape == (size, size, 3) and image.dtype == np.uint8
            assert mask.shape == (size, size) and mask.dtype == np.uint8
            assert mask.max() < len(masks.CLASS_NAMES)
    large = load_archive(archive_path(built[0], 256))
    assert large.landmarks.shape == (7, 478, 2)
    assert large.camera.shape == (7, 25) and large.pose.shape == (7, 3)


def test_skipped_images_are_recorded(built):
    report = json.loads((built[0] / "build_report.json").read_text())
    reasons = dict(report["skipped"])
    assert reasons[f"{GROUP}/zz-byte-copy.jpg"].startswith("byte-identical to")
    assert reasons[f"{GROUP}/zz-blank.png"] == "no face detected"
    near = [name for name, reason in report["skipped"] if reason.startswith("near-duplicate")]
    assert len(near) == 1 and near[0].endswith(("zz-resized-copy.jpg", "cris-trung-LRLxSTpq2Ds-unsplash.jpg"))
    card = (built[0] / "DATASET.md").read_text()
    assert "no face detected" in card and (built[0] / "contact_sheet.jpg").is_file()


def test_perceptual_hash_separates_people():
    crops = [np.asarray(Image.open(path).convert("RGB").resize((128, 128))) for path in sorted(FACES.glob("*.jpg"))]
    hashes = [perceptual_hash(crop) for crop in crops]
    distances = [bin(a ^ b).count("1") for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) > 4
    noisy = np.clip(crops[0].astype(int) + np.random.default_rng(0).integers(-3, 4, crops[0].shape), 0, 255)
    assert bin(hashes[0] ^ perceptual_hash(noisy.astype(np.uint8))).count("1") <= 4


def test_mirrored_photo_gives_mirrored_pose(built):
    archive = load_archive(archive_path(built[0], 256))
    original, mirrored = archive.pose[_index(archive, MIRRORED_OF)], archive.pose[_index(archive, "zz-mirrored.png")]
    assert abs(original[0]) > 1.0  # the photo is not exactly frontal, so the sign test means something
    np.testing.assert_allclose(mirrored, original * [-1, 1, -1], atol=2.5)


def test_flip_helper_agrees_with_relabelling_the_mirrored_photo(built):
    archive = load_archive(archive_path(built[0], 256))
    flipped = archive.sample(_index(archive, MIRRORED_OF), flip=True)
    relabelled = archive.sample(_index(archive, "zz-mirrored.png"))
    # the two crops differ by detection jitter (sub-pixel), far less than an unflipped crop differs
    unflipped = archive.sample(_index(archive, MIRRORED_OF))["image"].astype(int)
    jitter = np.abs(flipped["image"].astype(int) - relabelled["image"]).mean()
    assert jitter < 0.5 * np.abs(unflipped - relabelled["image"]).mean()
    assert np.abs(flipped["landmarks"] - relabelled["landmarks"]).mean() < 1.5
    np.testing.assert_allclose(flipped["pose"], relabelled["pose"], atol=2.5)
    np.testing.assert_allclose(flipped["camera"], relabelled["camera"], atol=0.06)
    assert (flipped["mask"] == relabelled["mask"]).mean() > 0.95
    layout = archive.metadata["face3dmm_layout"]
    rotation = layout["identity"] + layout["expression"]
    # yaw, pitch, roll and the horizontal translation of the fitted 3DMM follow the flip
    np.testing.assert_allclose(
        flipped["face3dmm"][rotation : rotation + 3], relabelled["face3dmm"][rotation : rotation + 3], atol=3.0
    )
    assert abs(flipped["face3dmm"][rotation + 3] - relabelled["face3dmm"][rotation + 3]) < 0.02


def test_flip_rules_are_involutions_and_match_the_camera_model():
    mirrored_camera = flip_camera(camera_label(25.0, -8.0).numpy())
    np.testing.assert_allclose(mirrored_camera, camera_label(-25.0, -8.0).numpy(), atol=1e-6)
    rng = np.random.default_rng(1)
    sample = {
        "image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
        "mask": rng.integers(0, 9, (16, 16), dtype=np.uint8),
        "landmarks": rng.uniform(0, 15, (478, 2)).astype(np.float32),
        "pose": np.array([10.0, -5.0, 3.0], np.float32),
        "camera": camera_label(10.0, -5.0).numpy()[0],
        "face3dmm": rng.normal(size=50 + 53 + 6 + 27).astype(np.float32),
    }
    once, twice = flip_sample(sample), flip_sample(flip_sample(sample))
    for key, value in sample.items():
        np.testing.assert_allclose(twice[key], value, atol=1e-5)
    assert not np.allclose(once["landmarks"], sample["landmarks"])
    np.testing.assert_array_equal(once["image"], sample["image"][:, ::-1])


def test_masks_put_classes_where_expected(built):
    archive = load_archive(archive_path(built[0], 128))
    corners_background = 0
    for i in range(len(archive)):
        mask = archive.mask(i)
        face = np.isin(mask, [masks.SKIN, masks.BROWS, masks.EYES, masks.NOSE, masks.LIPS, masks.MOUTH_INTERIOR])
        rows, columns = np.nonzero(face)
        for region in (masks.EYES, masks.LIPS, masks.NOSE, masks.BROWS):
            region_rows, region_columns = np.nonzero(mask == region)
            assert len(region_rows) > 5, (archive.names[i], masks.CLASS_NAMES[region])
            assert rows.min() <= region_rows.min() and region_rows.max() <= rows.max()
            assert columns.min() <= region_columns.min() and region_columns.max() <= columns.max()
        eye_rows, lip_rows = np.nonzero(mask == masks.EYES)[0], np.nonzero(mask == masks.LIPS)[0]
        assert eye_rows.mean() < lip_rows.mean()
        assert mask[64, 64] in (masks.SKIN, masks.NOSE)  # the crop centre is on the face
        corners_background += int(mask[0, 0] == masks.BACKGROUND) + int(mask[0, -1] == masks.BACKGROUND)
    assert corners_background >= len(archive)  # at least half of the top corners show background


def test_builds_are_deterministic(built):
    first, second = built
    for size in (256, 128):
        arrays_a, meta_a = read_archive(archive_path(first, size))
        arrays_b, meta_b = read_archive(archive_path(second, size))
        assert meta_a == meta_b and arrays_a.keys() == arrays_b.keys()
        for key in arrays_a:
            np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)


def test_loader_round_trip(built):
    path = archive_path(built[0], 128)
    everything = load_archive(path)
    parts = [load_archive(path, split=split) for split in ("train", "val", "test")]
    assert sum(len(part) for part in parts) == len(everything)
    scored = everything.names.index(f"{GROUP}/{SCORED}")
    assert everything.beauty[scored] == pytest.approx(SCORE)
    assert everything.sample(scored)["split"] == "train"
    assert everything.sample(everything.names.index(f"{GROUP}/{HELD_OUT}"))["split"] == "test"
    assert np.isnan(np.delete(everything.beauty, scored)).all()
    assert everything.face3dmm.shape == (len(everything), everything.metadata["face3dmm_layout"]["identity"] + 86)
    assert np.isfinite(everything.face3dmm).all()

    dataset = everything.torch_dataset(flip_probability=1.0)
    item = dataset[0]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["mask"].shape == (128, 128) and item["mask"].dtype == torch.int64 and item["flipped"]
    expected = torch.from_numpy(everything.image(0)[:, ::-1].copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(item["image"], expected)
    assert item["pose"][0] == pytest.approx(-float(everything.pose[0, 0]))
    with pytest.raises(ValueError):
        load_archive(path, split="holdout")


def test_downscaled_archive_keeps_labels_and_regions(built, tmp_path):
    source = load_archive(archive_path(built[0], 128))
    small = load_archive(downscale_archive(archive_path(built[0], 128), tmp_path / "faces32.npz", 32))
    assert small.size == 32 and small.names == source.names
    np.testing.assert_array_equal(small.face3dmm, source.face3dmm)
    np.testing.assert_array_equal(small.camera, source.camera)
    for i in range(len(small)):
        image, mask = small.image(i), small.mask(i)
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        box_filtered = source.image(i).reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
        assert np.abs(image - box_filtered).max() <= 1  # lossless: only rounding
        assert set(np.unique(mask)) <= set(np.unique(source.mask(i)))  # nearest labels, no blends
        assert mask[16, 16] in (masks.SKIN, masks.NOSE)
    with pytest.raises(ValueError, match="landmark"):
        downscale_archive(archive_path(built[0], 256), tmp_path / "faces64.npz", 64)
    with pytest.raises(ValueError, match="larger"):
        downscale_archive(archive_path(built[0], 128), tmp_path / "faces256.npz", 256)
