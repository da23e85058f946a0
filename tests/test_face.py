"""core.face: intake of bad and unusual uploads, detection, FFHQ alignment and head pose on the fixture faces."""

from __future__ import annotations

import io
import math
import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from core import face as F
from core.nets.camera import camera_label, look_at_pose

FACES = sorted((Path(__file__).parent / "fixtures" / "faces").glob("*.jpg"))
FRONTAL = FACES[1]  # derek-owens: frontal, centred, the whole head inside the photo


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose (valid, CRC-checked) header claims width x height; its pixel data is not a real image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def _eyes_and_mouth(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    eye_left, eye_right, _, mouth_left, mouth_right = F.five_point_landmarks(landmarks)
    return eye_left, eye_right, (mouth_left + mouth_right) / 2


def _assert_upright(landmarks: np.ndarray) -> None:
    eye_left, eye_right, mouth = _eyes_and_mouth(landmarks)
    eye_mid = (eye_left + eye_right) / 2
    assert eye_right[0] > eye_left[0]
    assert mouth[1] > eye_mid[1] + 0.5 * np.linalg.norm(eye_right - eye_left)
    tilt = math.degrees(math.atan2(eye_right[1] - eye_left[1], eye_right[0] - eye_left[0]))
    assert abs(tilt) < 15


# ---------------------------------------------------------------------------------------------------------------------
# Intake


def test_face_input_error_is_a_value_error():
    assert issubclass(F.FaceInputError, ValueError)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"this is a text file, not a photo\n" * 10, "could not be read as an image"),
        (b"", "empty"),
        (b"%PDF-1.4\n" + b"0" * 200, "could not be read as an image"),
    ],
)
def test_non_images_are_refused_with_a_clear_message(data, expected):
    with pytest.raises(F.FaceInputError, match=expected):
        F.load_image(data)
    assert expected in F.check_upload(data)


def test_truncated_jpeg_is_refused():
    data = FRONTAL.read_bytes()
    with pytest.raises(F.FaceInputError, match="damaged or incomplete"):
        F.load_image(data[: len(data) // 2])


def test_one_pixel_image_is_refused_from_bytes_and_array():
    with pytest.raises(F.FaceInputError, match="too small"):
        F.load_image(_encode(Image.new("RGB", (1, 1))))
    with pytest.raises(F.FaceInputError, match="too small"):
        F.load_image(np.zeros((1, 1, 3), np.uint8))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns at 89-179 megapixels
@pytest.mark.parametrize("side", [20000, 12000, 8000])
def test_huge_images_are_refused_from_the_header_without_decoding(side, tmp_path):
    # The pixel data is garbage, so decoding would fail with "damaged"; "too large" proves the header check came first.
    data = _png_claiming(side, side)
    assert len(data) < 200
    with pytest.raises(F.FaceInputError, match="too large"):
        F.load_image(data)
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    assert "too large" in F.check_upload(path)


def test_claimed_size_above_a_custom_pixel_limit_is_refused():
    with pytest.raises(F.FaceInputError, match="too large"):
        F.load_image(_encode(Image.new("RGB", (300, 300))), max_pixels=200 * 200)


def test_files_over_the_byte_limit_are_refused_before_reading(tmp_path):
    path = tmp_path / "face.jpg"
    path.write_bytes(FRONTAL.read_bytes())
    with pytest.raises(F.FaceInputError, match="too big"):
        F.load_image(path, max_bytes=1000)
    assert "too big" in F.check_upload(str(path), max_bytes=1000)
    with pytest.raises(F.FaceInputError, match="too big"):
        F.load_image(FRONTAL.read_bytes(), max_bytes=1000)


def test_check_upload_accepts_a_photo_and_asks_for_a_missing_one(tmp_path):
    assert F.check_upload(FRONTAL) is None
    assert F.check_upload(str(FRONTAL)) is None
    assert F.check_upload(None) == "Please upload a photo."
    assert "could not be found" in F.check_upload(tmp_path / "missing.jpg")


def test_every_source_kind_gives_the_same_rgb_image():
    reference = _rgb(FRONTAL)
    png = _encode(reference)
    for source in (FRONTAL, str(FRONTAL), FRONTAL.read_bytes(), reference, np.asarray(reference)):
        image = F.load_image(source)
        assert image.mode == "RGB" and image.size == reference.size
    for source in (png, bytearray(png), np.asarray(reference)):
        assert np.array_equal(np.asarray(F.load_image(source)), np.asarray(reference))


def test_grayscale_is_converted_not_rejected():
    gray = _rgb(FRONTAL).convert("L")
    image = F.load_image(_encode(gray))
    array = np.asarray(image)
    assert image.mode == "RGB"
    assert np.array_equal(array[..., 0], np.asarray(gray)) and np.array_equal(array[..., 0], array[..., 2])
    assert F.prepare_face(_encode(gray)).image.shape == (256, 256, 3)


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    gray = np.asarray(_rgb(FRONTAL).convert("L"))
    sixteen = Image.fromarray((gray.astype(np.uint16) * 257).astype(np.uint16))
    data = _encode(sixteen)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode.startswith("I")  # really a 16-bit file
    array = np.asarray(F.load_image(data)).astype(int)
    assert np.abs(array[..., 1] - gray).max() <= 1


def test_sixteen_bit_colour_png_is_converted():
    rgb = np.asarray(_rgb(FRONTAL))
    ok, encoded = cv2.imencode(".png", rgb[:, :, ::-1].astype(np.uint16) * 257)  # OpenCV writes 48-bit PNGs
    assert ok
    array = np.asarray(F.load_image(encoded.tobytes())).astype(int)
    assert np.abs(array - rgb).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode):
    image = _rgb(FRONTAL).convert(mode)
    alpha = np.full(image.size[::-1], 255, np.uint8)
    alpha[:, : image.width // 2] = 0
    image.putalpha(Image.fromarray(alpha))
    array = np.asarray(F.load_image(_encode(image)))
    assert (array[:, : image.width // 2] == 255).all()
    opaque = np.asarray(_rgb(FRONTAL).convert(mode).convert("RGB"))[:, image.width // 2 :]
    assert np.array_equal(array[:, image.width // 2 :], opaque)


def test_palette_image_with_transparency_is_converted():
    image = _rgb(FRONTAL).quantize(64)
    image.info["transparency"] = 0
    assert F.load_image(_encode(image)).mode == "RGB"


def test_cmyk_jpeg_is_converted_and_its_face_found():
    original = _rgb(FRONTAL)
    data = _encode(original.convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == "CMYK"
    image = F.load_image(data)
    difference = np.abs(np.asarray(image).astype(int) - np.asarray(original).astype(int)).mean()
    assert image.mode == "RGB" and difference < 8
    assert len(F.detect_faces(image)) == 1


@pytest.mark.parametrize(
    "orientation, stored_as", [(3, Image.ROTATE_180), (6, Image.ROTATE_90), (8, Image.ROTATE_270)]
)
def test_exif_rotated_photo_is_turned_upright(orientation, stored_as):
    upright = _rgb(FRONTAL)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(upright.transpose(stored_as), "JPEG", quality=95, exif=exif)
    with Image.open(io.BytesIO(data)) as stored:  # the pixels as stored are turned
        assert stored.size != upright.size or np.abs(np.asarray(stored).astype(int) - np.asarray(upright)).mean() > 20

    image = F.load_image(data)
    assert image.size == upright.size
    assert np.abs(np.asarray(image).astype(int) - np.asarray(upright).astype(int)).mean() < 4
    _assert_upright(F.detect_faces(image)[0].landmarks)
    _assert_upright(F.prepare_face(data).landmarks)


def test_unsupported_array_dtype_is_refused():
    with pytest.raises(F.FaceInputError, match="uint8"):
        F.load_image(np.zeros((100, 100, 3), np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("kind", ["flat", "noise"])
def test_no_face_gives_a_clear_message(kind):
    rng = np.random.default_rng(0)
    array = np.full((320, 320, 3), 140, np.uint8) if kind == "flat" else rng.integers(0, 256, (320, 320, 3), np.uint8)
    assert F.detect_faces(array) == []
    with pytest.raises(F.FaceInputError, match="No face was found"):
        F.prepare_face(array)


@pytest.mark.parametrize("path", FACES, ids=lambda p: p.stem[:12])
def test_every_fixture_has_one_face_with_478_landmarks(path):
    image = F.load_image(path)
    (face,) = F.detect_faces(image)
    assert face.landmarks.shape == (478, 2) and face.landmarks.dtype == np.float32
    assert face.landmarks_3d.shape == (478, 3)
    assert np.array_equal(face.landmarks_3d[:, :2], face.landmarks)
    x0, y0, x1, y1 = face.box
    assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    _assert_upright(face.landmarks)


def test_two_faces_use_the_largest_with_a_warning():
    big, small = _rgb(FACES[1]), _rgb(FACES[4])
    small = small.resize((small.width * 3 // 5, small.height * 3 // 5))
    canvas = Image.new("RGB", (small.width + big.width, big.height), "white")
    canvas.paste(small, (0, 0))  # the smaller face comes first in reading order
    canvas.paste(big, (small.width, 0))

    faces = F.detect_faces(canvas)
    assert len(faces) == 2
    assert faces[0].area > 2 * faces[1].area
    assert faces[0].box[0] > small.width and faces[1].box[2] < small.width

    prepared = F.prepare_face(canvas)
    assert np.allclose(prepared.face.landmarks, faces[0].landmarks)
    assert any("2 faces" in note and "largest" in note for note in prepared.warnings)


def test_detection_is_consistent_across_threads():
    images = [np.asarray(F.load_image(path)) for path in FACES[:4]]
    expected = [F.detect_faces(image)[0].landmarks for image in images]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        results[index] = F.detect_faces(images[index % 4])[0].landmarks

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, landmarks in results.items():
        assert np.allclose(landmarks, expected[index % 4], atol=1e-3)


def test_large_photos_are_detected_at_full_resolution_coordinates():
    image = _rgb(FRONTAL)
    big = image.resize((image.width * 3, image.height * 3), Image.BICUBIC)  # 1500 px: detection runs downscaled
    small_face = F.detect_faces(image)[0]
    big_face = F.detect_faces(big)[0]
    eyes_small = F.five_point_landmarks(small_face.landmarks)[:2]
    eyes_big = F.five_point_landmarks(big_face.landmarks)[:2]
    assert np.abs((eyes_big + 0.5) / 3 - 0.5 - eyes_small).max() < 2.0


def test_small_face_in_a_large_photo_is_found_by_the_full_range_detector():
    image = _rgb(FRONTAL)
    reference = F.detect_faces(image)[0].landmarks
    canvas = Image.new("RGB", (2500, 2000), (90, 110, 100))  # the face is under a tenth of the width
    canvas.paste(image, (900, 700))
    (face,) = F.detect_faces(canvas)
    assert np.abs(face.landmarks - (reference + np.array([900, 700], np.float32))).mean() < 3


# ---------------------------------------------------------------------------------------------------------------------
# Alignment


@pytest.mark.parametrize("path", FACES, ids=lambda p: p.stem[:12])
def test_aligned_eyes_are_level_and_at_the_ffhq_place(path):
    prepared = F.prepare_face(path, size=256)
    assert prepared.image.shape == (256, 256, 3) and prepared.image.dtype == np.uint8
    assert prepared.landmarks.shape == (478, 2)
    eye_left, eye_right, mouth = _eyes_and_mouth(prepared.landmarks)
    tilt = math.degrees(math.atan2(eye_right[1] - eye_left[1], eye_right[0] - eye_left[0]))
    assert abs(tilt) < 4
    eye_mid = (eye_left + eye_right) / 2
    assert abs(eye_mid[0] - 127.5) < 6
    assert 0.42 * 256 < eye_mid[1] < 0.5 * 256
    assert 0.2 * 256 < np.linalg.norm(eye_right - eye_left) <= 0.25 * 256 + 0.5
    assert mouth[1] > eye_mid[1] + 0.15 * 256


def test_transform_maps_source_pixels_to_the_aligned_crop():
    image = F.load_image(FRONTAL)
    prepared = F.prepare_face(image, size=128)
    warped = cv2.warpAffine(np.asarray(image), prepared.transform, (128, 128), flags=cv2.INTER_CUBIC)
    difference = np.abs(warped.astype(int) - prepared.image.astype(int))[8:-8, 8:-8]
    assert difference.mean() < 3
    mapped = prepared.face.landmarks @ prepared.transform[:, :2].T + prepared.transform[:, 2]
    assert np.allclose(mapped, prepared.landmarks, atol=1e-3)


def test_alignment_undoes_an_in_plane_rotation():
    image = np.asarray(F.load_image(FRONTAL))
    height, width = image.shape[:2]
    rotation = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), 25, 1.0)
    rotated = cv2.warpAffine(image, rotation, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    straight = F.prepare_face(image)
    turned = F.prepare_face(rotated)
    assert abs(turned.pose.roll - straight.pose.roll + 25) < 3  # the image was turned counter-clockwise
    eyes_straight = F.five_point_landmarks(straight.landmarks)[:2]
    eyes_turned = F.five_point_landmarks(turned.landmarks)[:2]
    assert np.abs(eyes_turned - eyes_straight).max() < 3


def test_face_partly_outside_the_photo_is_padded():
    image = np.asarray(F.load_image(FRONTAL))
    landmarks = F.detect_faces(image)[0].landmarks
    full = F.align_face(image, landmarks)
    cut = 200  # through the face's left side: part of the crop now lies outside the photo
    partial = F.align_face(image[:, cut:], landmarks - np.array([cut, 0], np.float32))
    assert partial.image.shape == (256, 256, 3) and partial.image.dtype == np.uint8
    assert np.allclose(partial.landmarks, full.landmarks, atol=1e-3)
    # Right of the cut the crops agree; far left of it the fill is smooth.
    cut_x = int(np.ceil((np.array([cut, 0]) @ full.transform[:, :2].T + full.transform[:, 2])[0]))
    right = np.abs(partial.image[:, cut_x + 4 :].astype(int) - full.image[:, cut_x + 4 :].astype(int))
    assert right.mean() < 3
    far_left = partial.image[:, : max(cut_x - 64, 1)].astype(float)
    assert far_left.std(axis=(0, 1)).max() < full.image[:, : max(cut_x - 64, 1)].std(axis=(0, 1)).max()


# ---------------------------------------------------------------------------------------------------------------------
# Pose


def _project_canonical(yaw: float, pitch: float, image_size: int = 512, distance: float = 60.0) -> np.ndarray:
    """Landmarks of the canonical face seen by an orbit camera at EG3D (yaw, pitch) degrees."""
    cam2world = look_at_pose(
        math.pi / 2 + math.radians(yaw), math.pi / 2 + math.radians(pitch), lookat=(0.0, 0.0, 0.0), radius=distance
    )[0].double().numpy()
    world2cam = np.linalg.inv(cam2world)
    points = F.canonical_face_mesh() @ world2cam[:3, :3].T + world2cam[:3, 3]
    focal, centre = float(image_size), (image_size - 1) / 2
    return points[:, :2] / points[:, 2:] * focal + centre


@pytest.mark.parametrize("yaw, pitch", [(0.0, 0.0), (20.0, -10.0), (-30.0, 15.0), (45.0, 5.0)])
def test_pose_recovers_a_known_camera(yaw, pitch):
    pose = F.estimate_pose(_project_canonical(yaw, pitch), (512, 512))
    assert pose.yaw == pytest.approx(yaw, abs=0.5)
    assert pose.pitch == pytest.approx(pitch, abs=0.5)
    assert abs(pose.roll) < 0.5
    assert pose.camera_label.shape == (1, 25) and pose.camera_label.dtype == torch.float32
    assert torch.allclose(pose.camera_label, camera_label(yaw, pitch), atol=0.03)
    assert np.allclose(pose.rotation @ pose.rotation.T, np.eye(3), atol=1e-6)


def test_positive_yaw_camera_sees_the_subjects_left_cheek():
    landmarks = _project_canonical(30.0, 0.0)
    # The subject's left eye (+x in the model, image right) is nearer to the camera, so it looks wider.
    left_eye = np.ptp(landmarks[list(F.LEFT_EYE_CONTOUR), 0])
    right_eye = np.ptp(landmarks[list(F.RIGHT_EYE_CONTOUR), 0])
    assert left_eye > right_eye
    assert F.estimate_pose(landmarks, (512, 512)).yaw > 25


def test_roll_is_positive_for_a_clockwise_tilt():
    landmarks = _project_canonical(0.0, 0.0)
    angle = math.radians(12)
    centre = np.array([255.5, 255.5])
    clockwise = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])  # y points down
    pose = F.estimate_pose((landmarks - centre) @ clockwise.T + centre, (512, 512))
    assert pose.roll == pytest.approx(12, abs=0.5)
    assert abs(pose.yaw) < 0.5 and abs(pose.pitch) < 0.5


@pytest.mark.parametrize("path", FACES, ids=lambda p: p.stem[:12])
def test_mirrored_photo_gives_mirrored_pose_and_frontal_fixtures_small_yaw(path):
    image = np.asarray(F.load_image(path))
    pose = F.prepare_face(image).pose
    mirrored = F.prepare_face(np.ascontiguousarray(image[:, ::-1])).pose
    assert abs(pose.yaw) < 15
    assert mirrored.yaw == pytest.approx(-pose.yaw, abs=4)
    assert mirrored.roll == pytest.approx(-pose.roll, abs=4)
    assert mirrored.pitch == pytest.approx(pose.pitch, abs=8)


def test_prepare_face_returns_everything_a_pipeline_needs():
    prepared = F.prepare_face(FRONTAL, size=192)
    assert prepared.image.shape == (192, 192, 3)
    assert prepared.original.mode == "RGB" and prepared.original.size == _rgb(FRONTAL).size
    assert prepared.warnings == []
    assert torch.allclose(prepared.pose.camera_label, camera_label(prepared.pose.yaw, prepared.pose.pitch))


def test_small_face_gives_a_warning():
    image = _rgb(FRONTAL)
    small = image.resize((image.width // 3, image.height // 3), Image.LANCZOS)
    canvas = Image.new("RGB", (small.width * 2, small.height * 2), (120, 120, 120))
    canvas.paste(small, (small.width // 2, small.height // 2))
    prepared = F.prepare_face(canvas, size=256)
    assert any("small" in note for note in prepared.warnings)
