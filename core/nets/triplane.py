"""EG3D and PanoHead tri-plane generators (official `training/triplane.py` state-dict layout and call signatures).

Construction (what `build_generator` does with a converted checkpoint's config)::

    G = TriPlaneGenerator(**{**init_kwargs, "rendering_kwargs": rendering_kwargs})  # init_kwargs as in the JSON
    G.neural_rendering_resolution = config["neural_rendering_resolution"]           # not in the state dict
    G.load_state_dict(state_dict, strict=True)

(`init_kwargs` already holds a `rendering_kwargs` entry; the top-level `rendering_kwargs` of the JSON is the copy
the official forward pass reads, so it replaces that entry.)

The flavour comes from the optional `kind` keyword ("eg3d" or "panohead"). Left out, it is "panohead" when
`rendering_kwargs` has a `triplane_depth` entry (every PanoHead config has one, no EG3D config does), else "eg3d".

* EG3D: backbone planes at 256 px x 96 channels, the released checkpoints' plane axes ((x, y), (x, z), (z, x)),
  2-D bilinear plane sampling, decoder features through sigmoid, composited features rescaled to [-1, 1],
  `image_raw` = first three feature channels.
* PanoHead: tri-grid of depth D at `triplane_size` px (3-D sampling), fixed axes, decoder activation from
  `rendering_kwargs['decoder_activation']`, density forced to -1000 outside |x|, |z| <= box/2 - 0.1 while rendering,
  background synthesis network composited behind the head, `torgb` turning features into `image_raw`, `image_mask`
  output, and `t_mapping` (camera translation offset, applied only by `forward(z, c)`).

Rendering is deterministic with `deterministic=True` (evenly spaced coarse depths, importance sampling on evenly
spaced u); otherwise the renderer draws from `generator` (global CPU RNG when None) exactly like the official code.
On CUDA the blocks follow the official mixed-precision settings; on CPU everything runs in float32.
"""

from __future__ import annotations

import math

import torch

from core.nets.stylegan2 import FullyConnectedLayer, MappingNetwork, SynthesisNetwork, ToRGBLayer
from core.nets.superresolution import build_superresolution
from core.nets.volume_rendering import (
    EG3D_PLANE_AXES,
    FIXED_PLANE_AXES,
    render_rays,
    sample_mean_from_planes,
    sample_rays,
    side_crop_mask,
)

PLANE_FEATURES = 32
EG3D_PLANE_RESOLUTION = 256  # hard-coded in EG3D's TriPlaneGenerator
PANOHEAD_CROP_MARGIN = 0.1  # PanoHead renderer's `triplane_crop`


class OSGDecoder(torch.nn.Module):
    """Mean of the three planes' features -> FC 32->64 -> softplus -> FC 64->1+32: raw sigma and features."""

    def __init__(self, n_features: int, decoder_lr_mul: float = 1, decoder_output_dim: int = PLANE_FEATURES,
                 activation: str = "sigmoid"):
        super().__init__()
        if activation not in ("sigmoid", "lrelu", "none"):
            raise ValueError(f"unknown decoder activation {activation!r}")
        self.hidden_dim = 64
        self.activation = activation
        self.net = torch.nn.Sequential(
            FullyConnectedLayer(n_features, self.hidden_dim, lr_multiplier=decoder_lr_mul),
            torch.nn.Softplus(),
            FullyConnectedLayer(self.hidden_dim, 1 + decoder_output_dim, lr_multiplier=decoder_lr_mul),
        )

    def forward(self, sampled_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 3, M, C] plane features -> (features [N, M, 32], raw sigma [N, M, 1])."""
        return self.decode(sampled_features.mean(1))

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` of the planes' mean features [N, M, C] (`sample_mean_from_planes`)."""
        n, m, c = x.shape
        x = self.net(x.reshape(n * m, c)).reshape(n, m, -1)
        rgb, sigma = x[..., 1:], x[..., 0:1]
        if self.activation == "sigmoid":
            rgb = torch.sigmoid(rgb) * (1 + 2 * 0.001) - 0.001
        elif self.activation == "lrelu":
            rgb = torch.nn.functional.leaky_relu(rgb, 0.2) * math.sqrt(2)
        return rgb, sigma


class TriPlaneBackbone(torch.nn.Module):
    """StyleGAN2 mapping + synthesis producing the plane features (state-dict names `synthesis.*`, `mapping.*`)."""

    def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs, **synthesis_kwargs):
        super().__init__()
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)


class TriPlaneGenerator(torch.nn.Module):
    """EG3D / PanoHead generator: mapping -> plane backbone -> volume rendering -> super-resolution."""

    def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, sr_num_fp16_res=0, mapping_kwargs=None,
                 rendering_kwargs=None, sr_kwargs=None, kind=None, **synthesis_kwargs):
        super().__init__()
        mapping_kwargs = dict(mapping_kwargs or {})
        rendering_kwargs = dict(rendering_kwargs or {})
        sr_kwargs = dict(sr_kwargs or {})
        if kind is None:
            kind = "panohead" if "triplane_depth" in rendering_kwargs else "eg3d"
        if kind not in ("eg3d", "panohead"):
            raise ValueError(f"kind must be 'eg3d' or 'panohead', got {kind!r}")
        if rendering_kwargs.get("disparity_space_sampling") or rendering_kwargs.get("clamp_mode", "softplus") != "softplus":
            raise ValueError("only clamp_mode='softplus' without disparity-space sampling is supported")
        self.kind = kind
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.rendering_kwargs = rendering_kwargs
        self.neural_rendering_resolution = 64

        if kind == "eg3d":
            self.grid_depth = None
            self.plane_axes = EG3D_PLANE_AXES
            plane_resolution = EG3D_PLANE_RESOLUTION
            activation = "sigmoid"
        else:
            self.grid_depth = rendering_kwargs["triplane_depth"]
            self.plane_axes = FIXED_PLANE_AXES
            plane_resolution = rendering_kwargs["triplane_size"]
            activation = rendering_kwargs["decoder_activation"]
        plane_channels = PLANE_FEATURES * 3 * (self.grid_depth or 1)

        self.backbone = TriPlaneBackbone(z_dim, c_dim, w_dim, img_resolution=plane_resolution,
                                         img_channels=plane_channels, mapping_kwargs=mapping_kwargs, **synthesis_kwargs)
        self.superresolution = build_superresolution(
            rendering_kwargs["superresolution_module"], channels=PLANE_FEATURES, img_resolution=img_resolution,
            sr_num_fp16_res=sr_num_fp16_res, sr_antialias=rendering_kwargs["sr_antialias"], **sr_kwargs)
        self.decoder = OSGDecoder(PLANE_FEATURES, decoder_lr_mul=rendering_kwargs.get("decoder_lr_mul", 1),
                                  decoder_output_dim=PLANE_FEATURES, activation=activation)
        self.torgb = None
        self.bcg_synthesis = None
        self.t_mapping = None
        if kind == "panohead":
            if rendering_kwargs.get("use_torgb_raw", False):
                self.torgb = ToRGBLayer(PLANE_FEATURES, 3, w_dim)
            if rendering_kwargs.get("use_background", False):
                bcg_kwargs = dict(synthesis_kwargs, channel_base=synthesis_kwargs["channel_base"] // 2)
                self.bcg_synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=self.superresolution.input_resolution,
                                                      img_channels=PLANE_FEATURES, **bcg_kwargs)
            self.t_mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=3, num_ws=1, lr_multiplier=1.0,
                                            last_activation="linear", **mapping_kwargs)

    # ----------------------------------------------------------------------------------------------- latents
    def _conditioning(self, c: torch.Tensor) -> torch.Tensor:
        if self.rendering_kwargs.get("c_gen_conditioning_zero", False):
            c = torch.zeros_like(c)
        return c * self.rendering_kwargs.get("c_scale", 0)

    def mapping(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        """ws [N, num_ws, w_dim] from z [N, z_dim] and the conditioning camera label c [N, 25]."""
        return self.backbone.mapping(z, self._conditioning(c), truncation_psi=truncation_psi,
                                     truncation_cutoff=truncation_cutoff, update_emas=update_emas)

    def apply_delta_c(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        """PanoHead: (c with the predicted translation offset added to c[:, 3, 7, 11], offset [N, 3])."""
        if self.t_mapping is None:
            raise RuntimeError("apply_delta_c exists only for PanoHead generators")
        delta_c = self.t_mapping(z, self._conditioning(c), truncation_psi=truncation_psi,
                                 truncation_cutoff=truncation_cutoff, update_emas=update_emas).squeeze(1)
        c_new = c.clone()
        c_new[:, [3, 7, 11]] += delta_c
        return c_new, delta_c

    # ----------------------------------------------------------------------------------------------- planes
    def generate_planes(self, ws, **synthesis_kwargs) -> torch.Tensor:
        """Backbone output viewed as [N, 3, 32*D, P, P] (D = 1 for EG3D)."""
        planes = self.backbone.synthesis(ws, **synthesis_kwargs)
        return planes.view(len(planes), 3, -1, planes.shape[-2], planes.shape[-1])

    def _field(self, planes):
        box_warp = self.rendering_kwargs["box_warp"]

        def field(coordinates, directions):
            n, m, _ = coordinates.shape
            if planes.shape[0] > 1:
                return self.decoder.decode(sample_mean_from_planes(planes, coordinates, box_warp, self.plane_axes,
                                                                   self.grid_depth))
            # one set of planes serves every row (views of one latent): the points are laid out in at least one
            # row per thread, as grid_sample's CPU kernel shares its work out per batch row
            rows = max(n, torch.get_num_threads())
            rows = rows if (n * m) % rows == 0 else n
            rgb, sigma = self.decoder.decode(sample_mean_from_planes(
                planes.expand(rows, *planes.shape[1:]), coordinates.reshape(rows, -1, 3), box_warp,
                self.plane_axes, self.grid_depth))
            return rgb.reshape(n, m, -1), sigma.reshape(n, m, 1)

        return field

    def query_planes(self, planes, coordinates, directions) -> dict[str, torch.Tensor]:
        """Raw `sigma` [N, M, 1] and decoder features `rgb` [N, M, 32] at world points [N, M, 3] (directions unused)."""
        rgb, sigma = self._field(planes)(coordinates, directions)
        return {"rgb": rgb, "sigma": sigma}

    def query_density(self, planes, coordinates) -> torch.Tensor:
        """Raw `sigma` [N, M, 1] alone at world points [N, M, 3]: `query_planes` without the 32 feature outputs of
        the decoder's last layer (the same numbers up to float rounding; for density lattices)."""
        features = sample_mean_from_planes(planes, coordinates, self.rendering_kwargs["box_warp"], self.plane_axes,
                                           self.grid_depth)
        hidden, last = self.decoder.net[:2], self.decoder.net[2]
        n, m, c = features.shape
        x = hidden(features.reshape(n * m, c))
        weight = last.weight[:1].to(x.dtype) * last.weight_gain
        bias = last.bias[:1].to(x.dtype) * last.bias_gain
        return torch.addmm(bias.unsqueeze(0), x, weight.t()).reshape(n, m, 1)

    def sample_mixed(self, coordinates, directions, ws, **synthesis_kwargs):
        """Density and features at arbitrary points for given ws (used for shapes)."""
        return self.query_planes(self.generate_planes(ws, **synthesis_kwargs), coordinates, directions)

    def sample(self, coordinates, directions, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False,
               **synthesis_kwargs):
        """`sample_mixed` for a latent z and conditioning camera c."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.sample_mixed(coordinates, directions, ws, **synthesis_kwargs)

    # ----------------------------------------------------------------------------------------------- images
    def render_planes(self, planes, ws, c, neural_rendering_resolution=None, deterministic=False, generator=None,
                      ws_bcg=None, **synthesis_kwargs) -> dict[str, torch.Tensor]:
        """Volume-render given planes from cameras c [N, 25] and run the super-resolution (see `synthesis`).

        `planes` [1, ...] and `ws` [1, ...] (and `ws_bcg`) serve every camera: the planes are sampled once for all
        views and the background synthesised once, which gives the same images as expanding them to N rows."""
        rk = self.rendering_kwargs
        resolution = neural_rendering_resolution or self.neural_rendering_resolution
        if ws.shape[0] == 1 and c.shape[0] > 1:
            ws_bcg = ws if ws_bcg is None else ws_bcg
            ws = ws.expand(c.shape[0], -1, -1)
        cam2world = c[:, :16].view(-1, 4, 4)
        intrinsics = c[:, 16:25].view(-1, 3, 3)
        ray_origins, ray_directions = sample_rays(cam2world, intrinsics, resolution)
        n = ray_origins.shape[0]

        density_mask = None
        if self.kind == "panohead":
            def density_mask(coordinates):
                return side_crop_mask(coordinates, rk["box_warp"], PANOHEAD_CROP_MARGIN)

        features, depth, weight_total = render_rays(
            self._field(planes), ray_origins, ray_directions, rk["ray_start"], rk["ray_end"], rk["depth_resolution"],
            rk["depth_resolution_importance"], density_mask=density_mask, deterministic=deterministic,
            generator=generator)

        feature_image = features.permute(0, 2, 1).reshape(n, features.shape[-1], resolution, resolution).contiguous()
        depth_image = depth.permute(0, 2, 1).reshape(n, 1, resolution, resolution)
        weight_image = weight_total.permute(0, 2, 1).reshape(n, 1, resolution, resolution)
        if self.decoder.activation == "sigmoid":
            feature_image = feature_image * 2 - 1

        if self.bcg_synthesis is not None:
            num_bcg = self.bcg_synthesis.num_ws
            ws_bcg = (ws if ws_bcg is None else ws_bcg)[:, :num_bcg]
            if ws_bcg.shape[1] < num_bcg:
                ws_bcg = torch.cat([ws_bcg, ws_bcg[:, -1:].repeat(1, num_bcg - ws_bcg.shape[1], 1)], 1)
            background = self.bcg_synthesis(ws_bcg, **synthesis_kwargs)
            if background.shape[0] == 1 and n > 1:  # one latent for every camera: synthesised once
                background = background.expand(n, -1, -1, -1)
            background = torch.nn.functional.interpolate(background, size=feature_image.shape[2:], mode="bilinear",
                                                         align_corners=False, antialias=rk["sr_antialias"])
            feature_image = feature_image + (1 - weight_image) * background

        if self.torgb is not None:
            rgb_image = self.torgb(feature_image, ws[:, -1], fused_modconv=False).to(torch.float32)
        else:
            rgb_image = feature_image[:, :3]
        sr_kwargs = {k: v for k, v in synthesis_kwargs.items() if k != "noise_mode"}
        image = self.superresolution(rgb_image, feature_image, ws, noise_mode=rk["superresolution_noise_mode"],
                                     **sr_kwargs)
        out = {"image": image, "image_raw": rgb_image, "image_depth": depth_image, "feature_image": feature_image}
        if self.kind == "panohead":
            out["image_mask"] = weight_image * (1 + 2 * 0.001) - 0.001
        return out

    def synthesis(self, ws, c, neural_rendering_resolution=None, deterministic=False, generator=None, ws_bcg=None,
                  **synthesis_kwargs) -> dict[str, torch.Tensor]:
        """Render ws [N, num_ws, w_dim] from cameras c [N, 25].

        Returns `image` (super-resolved), `image_raw`, `image_depth` at the neural rendering resolution, the
        32-channel `feature_image` handed to the super-resolution, and for PanoHead `image_mask`.
        `noise_mode` ('random' by default, 'const', 'none') goes to the backbone (and PanoHead's background).
        """
        planes = self.generate_planes(ws, **synthesis_kwargs)
        return self.render_planes(planes, ws, c, neural_rendering_resolution, deterministic=deterministic,
                                  generator=generator, ws_bcg=ws_bcg, **synthesis_kwargs)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, neural_rendering_resolution=None,
                update_emas=False, **synthesis_kwargs):
        """Map z with the conditioning camera c and render from c (PanoHead first shifts c by `apply_delta_c`)."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        if self.t_mapping is not None:
            c, _ = self.apply_delta_c(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                                      update_emas=update_emas)
        return self.synthesis(ws, c, neural_rendering_resolution=neural_rendering_resolution, **synthesis_kwargs)
