"""Volume rendering of EG3D tri-planes and PanoHead tri-grids: rays, plane sampling, importance renderer, ray marcher.

Follows the official `volumetric_rendering` package (ray_sampler.py, renderer.py, ray_marcher.py); the numbered steps
are documented in shared/reference/README.md section 4. Shapes: N batch, M rays (or points) per batch row, D samples
per ray, C feature channels. Depths are distances along unit ray directions from the camera centre.

The official renderer is stochastic (stratified jitter, then uniform draws for importance sampling). Here
`deterministic=True` turns both draws off (coarse depths exactly evenly spaced, importance u = linspace(0, 1));
otherwise the two draws are made from `generator` (the global CPU generator when None) in the official order and
shapes, so seeding `torch.manual_seed(s)` right before rendering reproduces the official seeded renders.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# Per plane, which world axes give the (first, second, third) plane coordinate. The first indexes grid width
# (columns), the second height (rows), the third the tri-grid depth axis (PanoHead only).
# EG3D's `generate_planes` has an axis bug kept by every released checkpoint: planes read (x, y), (x, z), (z, x).
EG3D_PLANE_AXES = ((0, 1, 2), (0, 2, 1), (2, 0, 1))
# PanoHead fixed it: (x, y, z), (x, z, y), (y, z, x).
FIXED_PLANE_AXES = ((0, 1, 2), (0, 2, 1), (1, 2, 0))

# A field maps (coordinates [N, M, 3], directions [N, M, 3]) to (features [N, M, C], raw sigma [N, M, 1]).
Field = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sample_rays(cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions [N, resolution**2, 3] through the pixel centres, row-major (row i, column j).

    `cam2world` is [N, 4, 4] (OpenCV camera axes), `intrinsics` [N, 3, 3] normalised by the image size.
    """
    n = cam2world.shape[0]
    device = cam2world.device
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy, skew = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None], intrinsics[:, 0, 1, None]

    steps = torch.arange(resolution, dtype=torch.float32, device=device) * (1.0 / resolution) + (0.5 / resolution)
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    u = cols.reshape(1, -1).expand(n, -1)
    v = rows.reshape(1, -1).expand(n, -1)

    x_cam = (u - cx + cy * skew / fy - skew * v / fy) / fx
    y_cam = (v - cy) / fy
    ones = torch.ones_like(x_cam)
    points_cam = torch.stack((x_cam, y_cam, ones, ones), dim=-1)
    points_world = torch.bmm(cam2world, points_cam.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]

    centres = cam2world[:, :3, 3]
    directions = F.normalize(points_world - centres[:, None, :], dim=2)
    origins = centres[:, None, :].expand(-1, directions.shape[1], -1)
    return origins, directions


def _grid_sample_planes(
    planes: torch.Tensor,
    coordinates: torch.Tensor,
    box_warp: float,
    plane_axes: tuple[tuple[int, int, int], ...],
    grid_depth: int | None,
) -> tuple[torch.Tensor, int]:
    """grid_sample of every plane at its projection of `coordinates`: ([N*3, C, 1, M] or [N*3, C, 1, 1, M], C)."""
    n, n_planes, channels, height, width = planes.shape
    m = coordinates.shape[1]
    scaled = (2 / box_warp) * coordinates
    projected = torch.stack([scaled[..., list(axes)] for axes in plane_axes], dim=1).reshape(n * n_planes, m, 3)
    if grid_depth is None:
        features = F.grid_sample(
            planes.reshape(n * n_planes, channels, height, width), projected[:, None, :, :2].float(),
            mode="bilinear", padding_mode="zeros", align_corners=False,
        )
        return features, channels
    channels = channels // grid_depth
    features = F.grid_sample(
        planes.reshape(n * n_planes, channels, grid_depth, height, width), projected[:, None, None].float(),
        mode="bilinear", padding_mode="zeros", align_corners=False,
    )
    return features, channels


def sample_from_planes(
    planes: torch.Tensor,
    coordinates: torch.Tensor,
    box_warp: float,
    plane_axes: tuple[tuple[int, int, int], ...] = EG3D_PLANE_AXES,
    grid_depth: int | None = None,
) -> torch.Tensor:
    """Bilinear features [N, 3, M, C] of world points `coordinates` [N, M, 3] from three feature planes.

    `planes` is [N, 3, C, H, W] (tri-plane, 2-D sampling) or, with `grid_depth` D, [N, 3, C*D, H, W] read as
    [C, D, H, W] per plane (tri-grid, 3-D sampling). Points are scaled by 2/box_warp; outside the box reads zeros.
    """
    n, n_planes, m = planes.shape[0], planes.shape[1], coordinates.shape[1]
    features, channels = _grid_sample_planes(planes, coordinates, box_warp, plane_axes, grid_depth)
    return features.reshape(n * n_planes, channels, m).permute(0, 2, 1).reshape(n, n_planes, m, channels)


def sample_mean_from_planes(
    planes: torch.Tensor,
    coordinates: torch.Tensor,
    box_warp: float,
    plane_axes: tuple[tuple[int, int, int], ...] = EG3D_PLANE_AXES,
    grid_depth: int | None = None,
) -> torch.Tensor:
    """`sample_from_planes(...).mean(1)` ([N, M, C], the decoder's input) averaged in grid_sample's own layout:
    the same numbers without laying out the three planes' features per point first (a strided [N, M, C] view)."""
    n, n_planes, m = planes.shape[0], planes.shape[1], coordinates.shape[1]
    features, channels = _grid_sample_planes(planes, coordinates, box_warp, plane_axes, grid_depth)
    return features.view(n, n_planes, channels, m).mean(1).transpose(1, 2)


def side_crop_mask(coordinates: torch.Tensor, box_warp: float, margin: float) -> torch.Tensor:
    """[N, M, 1] True where |x| or |z| exceeds box_warp/2 - margin (PanoHead's `triplane_crop`, bottom open)."""
    return ~(coordinates[..., [0, 2]].abs() <= (box_warp / 2 - margin)).all(dim=-1, keepdim=True)


def ray_march(
    colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite [N, M, D, C] colours, raw densities and depths ([N, M, D, 1]) along each ray.

    Works on consecutive sample pairs (D-1 intervals), density = softplus(raw - 1). Returns the composited
    colour [N, M, C] (not rescaled), depth [N, M, 1] clamped to the global sample range, weights [N, M, D-1, 1].
    """
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    weights = ray_weights(densities, depths)
    rgb = torch.sum(weights * colors_mid, dim=-2)
    return rgb, ray_depth(weights, depths), weights


def ray_weights(densities: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """`ray_march`'s compositing weights [N, M, D-1, 1] of raw densities at sorted depths [N, M, D, 1]."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
    alpha = 1 - torch.exp(-F.softplus(densities_mid - 1) * deltas)
    shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], dim=-2)
    return alpha * torch.cumprod(shifted, dim=-2)[:, :, :-1]


def ray_depth(weights: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """`ray_march`'s depth [N, M, 1]: weighted interval midpoints, clamped to the global sample range.

    A ray with no weight at all (every sample side-cropped) gets the far end, as the official 0/0 -> NaN -> inf
    does, but without dividing by 0: that would send NaN gradients into the whole generator from any loss on depth.
    """
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    total = weights.sum(dim=2)
    empty = total == 0
    depth = torch.sum(weights * depths_mid, dim=-2) / torch.where(empty, torch.ones_like(total), total)
    depth = torch.where(empty, torch.full_like(depth, float("inf")), depth)
    return torch.clamp(torch.nan_to_num(depth, float("inf")), torch.min(depths), torch.max(depths))


def sample_coefficients(weights: torch.Tensor) -> torch.Tensor:
    """[N, M, D, 1] per-sample factors of the composited colour: sum_i w_i (c_i + c_i+1) / 2 = sum_k c_k v_k with
    v_k = (w_k-1 + w_k) / 2 (w_-1 = w_D-1 = 0), so colours never need the interval midpoints or sorting."""
    half = weights / 2
    return F.pad(half, (0, 0, 1, 0)) + F.pad(half, (0, 0, 0, 1))


def stratified_depths(
    n: int, m: int, ray_start: float, ray_end: float, depth_resolution: int, device: torch.device,
    deterministic: bool = False, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[N, M, D, 1] coarse depths: evenly spaced in [ray_start, ray_end], plus U(0, spacing) jitter unless deterministic."""
    depths = torch.linspace(ray_start, ray_end, depth_resolution, device=device).reshape(1, 1, -1, 1).repeat(n, m, 1, 1)
    if not deterministic:
        spacing = (ray_end - ray_start) / (depth_resolution - 1)
        depths = depths + torch.rand(depths.shape, generator=generator, device=device) * spacing
    return depths


def importance_depths(
    depths_coarse: torch.Tensor, weights: torch.Tensor, n_importance: int,
    deterministic: bool = False, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[N, M, n_importance, 1] depths drawn by inverse-CDF sampling of the smoothed coarse weights.

    u is linspace(0, 1) when deterministic, else uniform draws [N*M, n_importance].
    """
    eps = 1e-5
    n, m, samples, _ = depths_coarse.shape
    z = depths_coarse.reshape(n * m, samples)
    w = weights.reshape(n * m, 1, -1).float()
    w = F.avg_pool1d(F.max_pool1d(w, 2, 1, padding=1), 2, 1).squeeze(1) + 0.01

    bins = 0.5 * (z[:, :-1] + z[:, 1:])
    pdf_weights = w[:, 1:-1] + eps
    pdf = pdf_weights / torch.sum(pdf_weights, -1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    n_bins = pdf.shape[1]

    if deterministic:
        u = torch.linspace(0, 1, n_importance, device=z.device).expand(n * m, n_importance)
    else:
        u = torch.rand((n * m, n_importance), generator=generator, device=z.device)
    u = u.contiguous()

    index = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(index - 1, 0)
    above = torch.clamp_max(index, n_bins)
    pairs = torch.stack([below, above], -1).reshape(n * m, 2 * n_importance)
    cdf_pairs = torch.gather(cdf, 1, pairs).reshape(n * m, n_importance, 2)
    bin_pairs = torch.gather(bins, 1, pairs).reshape(n * m, n_importance, 2)

    denom = cdf_pairs[..., 1] - cdf_pairs[..., 0]
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    samples_fine = bin_pairs[..., 0] + (u - cdf_pairs[..., 0]) / denom * (bin_pairs[..., 1] - bin_pairs[..., 0])
    return samples_fine.reshape(n, m, n_importance, 1)


def evaluate_where(
    field: Field, coordinates: torch.Tensor, directions: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`field` at the points that `keep` [N, P] marks alone: (features [N, P, C], raw sigma [N, P, 1]), zero at
    the others (rows with fewer points than the longest are evaluated at some of the others too, then zeroed)."""
    n, p, _ = coordinates.shape
    counts = keep.sum(1)
    longest = int(counts.max()) if p else 0
    if longest == p:  # a row keeps every point: evaluate all
        colors, densities = field(coordinates, directions)
        drop = ~keep[..., None]
        return colors.masked_fill(drop, 0), densities.masked_fill(drop, 0)
    if longest == 0:
        colors, densities = field(coordinates[:, :1], directions[:, :1])
        return colors.new_zeros(n, p, colors.shape[-1]), densities.new_zeros(n, p, 1)
    index = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :longest]  # kept first, in order
    colors, densities = field(coordinates.gather(1, index[..., None].expand(-1, -1, 3)),
                              directions.gather(1, index[..., None].expand(-1, -1, 3)))
    padding = (torch.arange(longest, device=counts.device) >= counts[:, None])[..., None]
    colors, densities = colors.masked_fill(padding, 0), densities.masked_fill(padding, 0)
    channels = colors.shape[-1]
    colors = colors.new_zeros(n, p, channels).scatter_(1, index[..., None].expand(-1, -1, channels), colors)
    return colors, densities.new_zeros(n, p, 1).scatter_(1, index[..., None], densities)


def render_rays(
    field: Field,
    ray_origins: torch.Tensor,
    ray_directions: torch.Tensor,
    ray_start: float,
    ray_end: float,
    depth_resolution: int,
    depth_resolution_importance: int,
    density_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-pass importance rendering of `field` along the rays.

    `density_mask(coordinates) -> [N, M', 1] bool` marks samples whose raw density is forced to -1000 (PanoHead's
    side crop). Returns features [N, M, C] (not rescaled), depth [N, M, 1] and total weight [N, M, 1].

    With importance samples, the field is not evaluated at masked samples: their colour counts only where its
    compositing factor is not 0, which takes a density of about 1000 next to them (far beyond trained fields);
    those few samples are then evaluated after all, so the result is the same.
    """
    n, m, _ = ray_origins.shape

    def points(depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        samples = depths.shape[2]
        coordinates = (ray_origins.unsqueeze(-2) + depths * ray_directions.unsqueeze(-2)).reshape(n, -1, 3)
        return coordinates, ray_directions.unsqueeze(-2).expand(-1, -1, samples, -1).reshape(n, -1, 3)

    def evaluate(depths: torch.Tensor, skip_masked: bool = False):
        samples = depths.shape[2]
        coordinates, directions = points(depths)
        masked = None
        if density_mask is None:
            colors, densities = field(coordinates, directions)
        else:
            masked = density_mask(coordinates)
            if skip_masked:
                colors, densities = evaluate_where(field, coordinates, directions, ~masked[..., 0])
            else:
                colors, densities = field(coordinates, directions)
            densities = densities.masked_fill(masked, -1e3)
            masked = masked.reshape(n, m, samples, 1)
        return colors.reshape(n, m, samples, -1), densities.reshape(n, m, samples, 1), masked

    depths_coarse = stratified_depths(
        n, m, ray_start, ray_end, depth_resolution, ray_origins.device, deterministic, generator
    )
    if depth_resolution_importance <= 0:
        colors_coarse, densities_coarse, _ = evaluate(depths_coarse)
        rgb, depth, weights = ray_march(colors_coarse, densities_coarse, depths_coarse)
        return rgb, depth, weights.sum(2)
    colors_coarse, densities_coarse, masked_coarse = evaluate(depths_coarse, skip_masked=True)
    weights = ray_weights(densities_coarse, depths_coarse)  # the coarse colours are not composited on their own
    depths_fine = importance_depths(depths_coarse, weights, depth_resolution_importance, deterministic, generator)
    colors_fine, densities_fine, masked_fine = evaluate(depths_fine, skip_masked=True)
    samples = torch.cat([depths_coarse, depths_fine], dim=-2)
    densities = torch.cat([densities_coarse, densities_fine], dim=-2)
    _, order = torch.sort(samples, dim=-2)
    depths = torch.gather(samples, -2, order)
    weights = ray_weights(torch.gather(densities, -2, order), depths)
    # `ray_march` of the depth-sorted colours, composited as sum_k c_k v_k in the samples' own order instead (the
    # same sum in another order: equal up to float rounding), without sorting or concatenating the colours
    coefficients = torch.empty_like(depths).scatter_(-2, order, sample_coefficients(weights))
    coarse = depths_coarse.shape[-2]
    rgb = (torch.sum(colors_coarse * coefficients[:, :, :coarse], dim=-2)
           + torch.sum(colors_fine * coefficients[:, :, coarse:], dim=-2))
    if masked_coarse is not None:  # masked samples left out whose colour does count after all
        missing = torch.cat([masked_coarse, masked_fine], dim=-2) & (coefficients != 0)
        if bool(missing.any()):
            colors, _ = evaluate_where(field, *points(samples), missing.reshape(n, -1))
            rgb = rgb + torch.sum(colors.reshape(n, m, samples.shape[2], -1) * (coefficients * missing), dim=-2)
    return rgb, ray_depth(weights, depths), weights.sum(2)
