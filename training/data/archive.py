"""The training archive format and its loader; trainers use `load_archive` and never parse the file themselves.

Format: one `.npz` file (a zip of `.npy` arrays, written with fixed timestamps so that equal content gives equal
bytes; no pickles), N samples:

* `metadata` uint8 bytes: UTF-8 JSON with `size`, `names` (the N sample ids), `class_names`, `splits`, `sources`,
  `groups`, `image_format`, `from_crop`, `landmark_mirror`, `face3dmm_layout` (after the 3dmm stage);
* `image_data` uint8 (total,) + `image_offsets` int64 (N + 1,): concatenated encoded RGB crops (WebP), sample i is
  `image_data[image_offsets[i]:image_offsets[i + 1]]`; `mask_data` + `mask_offsets` likewise, PNG label maps
  (uint8 class ids indexing `class_names`);
* `landmarks` float32 (N, 478, 2), 256-px archive only: MediaPipe landmarks in crop pixels (pixel-centre convention);
* `pose` float32 (N, 3): yaw, pitch, roll in degrees (`core.face.estimate_pose` on the source photo);
* `camera` float32 (N, 25): its EG3D camera label; `beauty` float32 (N,): MEBeauty mean rating 1-10, NaN where none;
* `split`, `source`, `group` uint8 (N,): indices into `splits`, `sources`, `groups`;
* `phash` uint64 (N,): 64-bit DCT perceptual hash of the 128-px crop; `source_scale` float32 (N,): crop pixels per
  source pixel (< 1: the crop was downscaled);
* `face3dmm` float32 (N, D), after the 3dmm stage: ICT-FaceKit `FaceParams.to_vector()` of the crop (NaN rows where
  the fit failed); `face3dmm_identity_mirror` float32 (K, K), optional: identity coefficients under a flip.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.data.flip import flip_sample

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
LABEL_KEYS = ("landmarks", "pose", "camera", "beauty", "face3dmm", "source_scale")


def archive_path(out_dir: str | Path, size: int) -> Path:
    """Path of the archive of `size`-pixel crops in a build folder (`faces256.npz`, `faces128.npz`)."""
    return Path(out_dir) / f"faces{size}.npz"


def write_archive(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict) -> Path:
    """Write arrays + JSON metadata as a deterministic `.npz` (same content -> same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {"metadata": np.frombuffer(json.dumps(metadata, sort_keys=True).encode("utf-8"), np.uint8), **arrays}
    temporary = path.with_suffix(".partial")
    with zipfile.ZipFile(temporary, "w") as archive:
        for key in sorted(entries):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as file:
                np.lib.format.write_array(file, np.ascontiguousarray(entries[key]), allow_pickle=False)
    temporary.replace(path)
    return path


def read_archive(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """All arrays (without `metadata`) and the decoded metadata of an archive."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    metadata = json.loads(arrays.pop("metadata").tobytes().decode("utf-8"))
    return arrays, metadata


def pack_bytes(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated uint8 data and int64 offsets (N + 1) of a list of byte strings."""
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(blob) for blob in blobs])
    data = np.frombuffer(b"".join(blobs), np.uint8) if blobs else np.zeros(0, np.uint8)
    return data, offsets


class FaceArchive:
    """Samples of one archive (optionally one split): decoded uint8 images and masks on access, label arrays as
    attributes (`pose`, `camera`, `beauty`, `landmarks`, `face3dmm`, `split`, ... indexed like the samples)."""

    def __init__(self, arrays: dict[str, np.ndarray], metadata: dict, indices: np.ndarray):
        self.metadata = metadata
        self.indices = indices
        self._arrays = arrays
        self.names = [metadata["names"][i] for i in indices]
        self.size = int(metadata["size"])
        self.class_names = tuple(metadata["class_names"])
        self.identity_mirror = arrays.get("face3dmm_identity_mirror")
        for key in ("pose", "camera", "beauty", "landmarks", "face3dmm", "split", "source", "group", "phash",
                    "source_scale"):  # fmt: skip
            setattr(self, key, arrays[key][indices] if key in arrays else None)

    def __len__(self) -> int:
        return len(self.indices)

    def _blob(self, kind: str, i: int) -> bytes:
        index = self.indices[i]
        offsets = self._arrays[f"{kind}_offsets"]
        return self._arrays[f"{kind}_data"][offsets[index] : offsets[index + 1]].tobytes()

    def image(self, i: int) -> np.ndarray:
        """(size, size, 3) uint8 RGB crop of sample i."""
        return np.array(Image.open(io.BytesIO(self._blob("image", i))).convert("RGB"))

    def mask(self, i: int) -> np.ndarray:
        """(size, size) uint8 label map of sample i (values index `class_names`)."""
        return np.array(Image.open(io.BytesIO(self._blob("mask", i))))

    def sample(self, i: int, flip: bool = False) -> dict:
        """Image, mask and every label of sample i as NumPy values; `flip=True` mirrors all of them consistently."""
        sample = {"name": self.names[i], "image": self.image(i), "mask": self.mask(i)}
        for key in LABEL_KEYS:
            values = getattr(self, key)
            if values is not None:
                sample[key] = np.asarray(values[i], dtype=np.float32)
        sample["split"] = self.metadata["splits"][int(self.split[i])]
        return flip_sample(sample, self.identity_mirror) if flip else sample

    def torch_dataset(self, flip_probability: float = 0.0):
        """A `torch.utils.data.Dataset` over these samples (see `FaceTorchDataset`)."""
        return FaceTorchDataset(self, flip_probability)


def load_archive(path: str | Path, split: str | None = None) -> FaceArchive:
    """Load an archive written by `training.data.build_dataset`; `split` ("train", "val", "test") selects samples."""
    arrays, metadata = read_archive(path)
    count = len(metadata["names"])
    indices = np.arange(count)
    if split is not None:
        if split not in metadata["splits"]:
            raise ValueError(f"unknown split {split!r}; the archive has {metadata['splits']}")
        indices = np.flatnonzero(arrays["split"] == metadata["splits"].index(split))
    return FaceArchive(arrays, metadata, indices)


class FaceTorchDataset(Dataset):
    """Tensors per sample: `image` float32 (3, S, S) in [-1, 1], `mask` int64 (S, S), float32 labels (`pose`,
    `camera`, `beauty`, `landmarks`, `face3dmm`, `source_scale` where present), `flipped` bool.

    Each sample is mirrored with probability `flip_probability` (labels follow, see `training.data.flip`); the draw
    uses torch's RNG, so seed it (or the DataLoader workers) for reproducible augmentation.
    """

    def __init__(self, archive: FaceArchive, flip_probability: float = 0.0):
        self.archive = archive
        self.flip_probability = float(flip_probability)

    def __len__(self) -> int:
        return len(self.archive)

    def __getitem__(self, i: int) -> dict:
        flip = self.flip_probability > 0 and bool(torch.rand(()) < self.flip_probability)
        sample = self.archive.sample(i, flip=flip)
        item = {
            "image": torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 127.5 - 1.0,
            "mask": torch.from_numpy(sample["mask"].astype(np.int64)),
            "flipped": flip,
        }
        for key in LABEL_KEYS:
            if key in sample:
                item[key] = torch.from_numpy(np.asarray(sample[key], dtype=np.float32))
        return item
