"""Image encoders into generator latent spaces.

`StyleEncoder`: an e4e-style encoder (Tov et al. 2021, "Designing an Encoder for StyleGAN Image Manipulation") from
an FFHQ-aligned crop to the W+ codes of a `core.nets.stylegan2.Generator`, small enough to bundle (about 1.4 M
parameters for the 128-px base generator, 2.7 MiB in float16). A convolutional backbone feeds a three-level feature
pyramid (pSp); each level predicts the codes of its layer group (coarse, middle, fine). As in e4e the first code is
a base offset shared by every layer and the others add per-layer deltas, of which only the first `delta_layers` are
switched on (progressive training grows that number). Codes are offsets from the generator's `w_avg`, stored in the
encoder so that an export is self-contained.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from core.nets.stylegan2 import Conv2dLayer, FullyConnectedLayer

STYLE_ENCODER_DEFAULTS: dict[str, Any] = {
    "channels": [32, 48, 96, 128, 128],  # backbone stages, each halves the resolution
    "pyramid_channels": 128,
    "head_channels": 32,
    "head_grid": 4,
    "head_hidden": 128,
}
OUTPUT_INIT_GAIN = 0.1  # the last layer starts small, so an untrained encoder returns codes near w_avg


def style_layer_groups(num_ws: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(start, stop) W+ indices of the coarse (4-8 px), middle (16-32 px) and fine (64 px and up) layers of a
    StyleGAN2 synthesis network with `num_ws` codes; smaller networks keep at least one code per group."""
    if num_ws < 3:
        raise ValueError(f"need at least 3 W+ codes, got {num_ws}")
    middle = min(4, num_ws - 2)
    fine = max(min(8, num_ws - 1), middle + 1)
    return (0, middle), (middle, fine), (fine, num_ws)


def style_encoder_config(num_ws: int, w_dim: int, input_size: int, **overrides: Any) -> dict[str, Any]:
    """A complete `StyleEncoder` config for a generator with `num_ws` x `w_dim` codes (all deltas on)."""
    config = {**STYLE_ENCODER_DEFAULTS, "num_ws": num_ws, "w_dim": w_dim, "input_size": input_size,
              "delta_layers": num_ws - 1}
    config.update(overrides)
    return config


class StyleLevelHead(torch.nn.Module):
    """One pyramid level -> the codes of its layer group: 1x1 conv, pooling to a small grid, two linear layers."""

    def __init__(self, in_channels: int, channels: int, grid: int, hidden: int, num_codes: int, w_dim: int):
        super().__init__()
        self.grid = grid
        self.num_codes = num_codes
        self.w_dim = w_dim
        self.reduce = Conv2dLayer(in_channels, channels, 1, activation="lrelu")
        self.hidden = FullyConnectedLayer(channels * grid * grid, hidden, activation="lrelu")
        self.out = FullyConnectedLayer(hidden, num_codes * w_dim)
        with torch.no_grad():
            self.out.weight.mul_(OUTPUT_INIT_GAIN)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.reduce(features), self.grid).flatten(1)
        return self.out(self.hidden(x)).view(-1, self.num_codes, self.w_dim)


class StyleEncoder(torch.nn.Module):
    """Aligned face crops (B x 3 x S x S in [-1, 1], any S) -> W+ codes (B x num_ws x w_dim)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.num_ws = int(config["num_ws"])
        self.w_dim = int(config["w_dim"])
        self.input_size = int(config["input_size"])
        self.delta_layers = int(config["delta_layers"])
        channels = list(config["channels"])
        if len(channels) < 3 or self.input_size % 2 ** len(channels):
            raise ValueError("need at least 3 backbone stages and an input size divisible by 2**stages")
        self.stem = Conv2dLayer(3, channels[0], 3, activation="lrelu")
        self.stages = torch.nn.ModuleList()
        previous = channels[0]
        for width in channels:
            self.stages.append(torch.nn.Sequential(
                Conv2dLayer(previous, width, 3, activation="lrelu", down=2),
                Conv2dLayer(width, width, 3, activation="lrelu"),
            ))
            previous = width
        pyramid = int(config["pyramid_channels"])
        # lateral connections of the three deepest stages: coarse (deepest), middle, fine
        self.laterals = torch.nn.ModuleList(Conv2dLayer(channels[-1 - i], pyramid, 1) for i in range(3))
        self.heads = torch.nn.ModuleList(
            StyleLevelHead(pyramid, int(config["head_channels"]), int(config["head_grid"]),
                           int(config["head_hidden"]), stop - start, self.w_dim)
            for start, stop in style_layer_groups(self.num_ws)
        )
        self.register_buffer("w_avg", torch.zeros([self.w_dim]))

    def offsets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(base B x w_dim, deltas B x num_ws x w_dim): codes = w_avg + base + deltas; deltas beyond
        `delta_layers` (and the first layer's) are zero."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        x = self.stem(images.to(self.w_avg.dtype))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        levels = []
        top = None
        for lateral, feature in zip(self.laterals, reversed(features[-3:])):
            level = lateral(feature)
            if top is not None:
                level = level + F.interpolate(top, size=level.shape[-2:], mode="bilinear", align_corners=False)
            levels.append(level)
            top = level
        codes = torch.cat([head(level) for head, level in zip(self.heads, levels)], dim=1)
        base = codes[:, 0]
        active = torch.arange(self.num_ws, device=codes.device)
        mask = ((active >= 1) & (active <= self.delta_layers)).to(codes.dtype)
        return base, codes * mask[None, :, None]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        base, deltas = self.offsets(images)
        return self.w_avg + base[:, None, :] + deltas


def build_style_encoder(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> StyleEncoder:
    """`Runtime.get_model` builder: a `StyleEncoder` from its `config.json` and float16/float32 weights."""
    encoder = StyleEncoder(config)
    encoder.load_state_dict({key: value.float() for key, value in state_dict.items()})
    return encoder.eval()


def head3d_encoder_config(num_ws: int, w_dim: int, input_size: int, camera_dim: int = 25,
                          **overrides: Any) -> dict[str, Any]:
    """A complete `Head3DEncoder` config for a tri-plane generator with `num_ws` x `w_dim` codes (narrower heads
    than the 2D default: 1.5 M parameters, 2.9 MiB in float16, for the bundled 10 x 512 codes)."""
    return {**style_encoder_config(num_ws, w_dim, input_size), "head_hidden": 96, "camera_dim": camera_dim,
            **overrides}


class Head3DEncoder(StyleEncoder):
    """Aligned face crops and their estimated camera labels (B x 25, `core.face` pose) -> W+ of a tri-plane
    generator (EG3D / PanoHead). The `StyleEncoder` codes plus a pose term on the shared base code: the camera
    tells the encoder how the head is turned, so a turned head need not be encoded as a different identity. The pose
    term starts at zero."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.camera_offset = FullyConnectedLayer(int(config["camera_dim"]), self.w_dim)
        with torch.no_grad():
            self.camera_offset.weight.zero_()

    def forward(self, images: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        base, deltas = self.offsets(images)
        base = base + self.camera_offset(cameras.to(base.dtype))
        return self.w_avg + base[:, None, :] + deltas


def build_head3d_encoder(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Head3DEncoder:
    """`Runtime.get_model` builder: a `Head3DEncoder` from its `config.json` and float16/float32 weights."""
    encoder = Head3DEncoder(config)
    encoder.load_state_dict({key: value.float() for key, value in state_dict.items()})
    return encoder.eval()
