"""training.eval: metric functions and the ``python -m training.eval`` CLI."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.identity import IdentityEncoder
from training.eval import faces
from training.eval.__main__ import main as eval_cli
from training.eval.metrics import (distinct_neighbour_rate, frechet_distance, mask_iou, mean_cross_cosine,
                                   pairwise_cosine, pose_error, psnr)

torch.set_num_threads(2)

FACES = sorted((Path(__file__).resolve().parent / "fixtures" / "faces").glob("*.jpg"))
TINY = {"stem_channels": 4, "stages": [[4, 1, False], [8, 1, True]], "embedding_dim": 8}


def test_frechet_distance_of_a_set_with_itself_is_zero_and_is_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    b = rng.normal(size=(150, 16)) * 1.5 + 0.3
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    assert frechet_distance(a, b) > 1.0


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8))
    shift = np.arange(8.0)
    # same covariance: only the mean term remains
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # b = 2a: covariances C and 4C give tr(C + 4C - 2 * 2C) = tr(C); means differ by mean(a)
    expected = float(np.sum(a.mean(axis=0) ** 2) + np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_pairwise_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(pairwise_cosine(a, b), [1.0, 0.0, -1.0], atol=1e-12)
    with pytest.raises(ValueError):
        pairwise_cosine(a, b[:2])


def test_mean_cross_cosine_averages_distinct_pairs_only():
    # pairs: (0, 1) cos 0, (0, 2) cos 1/sqrt(2), (1, 2) cos 1/sqrt(2); self-similarities are left out
    e = np.array([[1.0, 0.0], [0.0, 5.0], [2.0, 2.0]])
    assert mean_cross_cosine(e) == pytest.approx(2 / np.sqrt(2) / 3)
    assert mean_cross_cosine(np.array([[1.0, 2.0], [2.0, 4.0]])) == pytest.approx(1.0)  # one face, twice
    with pytest.raises(ValueError):
        mean_cross_cosine(e[:1])


def test_distinct_neighbour_rate_counts_neighbours_at_or_beyond_the_threshold_cyclically():
    d = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 1.5], [0.0, 1.5]])
    # neighbour distances: 0.5, 1.0, 0.0 and, last to first, 1.5
    assert distinct_neighbour_rate(d, 0.6) == 0.5
    assert distinct_neighbour_rate(d, 0.5) == 0.75  # at the threshold counts as different
    assert distinct_neighbour_rate(np.zeros((3, 2)), 0.6) == 0.0  # one face, three times
    with pytest.raises(ValueError):
        distinct_neighbour_rate(d[:1], 0.6)


def test_pose_error_averages_absolute_differences_and_wraps_angles():
    a = np.array([[10.0, 0.0, 179.0], [-20.0, 5.0, 0.0]])
    b = np.array([[0.0, 0.0, -179.0], [-10.0, -5.0, 0.0]])
    error = pose_error(a, b)
    assert error["yaw"] == pytest.approx(10.0)
    assert error["pitch"] == pytest.approx(5.0)
    assert error["roll"] == pytest.approx(1.0)
    assert error["mean"] == pytest.approx(16.0 / 3)
    assert pose_error(a, a)["mean"] == 0.0


def test_mask_iou_cases():
    empty = np.zeros((4, 4), bool)
    left = empty.copy()
    left[:, :2] = True
    middle = empty.copy()
    middle[:, 1:3] = True
    assert mask_iou(left, left) == 1.0
    assert mask_iou(left, ~left) == 0.0
    assert mask_iou(left, middle) == pytest.approx(1 / 3)
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(empty, left) == 0.0
    with pytest.raises(ValueError):
        mask_iou(left, left[:2])


def test_psnr():
    image = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    assert psnr(image, image) == math.inf
    zeros, ones = np.zeros((4, 4)), np.ones((4, 4))
    assert psnr(zeros, ones) == pytest.approx(20 * math.log10(255.0))
    assert psnr(zeros, ones * 0.1, data_range=1.0) == pytest.approx(20.0)
    assert psnr(image, 255 - image) < psnr(image, np.clip(image.astype(int) + 1, 0, 255))


def test_identity_metrics_on_aligned_crops_with_a_tiny_encoder():
    torch.manual_seed(0)
    encoder = IdentityEncoder(TINY).eval()
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(5)]
    others = [rng.integers(0, 128, size=(64, 64, 3), dtype=np.uint8) for _ in range(5)]
    embeddings = faces.embed_aligned_faces(crops, encoder, batch_size=2)
    assert embeddings.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(faces.identity_similarity(crops, crops, encoder), 1.0, atol=1e-5)
    assert faces.frechet_identity_distance(crops, crops, encoder) == pytest.approx(0.0, abs=1e-8)
    assert faces.frechet_identity_distance(crops, others, encoder) > 0.0


def test_landmark_pose_error_sees_an_in_plane_rotation_as_roll():
    from core.face import detect_faces, load_image

    image = load_image(FACES[0])
    landmarks = detect_faces(image)[0].landmarks.astype(np.float64)
    angle = math.radians(10.0)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    center = landmarks.mean(axis=0)
    rotated = (landmarks - center) @ rotation.T + center
    assert faces.landmark_pose_error([landmarks], [landmarks], image.size)["mean"] == 0.0
    error = faces.landmark_pose_error([landmarks], [rotated], image.size)
    assert error["roll"] == pytest.approx(10.0, abs=1.5)
    assert error["yaw"] < 3.0 and error["pitch"] < 3.0


def test_cli_detect_identity_and_pose(tmp_path, capsys):
    shutil.copy(FACES[1], tmp_path / "face.jpg")
    Image.new("RGB", (128, 128), (90, 120, 150)).save(tmp_path / "blank.png")
    assert eval_cli(["detect", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("0.5000")

    assert eval_cli(["identity", str(FACES[1]), str(FACES[1])]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(1.0, abs=1e-4)

    assert eval_cli(["pose", str(FACES[1])]) == 0
    words = capsys.readouterr().out.split()
    assert words[0::2] == ["yaw", "pitch", "roll"] and all(abs(float(v)) < 90 for v in words[1::2])

    assert eval_cli(["identity", str(FACES[1]), str(tmp_path / "blank.png")]) == 1
    assert "No face" in capsys.readouterr().err


def test_descriptor_distance_uses_the_same_person_scale():
    from core.face import prepare_face

    identity = faces.identity_encoder()
    aligned = [prepare_face(path).image for path in FACES[:2]]
    same = faces.descriptor_distance(aligned, aligned)
    mirrored = faces.descriptor_distance(aligned, [face[:, ::-1] for face in aligned])
    other = faces.descriptor_distance(aligned[:1], aligned[1:], identity)
    threshold = identity.config["same_person_distance"]
    assert np.all(same < 1e-4) and np.all(mirrored < threshold) and other[0] > threshold


def test_card_sections_are_replaced_by_key_and_others_kept(tmp_path):
    from training.eval.cards import write_card_section

    card = tmp_path / "README.md"
    card.write_text("# model\n\nintro\n")
    write_card_section(card, "\n## Measured metrics (`training/eval_stylegan2.py`)\n\nold a\n", key="eval_stylegan2")
    write_card_section(card, "\n## Measured metrics (`training/eval_taxfree.py`, 300 samples)\n\nold b\n",
                       key="eval_taxfree")
    write_card_section(card, "\n## Measured metrics (`training/eval_stylegan2.py`)\n\nnew a\n", key="eval_stylegan2")
    text = card.read_text()
    assert text.startswith("# model\n\nintro\n") and text.count("## Measured metrics") == 2
    assert "new a" in text and "old a" not in text and "old b" in text
