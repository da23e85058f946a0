"""Face-level metrics built on the runtime's face input (``core.face``) and identity network (``core.identity``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from core.beauty import load_identity_encoder
from core.face import FaceInputError, HeadPose, detect_faces, estimate_pose, load_image, prepare_face
from core.identity import IdentityEncoder
from training.eval.metrics import frechet_distance, pairwise_cosine, pose_error

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@lru_cache(maxsize=2)
def identity_encoder(name: str = "identity-resnet") -> IdentityEncoder:
    """The registry's identity network (float32, CPU), loaded once."""
    return load_identity_encoder(name)


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def face_detection_rate(images: Iterable) -> float:
    """Fraction of images (paths, PIL images or RGB uint8 arrays) in which MediaPipe finds at least one face."""
    found = total = 0
    for source in images:
        total += 1
        try:
            found += bool(detect_faces(load_image(source, min_side=16)))
        except FaceInputError:
            pass
    if total == 0:
        raise ValueError("no images given")
    return found / total


def aligned_to_tensor(aligned: Sequence[np.ndarray]) -> torch.Tensor:
    """A list of HxWx3 uint8 aligned crops -> B x 3 x H x W float tensor in [-1, 1]."""
    batch = np.stack([np.asarray(a, dtype=np.uint8) for a in aligned])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def face_descriptors(aligned: Sequence[np.ndarray], encoder: IdentityEncoder | None = None) -> np.ndarray:
    """The identity network's raw (dlib) descriptors [N, 128] of a list of aligned uint8 crops of one size."""
    encoder = encoder or identity_encoder()
    device = next(encoder.parameters()).device
    chips = encoder.chip_from_aligned(aligned_to_tensor(aligned).to(device))
    return encoder.descriptor(chips).float().cpu().double().numpy()


def descriptor_distance(aligned_a: Sequence[np.ndarray], aligned_b: Sequence[np.ndarray],
                        encoder: IdentityEncoder | None = None) -> np.ndarray:
    """Euclidean distance of the identity network's raw descriptors, pair by pair, of two lists of aligned uint8
    crops (each list one size); dlib calls a pair the same person below `encoder.config["same_person_distance"]`."""
    return np.linalg.norm(face_descriptors(aligned_a, encoder) - face_descriptors(aligned_b, encoder), axis=1)


@torch.no_grad()
def embed_aligned_faces(aligned: Sequence[np.ndarray], encoder: IdentityEncoder | None = None,
                        batch_size: int = 32) -> np.ndarray:
    """Identity embeddings (N x 128, unit norm) of FFHQ-aligned uint8 crops, e.g. generator samples."""
    encoder = encoder or identity_encoder()
    chunks = [encoder.embed_aligned(aligned_to_tensor(aligned[i : i + batch_size])) for i in range(0, len(aligned), batch_size)]
    return torch.cat(chunks).double().numpy()


def embed_photos(sources: Iterable, encoder: IdentityEncoder | None = None) -> np.ndarray:
    """Identity embeddings of photos: each is detected and aligned by ``core.face`` first (raises FaceInputError)."""
    return embed_aligned_faces([prepare_face(source).image for source in sources], encoder)


def identity_similarity(aligned_a: Sequence[np.ndarray], aligned_b: Sequence[np.ndarray],
                        encoder: IdentityEncoder | None = None) -> np.ndarray:
    """Cosine identity similarity of pair i = (aligned_a[i], aligned_b[i]) of FFHQ-aligned crops (N values)."""
    return pairwise_cosine(embed_aligned_faces(aligned_a, encoder), embed_aligned_faces(aligned_b, encoder))


def frechet_identity_distance(aligned_a: Sequence[np.ndarray], aligned_b: Sequence[np.ndarray],
                              encoder: IdentityEncoder | None = None) -> float:
    """FD-id: Frechet distance between the identity-embedding distributions of two sets of aligned crops."""
    return frechet_distance(embed_aligned_faces(aligned_a, encoder), embed_aligned_faces(aligned_b, encoder))


def head_pose(source) -> HeadPose:
    """Head pose (yaw, pitch, roll in degrees) of the largest face in a photo; raises FaceInputError."""
    image = load_image(source)
    faces = detect_faces(image)
    if not faces:
        raise FaceInputError("No face was found in this photo.")
    return estimate_pose(faces[0].landmarks, image.size)


def landmark_pose_error(landmarks_a: Sequence[np.ndarray], landmarks_b: Sequence[np.ndarray],
                        image_size: tuple[int, int]) -> dict[str, float]:
    """Mean absolute yaw/pitch/roll error (degrees) between poses estimated from paired 478-point landmark sets."""

    def angles(landmarks: Sequence[np.ndarray]) -> np.ndarray:
        poses = [estimate_pose(points, image_size) for points in landmarks]
        return np.array([[p.yaw, p.pitch, p.roll] for p in poses])

    return pose_error(angles(landmarks_a), angles(landmarks_b))
