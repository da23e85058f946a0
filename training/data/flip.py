"""What a horizontal flip of an aligned crop does to each label, so trainers can flip-augment consistently.

* image and region mask: mirrored columns (the class table has no left/right classes);
* landmarks (pixels, pixel-centre convention): x -> size - 1 - x, and the points are re-indexed with the mesh's mirror
  permutation (the subject's left eye becomes the right eye);
* pose (yaw, pitch, roll in degrees, `core.face` convention): yaw and roll change sign, pitch is kept;
* EG3D camera label (16 cam2world values + 9 normalised intrinsics): world and camera x axes are mirrored,
  cam2world -> S @ cam2world @ S with S = diag(-1, 1, 1, 1), principal point cx -> 1 - cx; for a look-at camera this
  is exactly the label of (-yaw, pitch);
* ICT-FaceKit vector (`core.face3dmm.FaceParams.to_vector` layout): expressions swap their _L/_R (and Left/Right)
  partners; yaw and roll change sign; the horizontal translation u changes sign; the SH coefficients odd in x
  (x, xy, xz) change sign; identity coefficients are mapped by the archive's identity mirror matrix (a least-squares
  fit of the mirrored identity modes in the span of the modes; the identity stays unchanged without one).
"""

from __future__ import annotations

import numpy as np

from core.face3dmm import EXPRESSION_NAMES, NUM_EXPRESSIONS, SH_COEFFICIENTS
from training.data.face_regions import LANDMARK_MIRROR

_MIRROR_4x4 = np.diag([-1.0, 1.0, 1.0, 1.0])
# SH basis order of core.face3dmm: 1, y, z, x, xy, yz, 3z^2-1, xz, x^2-y^2; these change sign when x does.
_SH_ODD_IN_X = (3, 4, 7)


def _expression_mirror() -> np.ndarray:
    names = list(EXPRESSION_NAMES)
    swaps = {"_L": "_R", "_R": "_L", "Left": "Right", "Right": "Left"}
    permutation = []
    for name in names:
        partner = name
        for suffix, other in swaps.items():
            if name.endswith(suffix):
                partner = name[: -len(suffix)] + other
                break
        permutation.append(names.index(partner))
    return np.asarray(permutation, dtype=np.int64)


EXPRESSION_MIRROR = _expression_mirror()


def flip_image(image: np.ndarray) -> np.ndarray:
    """Mirrored (H, W, ...) image or label map."""
    return np.ascontiguousarray(image[:, ::-1])


def flip_landmarks(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Mirrored (478, 2) landmarks of a size x size crop, re-indexed so that each index keeps its meaning."""
    landmarks = np.asarray(landmarks)
    mirrored = landmarks[..., LANDMARK_MIRROR, :].copy()
    mirrored[..., 0] = size - 1 - mirrored[..., 0]
    return mirrored


def flip_pose(pose: np.ndarray) -> np.ndarray:
    """(..., 3) yaw, pitch, roll in degrees of the mirrored image."""
    return np.asarray(pose) * np.array([-1.0, 1.0, -1.0], dtype=np.asarray(pose).dtype)


def flip_camera(camera: np.ndarray) -> np.ndarray:
    """(..., 25) EG3D camera label of the mirrored image."""
    camera = np.asarray(camera)
    cam2world = camera[..., :16].reshape(*camera.shape[:-1], 4, 4)
    intrinsics = camera[..., 16:].reshape(*camera.shape[:-1], 3, 3).copy()
    flipped = (_MIRROR_4x4 @ cam2world @ _MIRROR_4x4).astype(camera.dtype)
    intrinsics[..., 0, 2] = 1 - intrinsics[..., 0, 2]
    return np.concatenate([flipped.reshape(*camera.shape[:-1], 16), intrinsics.reshape(*camera.shape[:-1], 9)], -1)


def flip_face3dmm(vector: np.ndarray, num_identity: int, identity_mirror: np.ndarray | None = None) -> np.ndarray:
    """(..., D) ICT-FaceKit parameter vector (FaceParams.to_vector layout) of the mirrored image.

    `identity_mirror` (K, K): identity' = identity @ identity_mirror; None keeps the identity.
    """
    vector = np.array(vector, copy=True)
    k = num_identity
    if identity_mirror is not None:
        vector[..., :k] = vector[..., :k] @ identity_mirror
    expression = slice(k, k + NUM_EXPRESSIONS)
    vector[..., expression] = vector[..., expression][..., EXPRESSION_MIRROR]
    rotation = k + NUM_EXPRESSIONS
    vector[..., rotation] *= -1  # yaw
    vector[..., rotation + 2] *= -1  # roll
    vector[..., rotation + 3] *= -1  # translation u
    sh_start = rotation + 6
    for channel in range(3):
        for index in _SH_ODD_IN_X:
            vector[..., sh_start + channel * SH_COEFFICIENTS + index] *= -1
    return vector


def identity_mirror_matrix(model) -> np.ndarray:
    """(K, K) least-squares map of identity coefficients to those of the mirrored face (`core.face3dmm.FaceModel`).

    Vertices are matched to their mirror image by nearest neighbour on the neutral mesh; each mirrored identity mode
    is projected onto the span of the modes.
    """
    from scipy.spatial import cKDTree

    neutral = model.neutral.double().numpy()
    basis = model.identity_basis.double().numpy()  # (K, V, 3)
    partner = cKDTree(neutral).query(neutral * [-1.0, 1.0, 1.0])[1]
    mirrored = basis[:, partner, :] * np.array([-1.0, 1.0, 1.0])
    flat, mirrored_flat = basis.reshape(len(basis), -1), mirrored.reshape(len(basis), -1)
    # identity' @ flat ~= identity @ mirrored_flat  =>  identity' = identity @ (mirrored_flat @ pinv(flat))
    return (mirrored_flat @ np.linalg.pinv(flat)).astype(np.float32)


def flip_sample(sample: dict, identity_mirror: np.ndarray | None = None) -> dict:
    """A copy of an archive sample (see `training.data.archive.FaceArchive.sample`) with every label mirrored."""
    flipped = dict(sample)
    size = sample["image"].shape[1]
    flipped["image"] = flip_image(sample["image"])
    if "mask" in sample:
        flipped["mask"] = flip_image(sample["mask"])
    if "landmarks" in sample:
        flipped["landmarks"] = flip_landmarks(sample["landmarks"], size)
    if "pose" in sample:
        flipped["pose"] = flip_pose(sample["pose"])
    if "camera" in sample:
        flipped["camera"] = flip_camera(sample["camera"])
    if "face3dmm" in sample:
        num_identity = sample["face3dmm"].shape[-1] - (NUM_EXPRESSIONS + 6 + 3 * SH_COEFFICIENTS)
        flipped["face3dmm"] = flip_face3dmm(sample["face3dmm"], num_identity, identity_mirror)
    return flipped
