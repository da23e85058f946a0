"""Face identity embedding: a pure-PyTorch port of dlib's 128-d face-recognition ResNet.

The network (``dlib_face_recognition_resnet_model_v1``) maps a 150x150 face chip to a 128-d descriptor;
dlib calls two chips the same person when the Euclidean distance of their descriptors is below 0.6.
``IdentityEncoder.forward`` takes chips cut the way dlib cuts them; ``embed_aligned`` takes the suite's
FFHQ-aligned crops (``core.face.align_face``) and cuts the chip itself. Everything is differentiable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

DEFAULT_CONFIG: dict[str, Any] = {
    "architecture": "dlib_resnet_v1",
    "input_size": 150,
    "embedding_dim": 128,
    "stem_channels": 32,
    # (channels, blocks, first block halves the resolution)
    "stages": [[32, 3, False], [64, 4, True], [128, 3, True], [256, 3, True], [256, 1, True]],
    # dlib's input layer: (pixel_0_255 - mean) / scale, RGB order
    "pixel_mean": [122.782, 117.001, 104.298],
    "pixel_scale": 256.0,
    # the dlib chip inside an FFHQ-aligned crop: centre and side length as fractions of the crop size
    "ffhq_chip": {"center": [0.5, 0.5], "size": 0.6},
    "same_person_distance": 0.6,
}


class ChannelAffine(nn.Module):
    """Per-channel scale and shift (dlib's ``affine`` layer: a frozen batch norm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Add two NCHW tensors, zero-padding the smaller one at the end of each dimension (dlib's ``add_prev``)."""
    channels, height, width = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[3], 0, height - t.shape[2], 0, channels - t.shape[1]))

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip; the downsampling variant uses a stride-2 unpadded first conv
    and a 2x2 average-pooled skip, as dlib's ``ares_down``."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2 if downsample else 1, padding=0 if downsample else 1)
        self.affine1 = ChannelAffine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.affine2 = ChannelAffine(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        skip = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(_add_zero_padded(out, skip))


class IdentityEncoder(nn.Module):
    """dlib's face-recognition ResNet: 150x150 chips in [-1, 1] -> 128-d identity embeddings."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        cfg = self.config
        stem = cfg["stem_channels"]
        self.stem_conv = nn.Conv2d(3, stem, 7, stride=2)
        self.stem_affine = ChannelAffine(stem)
        blocks = []
        channels = stem
        for out_channels, count, downsample in cfg["stages"]:
            for index in range(count):
                blocks.append(ResidualBlock(channels, out_channels, downsample and index == 0))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, cfg["embedding_dim"], bias=False)
        mean = torch.tensor(cfg["pixel_mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "IdentityEncoder":
        """Build from ``config.json`` and load ``model.safetensors`` of ``directory``."""
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        model = cls(config)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.to(device=device, dtype=dtype).eval()

    def descriptor(self, images: torch.Tensor) -> torch.Tensor:
        """dlib's raw (unnormalised) 128-d descriptor of chips in [-1, 1]; its same-person distance is 0.6."""
        size = self.config["input_size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        pixels = (images + 1.0) * 127.5
        x = (pixels - self.pixel_mean.to(images.dtype)) / self.config["pixel_scale"]
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)
        x = self.blocks(x).mean(dim=(2, 3))
        return self.fc(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W chips in [-1, 1] (resized to the input size if needed) -> B x 128 unit embeddings."""
        return F.normalize(self.descriptor(images), dim=1)

    def chip_from_aligned(self, images: torch.Tensor) -> torch.Tensor:
        """Cut dlib's chip out of FFHQ-aligned crops (B x 3 x S x S in [-1, 1]); differentiable."""
        size = self.config["input_size"]
        chip = self.config["ffhq_chip"]
        side = chip["size"] * images.shape[-1]
        if side > 1.5 * size:
            images = F.interpolate(images, scale_factor=size / side, mode="bilinear", antialias=True, align_corners=False)
        cx, cy = (2.0 * c - 1.0 for c in chip["center"])
        theta = images.new_tensor([[chip["size"], 0.0, cx], [0.0, chip["size"], cy]]).expand(images.shape[0], 2, 3)
        grid = F.affine_grid(theta, [images.shape[0], 3, size, size], align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def embed_aligned(self, images: torch.Tensor) -> torch.Tensor:
        """FFHQ-aligned crops (B x 3 x S x S in [-1, 1]) -> B x 128 unit embeddings."""
        return self(self.chip_from_aligned(images))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two B x D embedding batches (or two D vectors)."""
    return F.cosine_similarity(a, b, dim=-1)


def image_to_tensor(image: Any) -> torch.Tensor:
    """An HxWx3 uint8 array or PIL image -> 1 x 3 x H x W float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
