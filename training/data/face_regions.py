"""Ordered MediaPipe Face Mesh contours used to draw region masks, and the landmark mirror permutation.

The contours are the closed loops of FACEMESH_FACE_OVAL, FACEMESH_LIPS, FACEMESH_{LEFT,RIGHT}_{EYE,EYEBROW} from
`face_mesh_connections.py` (MediaPipe, Apache-2.0; see `../shared/data/mediapipe/`), with each pair of open chains
(upper and lower lid, lip or brow line) joined into one polygon. The nose has no closed contour in MediaPipe: its
region is the convex hull of FACEMESH_NOSE. "Left"/"right" are the subject's.
"""

from __future__ import annotations

import numpy as np

from core.face import canonical_face_mesh

FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150,
    136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
LIPS_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYEBROW = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)
LEFT_EYEBROW = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
NOSE = (1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326, 327, 344, 440)
CHIN = 152
FOREHEAD_TOP = 10
# Face-oval points at the level of the ears (subject's right / left).
RIGHT_CHEEK_EDGE = 234
LEFT_CHEEK_EDGE = 454
# Jaw angles (subject's right / left) and the face-oval chain between them through the chin.
RIGHT_JAW_ANGLE = 172
LEFT_JAW_ANGLE = 397
JAW_LINE = FACE_OVAL[FACE_OVAL.index(LEFT_JAW_ANGLE) : FACE_OVAL.index(RIGHT_JAW_ANGLE) + 1][::-1]

# Iris points 468-477 (centre, then four contour points per eye) mirror onto the other eye's points.
_IRIS_MIRROR = {468: 473, 469: 476, 470: 475, 471: 474, 472: 477}


def _mirror_permutation() -> np.ndarray:
    """(478,) int index array: landmark i of a mirrored face is landmark perm[i] of the original, mirrored."""
    mesh = canonical_face_mesh()
    mirrored = mesh * np.array([-1.0, 1.0, 1.0])
    distances = ((mirrored[:, None, :] - mesh[None, :, :]) ** 2).sum(-1)
    permutation = list(distances.argmin(axis=1))
    iris = {**_IRIS_MIRROR, **{value: key for key, value in _IRIS_MIRROR.items()}}
    permutation += [iris[index] for index in range(468, 478)]
    permutation = np.asarray(permutation, dtype=np.int64)
    if not np.array_equal(permutation[permutation], np.arange(478)):
        raise RuntimeError("the canonical face mesh is not mirror-symmetric")
    return permutation


LANDMARK_MIRROR = _mirror_permutation()
