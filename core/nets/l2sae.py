"""Latents2Semantics Autoencoder (L2SAE, Tomar & Rajagopalan 2023; see docs/methods.md §2), pure PyTorch.

An image x in [-1, 1] is encoded into
* a **structure tensor** S [N, R * C_r, h, h] (h = `structure_resolution`, e.g. 32 for 128 px), whose channels are
  sliced into one group of C_r channels per region (`regions`, the dataset's label-map classes), and
* a **style code** s [N, style_dim] (unit mean square), a global 1-D code.

`decode(S, s)` renders the structure with the style through StyleGAN2 modulated layers (`core.nets.stylegan2`),
`mask_logits(S)` turns every region's slice into that region's mask logit at image resolution (one network
shared by all slices, so each slice has to encode its own region), and `edit_style(s, direction, region, strength)`
(the Style Manipulation Network) perturbs the style for one region: `s + strength * (direction + delta)`, where
`delta` is a learned, region-conditioned correction that starts at zero (so the untrained head is the paper's plain
Gaussian perturbation / style swap). Editing region r blends `decode(S, s')` into the input by r's mask; the blend
itself lives in `core.pipelines.latents2semantics`.

Precision: everything runs in the input's dtype (float32 on CPU); the decoder's skip image is float32.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.nets.ops import normalize_2nd_moment
from core.nets.stylegan2 import Conv2dLayer, FullyConnectedLayer, SynthesisBlock, SynthesisLayer, ToRGBLayer

DATASET_REGIONS = ("background", "skin", "brows", "eyes", "nose", "lips", "mouth_interior", "hair", "body")


@dataclass(frozen=True)
class L2SAEConfig:
    """Architecture of an L2SAE; channels at resolution r are min(channel_base // r, channel_max)."""

    resolution: int = 128
    structure_resolution: int = 32
    regions: tuple[str, ...] = DATASET_REGIONS
    channels_per_region: int = 4
    style_dim: int = 256
    channel_base: int = 4096
    channel_max: int = 128
    mask_channels: int = 16

    def __post_init__(self):
        object.__setattr__(self, "regions", tuple(self.regions))
        for value in (self.resolution, self.structure_resolution):
            assert value >= 4 and value & (value - 1) == 0, "resolutions must be powers of two"
        assert 8 <= self.structure_resolution * 2 <= self.resolution, "structure must be at most half the image"

    def channels(self, resolution: int) -> int:
        return min(self.channel_base // resolution, self.channel_max)

    @property
    def structure_channels(self) -> int:
        return len(self.regions) * self.channels_per_region

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "regions": list(self.regions)}


class Encoder(torch.nn.Module):
    """x [N, 3, res, res] -> structure S [N, R*C_r, h, h], style s [N, style_dim]."""

    def __init__(self, config: L2SAEConfig):
        super().__init__()
        self.resolutions = [config.resolution >> i for i in range(int(math.log2(config.resolution //
                                                                                   config.structure_resolution)))]
        self.fromrgb = Conv2dLayer(3, config.channels(config.resolution), 1, activation="lrelu")
        for res in self.resolutions:
            setattr(self, f"b{res}_conv", Conv2dLayer(config.channels(res), config.channels(res), 3, activation="lrelu"))
            setattr(self, f"b{res}_down", Conv2dLayer(config.channels(res), config.channels(res // 2), 3,
                                                      activation="lrelu", down=2))
        h = config.structure_resolution
        self.structure_conv = Conv2dLayer(config.channels(h), config.channels(h), 3, activation="lrelu")
        self.structure_out = Conv2dLayer(config.channels(h), config.structure_channels, 1)
        self.style_down0 = Conv2dLayer(config.channels(h), config.channels(h // 2), 3, activation="lrelu", down=2)
        self.style_down1 = Conv2dLayer(config.channels(h // 2), config.channels(h // 4), 3, activation="lrelu",
                                       down=2)
        self.style_out = FullyConnectedLayer(config.channels(h // 4), config.style_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.fromrgb(images)
        for res in self.resolutions:
            x = getattr(self, f"b{res}_down")(getattr(self, f"b{res}_conv")(x))
        structure = self.structure_out(self.structure_conv(x))
        style = self.style_down1(self.style_down0(x)).mean(dim=[2, 3])
        return structure, normalize_2nd_moment(self.style_out(style))


class Decoder(torch.nn.Module):
    """(S, s) -> image [N, 3, res, res]: a conv on S, one modulated layer at h, then StyleGAN2 'skip' blocks
    (modulated 2x-up conv, modulated conv, toRGB) up to the image resolution; no per-pixel noise."""

    def __init__(self, config: L2SAEConfig):
        super().__init__()
        h, w_dim = config.structure_resolution, config.style_dim
        self.structure_in = Conv2dLayer(config.structure_channels, config.channels(h), 3, activation="lrelu")
        self.conv = SynthesisLayer(config.channels(h), config.channels(h), w_dim=w_dim, resolution=h, use_noise=False)
        self.torgb = ToRGBLayer(config.channels(h), 3, w_dim=w_dim)
        self.block_resolutions = [h << i for i in range(1, int(math.log2(config.resolution // h)) + 1)]
        for res in self.block_resolutions:
            block = SynthesisBlock(config.channels(res // 2), config.channels(res), w_dim=w_dim, resolution=res,
                                   img_channels=3, is_last=res == config.resolution, architecture="skip",
                                   use_noise=False)
            setattr(self, f"b{res}", block)

    def forward(self, structure: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        fused = not self.training
        x = self.conv(self.structure_in(structure), style, fused_modconv=fused)
        image = self.torgb(x, style, fused_modconv=fused).to(torch.float32)
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            ws = style.unsqueeze(1).expand(-1, block.num_conv + block.num_torgb, -1)
            x, image = block(x, image, ws, fused_modconv=fused)
        return image


class SemanticMaskPredictor(torch.nn.Module):
    """One region's structure slice [M, C_r, h, h] -> its mask logit [M, 1, res, res]; shared by all regions, plus a
    learned per-region bias."""

    def __init__(self, config: L2SAEConfig):
        super().__init__()
        channels = config.mask_channels
        self.input = Conv2dLayer(config.channels_per_region, channels, 3, activation="lrelu")
        self.num_up = int(math.log2(config.resolution // config.structure_resolution))
        for index in range(self.num_up):
            setattr(self, f"up{index}", Conv2dLayer(channels, channels, 3, activation="lrelu", up=2))
        self.output = Conv2dLayer(channels, 1, 1)
        self.region_bias = torch.nn.Parameter(torch.zeros([len(config.regions)]))

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        x = self.input(slices)
        for index in range(self.num_up):
            x = getattr(self, f"up{index}")(x)
        return self.output(x)


class StyleManipulationNetwork(torch.nn.Module):
    """s' = s + strength * (direction + delta(s, direction, region)); delta's last layer starts at zero."""

    def __init__(self, config: L2SAEConfig):
        super().__init__()
        self.num_regions = len(config.regions)
        self.hidden = FullyConnectedLayer(2 * config.style_dim + self.num_regions, config.style_dim,
                                          activation="lrelu")
        self.delta = FullyConnectedLayer(config.style_dim, config.style_dim)
        with torch.no_grad():
            self.delta.weight.zero_()

    def forward(self, style: torch.Tensor, direction: torch.Tensor, region: torch.Tensor,
                strength: torch.Tensor | float) -> torch.Tensor:
        """style, direction [N, D]; region int64 [N]; strength float or [N]."""
        one_hot = F.one_hot(region, self.num_regions).to(style.dtype)
        delta = self.delta(self.hidden(torch.cat([style, direction, one_hot], dim=1)))
        strength = torch.as_tensor(strength, dtype=style.dtype, device=style.device).reshape(-1, 1)
        return style + strength * (direction + delta)


class L2SAE(torch.nn.Module):
    """Encoder, Decoder, SemanticMaskPredictor and StyleManipulationNetwork of one L2SAE."""

    def __init__(self, config: L2SAEConfig | None = None):
        super().__init__()
        self.config = config or L2SAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.mask_predictor = SemanticMaskPredictor(self.config)
        self.style_manipulator = StyleManipulationNetwork(self.config)

    @classmethod
    def from_config(cls, config: dict[str, Any] | L2SAEConfig) -> "L2SAE":
        """Build from an `L2SAEConfig` or its dict (the `config` entry of an exported `config.json`)."""
        return cls(config if isinstance(config, L2SAEConfig) else L2SAEConfig(**config))

    @property
    def regions(self) -> tuple[str, ...]:
        return self.config.regions

    def region_index(self, region: str) -> int:
        if region not in self.config.regions:
            raise ValueError(f"unknown region {region!r}; expected one of {', '.join(self.config.regions)}")
        return self.config.regions.index(region)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, 3, res, res] in [-1, 1] -> (structure, style)."""
        return self.encoder(images)

    def decode(self, structure: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.decoder(structure, style)

    def region_slice(self, structure: torch.Tensor, region: int) -> torch.Tensor:
        """The C_r channels of `structure` assigned to region index `region`."""
        width = self.config.channels_per_region
        return structure[:, region * width:(region + 1) * width]

    def mask_logits(self, structure: torch.Tensor) -> torch.Tensor:
        """Per-region mask logits [N, R, res, res] (softmax over R gives the region probabilities)."""
        n, _, h, w = structure.shape
        slices = structure.reshape(n * len(self.config.regions), self.config.channels_per_region, h, w)
        logits = self.mask_predictor(slices).reshape(n, len(self.config.regions), self.config.resolution,
                                                     self.config.resolution)
        return logits + self.mask_predictor.region_bias.to(logits.dtype).reshape(1, -1, 1, 1)

    def edit_style(self, style: torch.Tensor, direction: torch.Tensor, region: torch.Tensor | int,
                   strength: torch.Tensor | float = 1.0) -> torch.Tensor:
        """The Style Manipulation Network: `direction` is Gaussian noise (random edit) or s_ref - s (swap)."""
        if isinstance(region, int):
            region = torch.full([style.shape[0]], region, dtype=torch.int64, device=style.device)
        return self.style_manipulator(style, direction, region, strength)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and mask logits of `images`."""
        structure, style = self.encode(images)
        return self.decode(structure, style), self.mask_logits(structure)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())




def build_l2sae(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> L2SAE:
    """An L2SAE from an exported `config.json` dict ({"kind": "l2sae", "config": {...}}) and its weights (any float
    dtype; loaded strictly)."""
    if config.get("kind") != "l2sae":
        raise ValueError(f"expected an l2sae config, got kind {config.get('kind')!r}")
    model = L2SAE.from_config(config["config"])
    model.load_state_dict(state_dict, strict=True)
    return model


def load_l2sae(directory: str | Path, device: str | torch.device = "cpu") -> L2SAE:
    """Load an exported L2SAE folder (`config.json` + `model.safetensors`) as an eval-mode float32 model."""
    from safetensors.torch import load_file

    from core.nets import CONFIG_FILE, WEIGHTS_FILE

    directory = Path(directory)
    model = build_l2sae(json.loads((directory / CONFIG_FILE).read_text()), load_file(directory / WEIGHTS_FILE))
    return model.float().eval().requires_grad_(False).to(device)
