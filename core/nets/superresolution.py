"""EG3D / PanoHead super-resolution modules (official `training/superresolution.py` state-dict layout).

Each module turns the neural-rendered feature image (32 channels) and raw RGB into the final image with two
StyleGAN2 synthesis blocks, every layer modulated by the last w. Variants, selected by the last part of
`rendering_kwargs['superresolution_module']`:

| variant | output | input | block0 | block1 | own `resample_filter` |
|---|---|---|---|---|---|
| SuperresolutionHybrid2X | 128 | 64 | no-up, 128 ch @ 64 | up, 64 ch @ 128 | yes |
| SuperresolutionHybrid4X | 256 | 128 | no-up, 128 ch @ 128 | up, 64 ch @ 256 | yes |
| SuperresolutionHybrid8X | 512 | 128 | up, 128 ch @ 256 | up, 64 ch @ 512 | yes |
| SuperresolutionHybrid8XDC | 512 | 128 | up, 256 ch @ 256 | up, 128 ch @ 512 | no |
| SuperresolutionPreview2X (ours) | 64 | 32 | no-up, 64 ch @ 32 | up, 32 ch @ 64 | yes |

`SuperresolutionPreview2X` is not in the official code: it is Hybrid2X at half the size and half the channels, for
the bundled 64-px CPU preview of the 3D head generator. The released 512-px FFHQ checkpoints use Hybrid8XDC; the
reference vectors use Hybrid2X. Blocks use fp16 with `conv_clamp=256` when `sr_num_fp16_res > 0` (the clamp
applies in fp32 too); on CPU they always run in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.nets.ops import setup_filter
from core.nets.stylegan2 import SynthesisBlock, SynthesisLayer, ToRGBLayer, block_dtype

SR_W_DIM = 512  # hard-coded in the official modules


@dataclass(frozen=True)
class SuperresolutionSpec:
    img_resolution: int
    input_resolution: int
    block0_upsamples: bool
    block0_channels: int
    block1_channels: int
    has_resample_filter: bool
    only_upsize_input: bool  # Hybrid4X resizes its input only when it is smaller than input_resolution


SUPERRESOLUTION_SPECS = {
    "SuperresolutionHybrid2X": SuperresolutionSpec(128, 64, False, 128, 64, True, False),
    "SuperresolutionHybrid4X": SuperresolutionSpec(256, 128, False, 128, 64, True, True),
    "SuperresolutionHybrid8X": SuperresolutionSpec(512, 128, True, 128, 64, True, False),
    "SuperresolutionHybrid8XDC": SuperresolutionSpec(512, 128, True, 256, 128, False, False),
    "SuperresolutionPreview2X": SuperresolutionSpec(64, 32, False, 64, 32, True, False),
}


class SynthesisBlockNoUp(torch.nn.Module):
    """Skip-architecture synthesis block without up-sampling: conv0, conv1, ToRGB added to the incoming image."""

    def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels, use_fp16=False, conv_clamp=None,
                 fused_modconv_default="inference_only"):
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.use_fp16 = use_fp16
        self.fused_modconv_default = fused_modconv_default
        self.num_conv = 2
        self.num_torgb = 1
        self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))
        self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, **layer_kwargs):
        """(features, image) -> (features, image + ToRGB(features)); ws is [N, 3, w_dim]."""
        dtype = block_dtype(self.use_fp16, force_fp32, ws.device)
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == "inference_only":
            fused_modconv = not self.training
        w0, w1, w2 = ws.unbind(dim=1)
        x = x.to(dtype=dtype)
        x = self.conv0(x, w0, fused_modconv=fused_modconv, **layer_kwargs)
        x = self.conv1(x, w1, fused_modconv=fused_modconv, **layer_kwargs)
        y = self.torgb(x, w2, fused_modconv=fused_modconv).to(torch.float32)
        img = img + y if img is not None else y
        return x, img


class SuperResolution(torch.nn.Module):
    """One of the official Hybrid super-resolution modules (see the module docstring for the variants)."""

    def __init__(self, variant, channels, img_resolution, sr_num_fp16_res, sr_antialias,
                 fused_modconv_default="inference_only", **ignored_kwargs):
        """`ignored_kwargs` (channel_base, channel_max, ... from `sr_kwargs`) are accepted and unused, as officially."""
        super().__init__()
        if variant not in SUPERRESOLUTION_SPECS:
            raise ValueError(f"unknown super-resolution module {variant!r}; known: {sorted(SUPERRESOLUTION_SPECS)}")
        spec = SUPERRESOLUTION_SPECS[variant]
        if img_resolution != spec.img_resolution:
            raise ValueError(f"{variant} produces {spec.img_resolution} px, not {img_resolution}")
        self.variant = variant
        self.spec = spec
        self.input_resolution = spec.input_resolution
        self.sr_antialias = sr_antialias
        use_fp16 = sr_num_fp16_res > 0
        block_kwargs = dict(w_dim=SR_W_DIM, img_channels=3, use_fp16=use_fp16, conv_clamp=256 if use_fp16 else None,
                            fused_modconv_default=fused_modconv_default)
        if spec.block0_upsamples:
            self.block0 = SynthesisBlock(channels, spec.block0_channels, resolution=spec.input_resolution * 2,
                                         is_last=False, **block_kwargs)
        else:
            self.block0 = SynthesisBlockNoUp(channels, spec.block0_channels, resolution=spec.input_resolution,
                                             **block_kwargs)
        self.block1 = SynthesisBlock(spec.block0_channels, spec.block1_channels, resolution=spec.img_resolution,
                                     is_last=True, **block_kwargs)
        if spec.has_resample_filter:
            self.register_buffer("resample_filter", setup_filter([1, 3, 3, 1]))

    def forward(self, rgb, x, ws, **block_kwargs):
        """Final image [N, 3, img_resolution, img_resolution] from raw rgb [N, 3, R, R], features x and ws."""
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        size = x.shape[-1]
        if size < self.input_resolution or (size != self.input_resolution and not self.spec.only_upsize_input):
            resize = dict(size=(self.input_resolution, self.input_resolution), mode="bilinear", align_corners=False,
                          antialias=self.sr_antialias)
            x = F.interpolate(x, **resize)
            rgb = F.interpolate(rgb, **resize)
        x, rgb = self.block0(x, rgb, ws, **block_kwargs)
        x, rgb = self.block1(x, rgb, ws, **block_kwargs)
        return rgb


def build_superresolution(module_name, **kwargs) -> SuperResolution:
    """Super-resolution module named like the official class path (e.g. 'training.superresolution.X')."""
    return SuperResolution(module_name.rsplit(".", 1)[-1], **kwargs)
