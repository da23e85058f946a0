"""Write a smaller copy of a training archive, for CPU pilot runs that check a recipe learns before GPU time is spent.

    python -m training.data.downscale datasets/faces/faces128.npz /tmp/faces32.npz --size 32

Images are box-filtered and stored as lossless WebP, region masks take the nearest label; every label array is kept
(camera intrinsics are normalised, so they hold at any size).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.archive import pack_bytes, read_archive, write_archive


def _resized_blobs(data: np.ndarray, offsets: np.ndarray, size: int, resample: Image.Resampling,
                   image_format: str) -> tuple[np.ndarray, np.ndarray]:
    blobs = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        image = Image.open(io.BytesIO(data[start:end].tobytes())).resize((size, size), resample)
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **({"lossless": True} if image_format == "WEBP" else {}))
        blobs.append(buffer.getvalue())
    return pack_bytes(blobs)


def downscale_archive(source: str | Path, target: str | Path, size: int) -> Path:
    """Copy the archive at `source` to `target` with `size`-pixel images and masks; labels unchanged."""
    arrays, metadata = read_archive(source)
    if size > int(metadata["size"]):
        raise ValueError(f"{size} px is larger than the archive's {metadata['size']} px")
    if "landmarks" in arrays:
        raise ValueError("landmark archives (256 px) are not downscaled: their pixel coordinates would go stale")
    arrays["image_data"], arrays["image_offsets"] = _resized_blobs(
        arrays["image_data"], arrays["image_offsets"], size, Image.Resampling.BOX, "WEBP")
    arrays["mask_data"], arrays["mask_offsets"] = _resized_blobs(
        arrays["mask_data"], arrays["mask_offsets"], size, Image.Resampling.NEAREST, "PNG")
    return write_archive(target, arrays, {**metadata, "size": size})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="training archive (faces128.npz)")
    parser.add_argument("target", help="where to write the smaller archive")
    parser.add_argument("--size", type=int, required=True, help="crop size in pixels (a power of two)")
    args = parser.parse_args()
    print(downscale_archive(args.source, args.target, args.size))


if __name__ == "__main__":
    main()
