"""F_R: a small CNN that regresses the normalised ICT-FaceKit parameter vector (`core.face3dmm.FaceParams.to_vector`
layout: identity, expression, rotation, translation, scale, SH lighting) from an aligned face crop.

Used frozen inside GAN training losses, so it is differentiable end to end (resize included). Input: RGB in [-1, 1],
any square size; it is resized (bilinear, antialiased) to `input_size`. Output: the normalised vector
(p - mean) / std, with `mean` / `std` the per-dimension statistics of the training split, stored in config.json
(`normalisation`), so the bundled folder is self-describing; `denormalise` gives the raw vector back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.face3dmm import NUM_EXPRESSIONS, SH_COEFFICIENTS

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REGISTRY_NAME = "face3dmm-estimator"


def parameter_groups(num_identity: int) -> dict[str, slice]:
    """Slices of the `FaceParams.to_vector` layout: identity, expression, rotation, translation, scale, lighting."""
    sizes = {"identity": num_identity, "expression": NUM_EXPRESSIONS, "rotation": 3, "translation": 2, "scale": 1,
             "lighting": 3 * SH_COEFFICIENTS}  # fmt: skip
    groups, start = {}, 0
    for name, size in sizes.items():
        groups[name] = slice(start, start + size)
        start += size
    return groups


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.SiLU())  # fmt: skip


class Face3DMMEstimator(nn.Module):
    """Conv stages (stride-2 downsampling, two 3x3 convs each) -> 4 x 4 features -> small MLP head."""

    def __init__(self, num_identity: int = 50, input_size: int = 64, channels: tuple[int, ...] = (24, 40, 64, 96),
                 head_features: int = 256, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.num_identity = num_identity
        self.input_size = input_size
        self.channels = tuple(channels)
        self.head_features = head_features
        self.out_dim = parameter_groups(num_identity)["lighting"].stop
        layers, previous = [], 3
        for width in self.channels:  # each stage halves the resolution: 64 -> 32 -> 16 -> 8 -> 4
            layers += [_conv_block(previous, width, 2), _conv_block(width, width, 1)]
            previous = width
        self.features = nn.Sequential(*layers)
        spatial = input_size // 2 ** len(self.channels)
        reduced = 16  # 1x1 channel reduction before flattening keeps the head small but position-aware
        self.reduce = _conv_block(previous, reduced, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(reduced * spatial * spatial + previous, head_features),
                                  nn.SiLU(), nn.Linear(head_features, self.out_dim))  # fmt: skip
        mean = torch.zeros(self.out_dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(self.out_dim) if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] images in [-1, 1] -> the network's input size (antialiased bilinear; no-op at that size)."""
        if images.shape[-1] == self.input_size:
            return images
        return F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                             antialias=images.shape[-1] > self.input_size)  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised parameter vectors [B, D] of images [B, 3, S, S] in [-1, 1]."""
        features = self.features(self.resize(images))
        pooled = features.mean(dim=(2, 3))
        return self.head(torch.cat([self.reduce(features).flatten(1), pooled], 1))

    def normalise(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors - self.mean) / self.std

    def denormalise(self, normalised: torch.Tensor) -> torch.Tensor:
        return normalised * self.std + self.mean

    def config(self) -> dict:
        """Constructor arguments (the `init_kwargs` of config.json) without the normalisation."""
        return {"num_identity": self.num_identity, "input_size": self.input_size, "channels": list(self.channels),
                "head_features": self.head_features}  # fmt: skip


def load_face3dmm_estimator(directory: str | Path, device: str | torch.device = "cpu") -> Face3DMMEstimator:
    """Frozen float32 eval-mode estimator from a folder with config.json + model.safetensors (float16 on disk)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    normalisation = config["normalisation"]
    model = Face3DMMEstimator(**config["init_kwargs"], mean=normalisation["mean"], std=normalisation["std"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(directory / WEIGHTS_FILE).items()}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)
