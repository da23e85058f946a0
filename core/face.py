"""Face input: safe image intake, MediaPipe detection + 478 landmarks, FFHQ-style alignment, head-pose estimate.

`prepare_face(source)` is the one call tabs and pipelines use; the steps are public too (`load_image`,
`detect_faces`, `align_face`, `estimate_pose`), and `check_upload` is a cheap header-only check for a Gradio
`validator=` (it returns a message instead of raising). Every problem with the user's input raises `FaceInputError`,
whose text is written for end users.

Conventions
* Pixel coordinates are (x, y) with the origin at the centre of the top-left pixel (the OpenCV convention), so
  `cv2.warpAffine(np.asarray(original), aligned.transform, (size, size))` reproduces the aligned crop (apart from the
  filled border) and `landmarks @ transform[:, :2].T + transform[:, 2]` gives the aligned landmarks.
* Landmarks follow MediaPipe's 478-point order (468 mesh points + 10 iris points); "left"/"right" in names mean the
  subject's left/right, so the subject's right eye is on the image's left in a frontal photo.
* Head pose is expressed as the camera of EG3D / PanoHead (see `core.nets.camera`): the head is fixed in the world
  frame (+y up, the face looks toward +z, +x is the subject's left) and the camera orbits it. `yaw` and `pitch` are the
  look-at parameters in degrees: positive yaw puts the camera toward +x (it sees more of the subject's left cheek,
  i.e. the subject has turned to their right); negative pitch puts the camera above the face (it looks down). As in
  EG3D's `LookAtPoseSampler`, pitch is the polar parameter (camera height = -radius * pitch / 90 deg), not the
  elevation angle. `camera_label(pose.yaw, pose.pitch)` equals `pose.camera_label`. A mirrored photo gives the
  negated yaw and roll. `roll` is the in-image tilt: positive when the subject's left side (image right) is lower,
  i.e. the head is rotated clockwise in the displayed image.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from core.nets.camera import camera_label as eg3d_camera_label
from core.weights import default_registry

DEFAULT_MAX_BYTES = 25 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MIN_SIDE = 64
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG includes MPO (multi-picture JPEG)
MAX_FACES = 8
# Detection runs on a copy whose longer side is at most this many pixels (MediaPipe's detectors work at 128-192 px).
DETECTION_MAX_SIDE = 1280
# A face only the full-range detector finds is meshed in a window this many times its box (at most WINDOW_SIDE px).
WINDOW_PER_BOX = 2.5
WINDOW_SIDE = 512
# The ramp (fraction of the output size) over which the area outside the photo fades to a blurred, flat fill.
BORDER_FADE = 0.25

# Eye contours of MediaPipe's FACEMESH_RIGHT_EYE / FACEMESH_LEFT_EYE (the subject's right / left eye).
RIGHT_EYE_CONTOUR = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246)
LEFT_EYE_CONTOUR = (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)
NOSE_TIP = 1
MOUTH_RIGHT_CORNER = 61
MOUTH_LEFT_CORNER = 291

CANONICAL_MESH_MODEL = "mediapipe-canonical-face"  # registry name (checksum-verified on load)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


class FaceInputError(ValueError):
    """A problem with the user's image; the message is meant to be shown to the end user as is."""


@dataclass(frozen=True)
class DetectedFace:
    """One detected face in source-image pixel coordinates.

    `landmarks` (478, 2) float32; `landmarks_3d` (478, 3) float32 with MediaPipe's relative depth in pixels
    (smaller z = closer to the camera); `box` (x0, y0, x1, y1) is the landmarks' extent.
    """

    landmarks: np.ndarray
    landmarks_3d: np.ndarray
    box: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        """Area of `box` in square pixels."""
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


@dataclass(frozen=True)
class AlignedFace:
    """An FFHQ-style crop: `image` (size, size, 3) uint8, `transform` (2, 3) source -> aligned pixels, `landmarks`."""

    image: np.ndarray
    transform: np.ndarray
    landmarks: np.ndarray


@dataclass(frozen=True)
class HeadPose:
    """Head pose as an EG3D camera (see the module docstring for the conventions).

    `yaw`, `pitch`, `roll` in degrees; `rotation` (3, 3) maps canonical-face coordinates to OpenCV camera coordinates;
    `camera_label` [1, 25] float32 tensor (cam2world + normalised intrinsics, radius 2.7, FOV 18.837).
    """

    yaw: float
    pitch: float
    roll: float
    rotation: np.ndarray
    camera_label: torch.Tensor


@dataclass(frozen=True)
class PreparedFace:
    """Everything a pipeline needs from an upload: the aligned crop and its landmarks, pose, warnings, original."""

    image: np.ndarray
    landmarks: np.ndarray
    pose: HeadPose
    warnings: list[str]
    original: Image.Image
    face: DetectedFace
    transform: np.ndarray


# ---------------------------------------------------------------------------------------------------------------------
# Intake


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} megapixels"


def _open_unverified(source: ImageSource, max_bytes: int) -> Image.Image:
    """Opens `source` reading only the header (file-based sources are not decoded yet)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _image_from_array(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FaceInputError("The uploaded file could not be found. Please upload the photo again.")
        if path.stat().st_size > max_bytes:
            raise FaceInputError(_too_many_bytes(path.stat().st_size, max_bytes))
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise TypeError(f"unsupported image source type: {type(source).__name__}")
    if len(data) > max_bytes:
        raise FaceInputError(_too_many_bytes(len(data), max_bytes))
    if not data:
        raise FaceInputError("The uploaded file is empty. Please upload a photo (JPEG, PNG or WebP).")
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FaceInputError("The image is far too large to process. Please upload a smaller photo.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise FaceInputError(
            "The file could not be read as an image. Please upload a photo in JPEG, PNG or WebP format."
        ) from error


def _too_many_bytes(size: int, max_bytes: int) -> str:
    return f"The file is too big ({size / 2**20:.1f} MB); the limit is {max_bytes / 2**20:.0f} MB."


def _image_from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise FaceInputError(f"Image arrays must be uint8, not {array.dtype}.")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise FaceInputError(f"Image arrays must be HxW, HxWx3 or HxWx4, not {array.shape}.")
    return Image.fromarray(np.ascontiguousarray(array))


def _check_dimensions(image: Image.Image, max_pixels: int, min_side: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise FaceInputError(
            f"The image is too large ({width}×{height} pixels); the limit is {_megapixels(max_pixels)}. "
            "Please upload a smaller photo."
        )
    if min(width, height) < min_side:
        raise FaceInputError(
            f"The image is too small ({width}×{height} pixels). "
            f"Please upload a photo at least {min_side} pixels on each side."
        )


def _decode(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise FaceInputError(
            "The image file is damaged or incomplete and could not be decoded. Please upload it again."
        ) from error


def _exif_upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (KeyError, ValueError, TypeError, SyntaxError, OSError):
        return image  # unreadable EXIF: keep the stored orientation


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB: high-bit-depth grey is rescaled, transparency is composited on white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as error:
        raise FaceInputError(
            f"Images in colour mode {image.mode} are not supported. Please upload an RGB photo."
        ) from error


def check_upload(
    source: ImageSource | None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> str | None:
    """Cheap check of an upload (file type, size, dimensions; no decoding): a message for the user, or None if fine.

    Meant for a Gradio `validator=`: `msg = check_upload(path); return gr.validate(msg is None, msg or "")`.
    """
    if source is None:
        return "Please upload a photo."
    try:
        _check_dimensions(_open_unverified(source, max_bytes), max_pixels, min_side)
    except FaceInputError as error:
        return str(error)
    return None


def load_image(
    source: ImageSource,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """Safely loads a path, bytes, PIL image or uint8 array as an upright 8-bit RGB PIL image.

    Size limits are checked on the header before decoding; EXIF orientation is applied; grey, 16-bit, CMYK, palette
    and transparent images are converted (transparency composited on white). Raises `FaceInputError`.
    """
    image = _open_unverified(source, max_bytes)
    _check_dimensions(image, max_pixels, min_side)
    _decode(image)
    image = _to_rgb(_exif_upright(image))
    image.load()
    return image


# ---------------------------------------------------------------------------------------------------------------------
# Detection


class _MediaPipeFaces:
    """MediaPipe FaceMesh (478 landmarks) and the full-range face detector, created once, shared behind a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mesh = None
        self._detector = None

    def _create(self) -> None:
        from mediapipe.python.solutions.face_detection import FaceDetection
        from mediapipe.python.solutions.face_mesh import FaceMesh

        self._mesh = FaceMesh(
            static_image_mode=True, max_num_faces=MAX_FACES, refine_landmarks=True, min_detection_confidence=0.5
        )
        self._detector = FaceDetection(model_selection=1, min_detection_confidence=0.5)

    def landmarks(self, rgb: np.ndarray) -> list[np.ndarray]:
        """(478, 3) arrays of MediaPipe's normalised (x, y, z) per face found by FaceMesh."""
        with self._lock:
            if self._mesh is None:
                self._create()
            result = self._mesh.process(rgb)
        faces = result.multi_face_landmarks or []
        return [np.array([(p.x, p.y, p.z) for p in face.landmark], dtype=np.float64) for face in faces]

    def boxes(self, rgb: np.ndarray) -> list[tuple[float, float, float, float]]:
        """Normalised (x0, y0, x1, y1) boxes of the full-range detector (it finds faces too small for FaceMesh)."""
        with self._lock:
            if self._detector is None:
                self._create()
            result = self._detector.process(rgb)
        boxes = []
        for detection in result.detections or []:
            box = detection.location_data.relative_bounding_box
            boxes.append((box.xmin, box.ymin, box.xmin + box.width, box.ymin + box.height))
        return boxes


_MEDIAPIPE = _MediaPipeFaces()


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _detected_face(normalised: np.ndarray, origin: tuple[float, float], extent: tuple[float, float]) -> DetectedFace:
    """A face from normalised landmarks of a window at `origin` (continuous pixels) of `extent` (width, height)."""
    points = np.empty((len(normalised), 3), dtype=np.float32)
    points[:, 0] = normalised[:, 0] * extent[0] + origin[0] - 0.5
    points[:, 1] = normalised[:, 1] * extent[1] + origin[1] - 0.5
    points[:, 2] = normalised[:, 2] * extent[0]
    x0, y0 = points[:, :2].min(axis=0)
    x1, y1 = points[:, :2].max(axis=0)
    box = (float(x0), float(y0), float(x1), float(y1))
    return DetectedFace(landmarks=points[:, :2].copy(), landmarks_3d=points, box=box)


def _contains(face: DetectedFace, point: np.ndarray) -> bool:
    x0, y0, x1, y1 = face.box
    return bool(x0 <= point[0] <= x1 and y0 <= point[1] <= y1)


def _mesh_in_window(rgb: np.ndarray, centre: np.ndarray, side: float) -> DetectedFace | None:
    """FaceMesh on a square window around `centre` (padded where it leaves the image); the face nearest the centre."""
    height, width = rgb.shape[:2]
    side_px = max(int(round(side)), 8)
    x0, y0 = int(round(centre[0] - side_px / 2)), int(round(centre[1] - side_px / 2))
    window = rgb[max(y0, 0) : max(min(y0 + side_px, height), 0), max(x0, 0) : max(min(x0 + side_px, width), 0)]
    if window.size == 0:
        return None
    window = cv2.copyMakeBorder(
        window, max(-y0, 0), max(y0 + side_px - height, 0), max(-x0, 0), max(x0 + side_px - width, 0),
        cv2.BORDER_CONSTANT, value=(0, 0, 0),
    )
    if side_px > WINDOW_SIDE:
        window = cv2.resize(window, (WINDOW_SIDE, WINDOW_SIDE), interpolation=cv2.INTER_AREA)
    faces = [_detected_face(found, (x0, y0), (side_px, side_px)) for found in _MEDIAPIPE.landmarks(window)]
    if not faces:
        return None
    return min(faces, key=lambda face: np.hypot(*(face.landmarks.mean(axis=0) - centre)))


def detect_faces(image: Image.Image | np.ndarray) -> list[DetectedFace]:
    """Faces with 478 MediaPipe landmarks in pixel coordinates, largest first (empty list if none).

    FaceMesh runs on the whole image (downscaled to `DETECTION_MAX_SIDE`); faces that only the full-range detector
    finds (small faces in a large photo) get their landmarks from FaceMesh on a window around them.
    """
    rgb = _as_rgb_array(image)
    height, width = rgb.shape[:2]
    scale = DETECTION_MAX_SIDE / max(height, width)
    small = rgb
    if scale < 1:
        small = cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    faces = [_detected_face(found, (0.0, 0.0), (width, height)) for found in _MEDIAPIPE.landmarks(small)]
    for x0, y0, x1, y1 in _MEDIAPIPE.boxes(small):
        centre = np.array([(x0 + x1) / 2 * width - 0.5, (y0 + y1) / 2 * height - 0.5])
        if len(faces) >= MAX_FACES or any(_contains(face, centre) for face in faces):
            continue
        face = _mesh_in_window(rgb, centre, WINDOW_PER_BOX * max((x1 - x0) * width, (y1 - y0) * height))
        if face is not None and not any(_contains(other, face.landmarks.mean(axis=0)) for other in faces):
            faces.append(face)
    return sorted(faces, key=lambda face: face.area, reverse=True)


# ---------------------------------------------------------------------------------------------------------------------
# Alignment


def five_point_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(5, 2) points in the usual 5-point order: image-left eye, image-right eye, nose tip, image-left and
    image-right mouth corner (for a frontal photo: the subject's right eye, left eye, nose, right and left corner).

    Eye centres are the means of the eye contours (robust to gaze), not the iris centres.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    return np.stack(
        [
            landmarks[list(RIGHT_EYE_CONTOUR)].mean(axis=0),
            landmarks[list(LEFT_EYE_CONTOUR)].mean(axis=0),
            landmarks[NOSE_TIP],
            landmarks[MOUTH_RIGHT_CORNER],
            landmarks[MOUTH_LEFT_CORNER],
        ]
    )


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """(4, 2) corners of the FFHQ crop (top-left, bottom-left, bottom-right, top-right) in source pixels.

    The FFHQ recipe: the square is centred just below the eye midpoint (a tenth of the eye-to-mouth vector), turned
    so that the eyes are level, with half-side max(2 * eye distance, 1.8 * eye-to-mouth distance).
    """
    eye_left, eye_right, _, mouth_left, mouth_right = five_point_landmarks(landmarks)
    eye_mid = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) / 2 - eye_mid
    x_axis = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x_axis *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) / np.hypot(*x_axis)
    y_axis = np.array([-x_axis[1], x_axis[0]])
    centre = eye_mid + eye_to_mouth * 0.1
    return np.stack(
        [centre - x_axis - y_axis, centre - x_axis + y_axis, centre + x_axis + y_axis, centre + x_axis - y_axis]
    )


def _quad_transform(quad: np.ndarray, size: int) -> np.ndarray:
    """(3, 3) similarity taking the quad to the output square, both in pixel-centre coordinates."""
    top_left, bottom_left, _, top_right = quad
    x_axis = top_right - top_left
    y_axis = bottom_left - top_left
    scale = size / np.hypot(*x_axis)
    rotation = np.stack([x_axis / np.hypot(*x_axis), y_axis / np.hypot(*y_axis)]) * scale
    matrix = np.eye(3)
    matrix[:2, :2] = rotation
    # The quad's corners map to the output's outer pixel edges, half a pixel before the first pixel centre.
    matrix[:2, 2] = -rotation @ top_left - 0.5
    return matrix


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def align_face(image: Image.Image | np.ndarray, landmarks: np.ndarray, size: int = 256) -> AlignedFace:
    """FFHQ-style aligned square crop of the face given by its 478 landmarks (source pixels).

    Large reductions are pre-shrunk with area averaging; the part of the crop outside the photo is filled by
    reflection that fades into a blurred, flat colour, as in the FFHQ recipe.
    """
    rgb = _as_rgb_array(image)
    landmarks = np.asarray(landmarks, dtype=np.float64)
    transform = _quad_transform(ffhq_quad(landmarks), size)
    scale = math.sqrt(abs(np.linalg.det(transform[:2, :2])))

    # Work on the part of the photo the crop covers (plus an interpolation margin), pre-shrunk if needed.
    corners = np.array([[0, 0], [0, size - 1], [size - 1, size - 1], [size - 1, 0]], dtype=np.float64)
    inverse = np.linalg.inv(transform)
    source_corners = corners @ inverse[:2, :2].T + inverse[:2, 2]
    height, width = rgb.shape[:2]
    x0, y0 = np.clip(np.floor(source_corners.min(axis=0)).astype(int) - 3, 0, [width - 1, height - 1])
    x1, y1 = np.clip(np.ceil(source_corners.max(axis=0)).astype(int) + 4, 1, [width, height])
    patch = rgb[y0:y1, x0:x1]
    to_patch = _translation(-x0, -y0)
    if scale < 0.5:
        shrunk_size = (max(1, round(patch.shape[1] * scale * 1.5)), max(1, round(patch.shape[0] * scale * 1.5)))
        factor_x, factor_y = shrunk_size[0] / patch.shape[1], shrunk_size[1] / patch.shape[0]
        patch = cv2.resize(patch, shrunk_size, interpolation=cv2.INTER_AREA)
        resize = np.array([[factor_x, 0, (factor_x - 1) / 2], [0, factor_y, (factor_y - 1) / 2], [0, 0, 1]])
        to_patch = resize @ to_patch
    patch_to_aligned = (transform @ np.linalg.inv(to_patch))[:2]
    aligned = cv2.warpAffine(
        patch, patch_to_aligned, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT
    )

    inside = cv2.warpAffine(
        np.full(patch.shape[:2], 255, np.uint8), patch_to_aligned, (size, size), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )
    if inside.min() < 128:
        aligned = _fade_border(aligned, inside >= 128, size)

    aligned_landmarks = (landmarks @ transform[:2, :2].T + transform[:2, 2]).astype(np.float32)
    return AlignedFace(image=aligned, transform=transform[:2].copy(), landmarks=aligned_landmarks)


def _fade_border(aligned: np.ndarray, inside: np.ndarray, size: int) -> np.ndarray:
    """Blends the area outside the photo into a blur and then the photo's median colour, with distance."""
    distance = cv2.distanceTransform((~inside).astype(np.uint8), cv2.DIST_L2, 5)
    weight = np.clip(distance / (BORDER_FADE * size), 0.0, 1.0)[:, :, None]
    blurred = cv2.GaussianBlur(aligned, (0, 0), sigmaX=max(0.02 * size, 0.5)).astype(np.float32)
    median = np.median(aligned[inside], axis=0) if inside.any() else np.full(3, 127.0)
    result = aligned.astype(np.float32)
    result += (blurred - result) * np.clip(weight * 3.0, 0.0, 1.0)
    result += (median.astype(np.float32) - result) * weight
    return np.clip(np.rint(result), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Pose


_CANONICAL_MESH: np.ndarray | None = None


def canonical_face_mesh() -> np.ndarray:
    """(468, 3) float64 MediaPipe canonical face model in cm (+x subject's left, +y up, +z toward the viewer)."""
    global _CANONICAL_MESH
    if _CANONICAL_MESH is None:
        path = default_registry().resolve(CANONICAL_MESH_MODEL).path("canonical_face_model.json")
        with path.open() as file:
            _CANONICAL_MESH = np.asarray(json.load(file)["vertices"], dtype=np.float64)
    return _CANONICAL_MESH


def estimate_pose(landmarks: np.ndarray, image_size: tuple[int, int]) -> HeadPose:
    """Head pose from 468/478 landmarks (pixels) of an image of `image_size` = (width, height).

    PnP of the landmarks against the MediaPipe canonical face, with a pinhole camera of focal length
    max(width, height) pixels (about a 53-degree field of view) centred on the image; the camera's direction from the
    head gives yaw and pitch (EG3D look-at parameters), the face's left-right axis in the image gives roll.
    """
    width, height = image_size
    model = canonical_face_mesh()
    points = np.asarray(landmarks, dtype=np.float64)[: len(model)]
    focal = float(max(width, height))
    intrinsics = np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])
    found, rvec, tvec = cv2.solvePnP(model, points, intrinsics, None, flags=cv2.SOLVEPNP_SQPNP)
    if not found:
        raise FaceInputError("The head pose could not be estimated from this photo. Please try a more frontal photo.")
    rvec, tvec = cv2.solvePnPRefineLM(model, points, intrinsics, None, rvec, tvec)
    rotation = cv2.Rodrigues(rvec)[0]

    camera_centre = -rotation.T @ tvec.reshape(3)
    direction = camera_centre / np.linalg.norm(camera_centre)
    yaw = math.degrees(math.atan2(direction[0], direction[2]))
    pitch = -90.0 * float(direction[1])
    # Roll: how far the image's x axis turns from the horizontal right vector of a level camera looking the same way.
    camera_right, camera_down, camera_forward = rotation  # the camera axes in canonical-face coordinates
    level_right = np.cross(camera_forward, (0.0, 1.0, 0.0))
    level_right /= np.linalg.norm(level_right)
    roll = math.degrees(math.atan2(level_right @ camera_down, level_right @ camera_right))
    return HeadPose(
        yaw=yaw, pitch=pitch, roll=roll, rotation=rotation, camera_label=eg3d_camera_label(yaw, pitch).float()
    )


# ---------------------------------------------------------------------------------------------------------------------
# One call


def prepare_face(
    source: ImageSource,
    size: int = 256,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> PreparedFace:
    """Load, detect (largest face), align to `size` and estimate the pose; raises `FaceInputError` for bad input.

    `warnings` holds user-facing notes (several faces, a small or cut-off face, a strongly turned head).
    """
    original = load_image(source, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side)
    faces = detect_faces(original)
    if not faces:
        raise FaceInputError(
            "No face was found in this photo. Please upload a clear, well-lit photo of one face looking roughly at "
            "the camera."
        )
    face = faces[0]
    notes = []
    if len(faces) > 1:
        notes.append(f"{len(faces)} faces were found; the largest one is used.")
    width, height = original.size
    outside = (face.landmarks < -0.5).any() or (face.landmarks[:, 0] > width - 0.5).any() or (
        face.landmarks[:, 1] > height - 0.5
    ).any()
    if outside:
        notes.append("Part of the face is outside the photo; the missing area is filled in.")
    aligned = align_face(original, face.landmarks, size)
    crop_side = size / math.sqrt(abs(np.linalg.det(aligned.transform[:, :2])))
    if crop_side < size / 2:
        notes.append(
            f"The face is small in this photo (the crop is about {crop_side:.0f} pixels wide); the result may be "
            "blurry. A closer photo works better."
        )
    pose = estimate_pose(face.landmarks, original.size)
    if abs(pose.yaw) > 35 or abs(pose.pitch) > 30:
        notes.append("The head is strongly turned; results are best with a roughly frontal photo.")
    return PreparedFace(
        image=aligned.image,
        landmarks=aligned.landmarks,
        pose=pose,
        warnings=notes,
        original=original,
        face=face,
        transform=aligned.transform,
    )
