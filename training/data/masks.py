"""Region label maps of aligned face crops: landmark polygons + MediaPipe selfie segmentation + hair heuristics.

One uint8 label map per crop, classes in `CLASS_NAMES` order (the index is the label value):

* background (0): not the person (selfie segmentation probability <= 0.5) and outside the face oval;
* skin (1): inside the MediaPipe face oval and not one of the finer face regions (bangs over the forehead and beards
  are labelled skin: the oval does not tell them apart);
* brows (2), eyes (3, the eye opening including the iris), nose (4, convex hull of FACEMESH_NOSE), lips (5, outer
  minus inner lip contour), mouth interior (6, inside the inner lip contour);
* hair (7) and body (8, neck, shoulders, clothing): person pixels outside the face oval, split by two heuristics:
  1. the band under the jaw (below the face-oval jaw line between the jaw angles, landmarks 172 and 397, down to the
     bottom edge) is body: the neck and the collar;
  2. elsewhere, person pixels above the ear level are hair; below it they are hair if their colour is close to the
     hair colour sampled above the forehead (Lab distance under `HAIR_COLOUR_DISTANCE` standard deviations), else
     body. Without enough hair sample (bald heads, tight crops) everything below the ear level is body.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from training.data import face_regions as regions

CLASS_NAMES = ("background", "skin", "brows", "eyes", "nose", "lips", "mouth_interior", "hair", "body")
CLASS_COLOURS = (
    (0, 0, 0), (255, 200, 150), (120, 60, 20), (0, 120, 255), (255, 120, 0), (220, 0, 60), (255, 255, 0),
    (140, 0, 200), (0, 180, 80),
)  # fmt: skip
BACKGROUND, SKIN, BROWS, EYES, NOSE, LIPS, MOUTH_INTERIOR, HAIR, BODY = range(len(CLASS_NAMES))
PERSON_THRESHOLD = 0.5
HAIR_COLOUR_DISTANCE = 2.5
MIN_HAIR_SAMPLE = 40
_SUBPIXEL_BITS = 4


class _SelfieSegmenter:
    """One lazily created MediaPipe SelfieSegmentation (general model, 256x256 input) per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model = None

    def person_probability(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W) float32 probability that each pixel shows the person."""
        with self._lock:
            if self._model is None:
                from mediapipe.python.solutions.selfie_segmentation import SelfieSegmentation

                self._model = SelfieSegmentation(model_selection=0)
            result = self._model.process(np.ascontiguousarray(rgb))
        return np.asarray(result.segmentation_mask, dtype=np.float32)


_SEGMENTER = _SelfieSegmenter()


def person_probability(rgb: np.ndarray) -> np.ndarray:
    """MediaPipe selfie-segmentation person probability (H, W) float32 of a uint8 RGB image."""
    return _SEGMENTER.person_probability(rgb)


def _fill(label_map: np.ndarray, points: np.ndarray, value: int) -> None:
    fixed = np.rint(np.asarray(points, dtype=np.float64) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(label_map, [fixed], int(value), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)


def _polygon_mask(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    _fill(mask, points, 1)
    return mask.astype(bool)


def _hair_colour_like(rgb: np.ndarray, sample: np.ndarray) -> np.ndarray | None:
    """Boolean map of pixels whose Lab colour is within HAIR_COLOUR_DISTANCE std of the sampled pixels' colour."""
    if int(sample.sum()) < MIN_HAIR_SAMPLE:
        return None
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    values = lab[sample]
    mean = values.mean(axis=0)
    spread = np.maximum(values.std(axis=0), 6.0)
    distance = np.sqrt((((lab - mean) / spread) ** 2).sum(axis=-1))
    return distance < HAIR_COLOUR_DISTANCE


def region_label_map(rgb: np.ndarray, landmarks: np.ndarray, person: np.ndarray) -> np.ndarray:
    """(H, W) uint8 label map (see `CLASS_NAMES`) of an aligned crop.

    `rgb` (H, W, 3) uint8 crop, `landmarks` (478, 2) in its pixels, `person` (H, W) person probability.
    """
    height, width = rgb.shape[:2]
    shape = (height, width)
    landmarks = np.asarray(landmarks, dtype=np.float64)
    points = lambda indices: landmarks[list(indices)]  # noqa: E731
    label_map = np.zeros(shape, np.uint8)

    oval = _polygon_mask(shape, points(regions.FACE_OVAL))
    is_person = (person > PERSON_THRESHOLD) & ~oval
    ear_level = max(landmarks[regions.RIGHT_CHEEK_EDGE, 1], landmarks[regions.LEFT_CHEEK_EDGE, 1])
    jaw = points(regions.JAW_LINE)
    under_jaw = np.concatenate([jaw, [[jaw[-1, 0], height + 1.0], [jaw[0, 0], height + 1.0]]])
    neck_band = _polygon_mask(shape, under_jaw)
    rows = np.arange(height, dtype=np.float64)[:, None]
    low = np.broadcast_to(rows > ear_level, shape)

    forehead_top = landmarks[regions.FOREHEAD_TOP, 1]
    grown_oval = cv2.dilate(oval.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    hair_sample = is_person & ~grown_oval & np.broadcast_to(rows < forehead_top, shape)
    hair_like = _hair_colour_like(rgb, hair_sample)
    low_hair = np.zeros(shape, bool) if hair_like is None else hair_like

    label_map[is_person & ~low] = HAIR
    label_map[is_person & low & ~neck_band & low_hair] = HAIR
    label_map[is_person & low & ~neck_band & ~low_hair] = BODY
    label_map[is_person & neck_band] = BODY

    label_map[oval] = SKIN
    nose = points(regions.NOSE)
    _fill(label_map, nose[cv2.convexHull(nose.astype(np.float32), returnPoints=False).reshape(-1)], NOSE)
    for brow in (regions.RIGHT_EYEBROW, regions.LEFT_EYEBROW):
        _fill(label_map, points(brow), BROWS)
    for eye in (regions.RIGHT_EYE, regions.LEFT_EYE):
        _fill(label_map, points(eye), EYES)
    _fill(label_map, points(regions.LIPS_OUTER), LIPS)
    _fill(label_map, points(regions.LIPS_INNER), MOUTH_INTERIOR)
    return label_map


def colourise(label_map: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colour image of a label map (CLASS_COLOURS), for overlays and contact sheets."""
    return np.asarray(CLASS_COLOURS, dtype=np.uint8)[label_map]
