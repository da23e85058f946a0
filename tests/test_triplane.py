"""TriPlaneGenerator (EG3D + PanoHead) against the official manifests and reference vectors in shared/reference."""

import json
from pathlib import Path

import pytest
import torch

from core.nets.superresolution import SUPERRESOLUTION_SPECS, build_superresolution
from core.nets.triplane import TriPlaneGenerator

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
VECTOR_SETS = ["eg3d_small_seed0", "panohead_small_seed0"]
MANIFESTS = ["manifest_eg3d_ffhq512-128.json", "manifest_panohead_released.json"]
RENDER_KEYS = ["image_raw", "image_depth", "image_mask", "image"]


def _close(mine, ref):
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    return path


def _build(config: dict) -> TriPlaneGenerator:
    generator = TriPlaneGenerator(**{**config["init_kwargs"], "rendering_kwargs": config["rendering_kwargs"]})
    generator.neural_rendering_resolution = config["neural_rendering_resolution"]
    return generator


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_state_dict_matches_manifest(manifest):
    config = json.loads(_require(REFERENCE / manifest).read_text())
    with torch.device("meta"):
        generator = _build(config)
    assert [(k, list(v.shape)) for k, v in generator.state_dict().items()] == [
        (name, shape) for name, shape, _, _ in config["state_dict"]
    ]
    buffers = {name for name, _ in generator.named_buffers()}
    assert buffers == {name for name, _, _, is_buffer in config["state_dict"] if is_buffer}
    assert generator.backbone.num_ws == config["derived"]["num_ws"]
    assert generator.superresolution.input_resolution == config["derived"]["sr_input_resolution"]
    if config["derived"].get("bcg_num_ws"):
        assert generator.bcg_synthesis.num_ws == config["derived"]["bcg_num_ws"]
    assert generator.kind == ("panohead" if "panohead" in manifest else "eg3d")


@pytest.fixture(scope="module", params=VECTOR_SETS)
def reference(request):
    """(generator with the reference weights, io tensors, config) for one vector set."""
    from safetensors.torch import load_file

    name = request.param
    config = json.loads(_require(REFERENCE / f"{name}.json").read_text())
    torch.set_num_threads(2)
    generator = _build(config)
    weights = load_file(str(_require(REFERENCE / config["state_dict_file"])))
    generator.load_state_dict({k: v.clone() for k, v in weights.items()}, strict=True)
    generator.eval()
    io = {k: v.clone() for k, v in load_file(str(_require(REFERENCE / config["io_file"]))).items()}
    with torch.no_grad():
        planes = generator.generate_planes(io["ws_psi0.7"], noise_mode="const")
    return generator, io, config, planes


def _ws(generator, io, config):
    spec = config["call"]["mapping"]["ws_psi0.7"]
    return generator.mapping(io["z"], io["c_cond"], **spec)


@torch.no_grad()
def test_mapping(reference):
    generator, io, config, _ = reference
    _close(generator.mapping(io["z"], io["c_cond"]), io["ws_psi1"])
    _close(_ws(generator, io, config), io["ws_psi0.7"])


@torch.no_grad()
def test_planes(reference):
    _, io, config, planes = reference
    step = config["call"]["planes_sub_step"]
    backbone_output = planes.reshape(planes.shape[0], -1, *planes.shape[-2:])
    _close(backbone_output[:, :, ::step, ::step], io["det.planes_sub"])


@torch.no_grad()
@pytest.mark.parametrize("points", ["grid16", "probe"])
def test_sample_mixed(reference, points):
    generator, io, _, planes = reference
    coordinates = io[f"{points}_points"][None].expand(2, -1, -1)
    directions = torch.zeros_like(coordinates)
    directions[..., 2] = -1
    if points == "grid16":
        out = generator.sample_mixed(coordinates, directions, io["ws_psi0.7"], noise_mode="const")
    else:
        out = generator.query_planes(planes, coordinates, directions)
    _close(out["sigma"], io[f"{points}_sigma"])
    if points == "probe":
        _close(out["rgb"], io["probe_rgb"])


@torch.no_grad()
def test_deterministic_render(reference):
    generator, io, _, _ = reference
    torch.manual_seed(7)
    expected_draw = torch.rand(4)
    torch.manual_seed(7)
    out = generator.synthesis(io["ws_psi0.7"], io["c_render"], noise_mode="const", deterministic=True)
    assert torch.equal(torch.rand(4), expected_draw)  # no RNG draw at all
    for key in RENDER_KEYS:
        if f"det.{key}" in io:
            _close(out[key], io[f"det.{key}"])
    _close(out["feature_image"], io["det.sr_input_feature_image"])
    assert ("image_mask" in out) == (generator.kind == "panohead")


@torch.no_grad()
def test_seeded_render(reference):
    generator, io, config, planes = reference
    seed = config["call"]["seeded_render_seed"]
    ws, c = io["ws_psi0.7"], io["c_render"]
    torch.manual_seed(seed)
    out = generator.render_planes(planes, ws, c, noise_mode="const")
    for key in RENDER_KEYS:
        if f"seeded.{key}" in io:
            _close(out[key], io[f"seeded.{key}"])
    # The same two draws from an explicit generator give the same render; another seed does not.
    again = generator.render_planes(planes, ws, c, noise_mode="const", generator=torch.Generator().manual_seed(seed))
    _close(again["image_depth"], io["seeded.image_depth"])
    other = generator.render_planes(planes, ws, c, noise_mode="const",
                                    generator=torch.Generator().manual_seed(seed + 1))
    assert not torch.allclose(other["image_depth"], io["seeded.image_depth"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_t_mapping_and_forward(reference):
    generator, io, config, _ = reference
    if generator.kind != "panohead":
        with pytest.raises(RuntimeError):
            generator.apply_delta_c(io["z"], io["c_cond"])
        return
    c_shifted, delta_c = generator.apply_delta_c(io["z"], io["c_cond"])
    _close(delta_c, io["t_mapping_delta_c"])
    _close(c_shifted, io["t_mapping_c_cond_shifted"])
    # forward(z, c) renders from the shifted camera, synthesis(ws, c) from c itself.
    spec = config["call"]["mapping"]["ws_psi0.7"]
    out = generator(io["z"], io["c_cond"], **spec, noise_mode="const", deterministic=True)
    direct = generator.synthesis(_ws(generator, io, config), io["t_mapping_c_cond_shifted"], noise_mode="const",
                                 deterministic=True)
    _close(out["image_raw"], direct["image_raw"])


def test_kind_selection():
    config = json.loads(_require(REFERENCE / "eg3d_small_seed0.json").read_text())
    with torch.device("meta"):
        assert _build(config).kind == "eg3d"
        with pytest.raises(ValueError):
            TriPlaneGenerator(**config["init_kwargs"], kind="stylegan")


@pytest.mark.parametrize("variant", sorted(SUPERRESOLUTION_SPECS))
def test_superresolution_variants(variant):
    spec = SUPERRESOLUTION_SPECS[variant]
    with torch.device("meta"):
        module = build_superresolution(f"training.superresolution.{variant}", channels=32,
                                       img_resolution=spec.img_resolution, sr_num_fp16_res=4, sr_antialias=True)
    keys = module.state_dict().keys()
    assert ("resample_filter" in keys) == spec.has_resample_filter
    assert len(keys) == (39 if spec.has_resample_filter else 38)
    assert module.state_dict()["block0.conv0.weight"].shape == (spec.block0_channels, 32, 3, 3)
    assert module.state_dict()["block1.torgb.weight"].shape == (3, spec.block1_channels, 1, 1)
    with pytest.raises(ValueError):
        build_superresolution(variant, channels=32, img_resolution=spec.img_resolution * 2, sr_num_fp16_res=0,
                              sr_antialias=True)


@torch.no_grad()
def test_superresolution_4x_forward():
    torch.manual_seed(0)
    module = build_superresolution("SuperresolutionHybrid4X", channels=32, img_resolution=256, sr_num_fp16_res=4,
                                   sr_antialias=True).eval()
    ws = torch.randn(1, 5, 512)
    out = module(torch.randn(1, 3, 64, 64), torch.randn(1, 32, 64, 64), ws, noise_mode="none")
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()
    # Only the last w matters.
    ws_changed = ws.clone()
    ws_changed[:, :-1] += 1
    torch.manual_seed(1)
    rgb, x = torch.randn(1, 3, 128, 128), torch.randn(1, 32, 128, 128)
    torch.testing.assert_close(module(rgb, x, ws, noise_mode="none"), module(rgb, x, ws_changed, noise_mode="none"))


# ---- the fast multi-view path against the previous one ---------------------------------------------------------


def _previous_render_rays(field, ray_origins, ray_directions, ray_start, ray_end, depth_resolution,
                          depth_resolution_importance, density_mask=None, deterministic=False, generator=None):
    """`render_rays` as it was: the coarse colours composited for nothing, all colours concatenated and sorted."""
    from core.nets.volume_rendering import importance_depths, ray_march, stratified_depths

    n, m, _ = ray_origins.shape

    def evaluate(depths):
        samples = depths.shape[2]
        coordinates = (ray_origins.unsqueeze(-2) + depths * ray_directions.unsqueeze(-2)).reshape(n, -1, 3)
        directions = ray_directions.unsqueeze(-2).expand(-1, -1, samples, -1).reshape(n, -1, 3)
        colors, densities = field(coordinates, directions)
        if density_mask is not None:
            densities = densities.masked_fill(density_mask(coordinates), -1e3)
        return colors.reshape(n, m, samples, -1), densities.reshape(n, m, samples, 1)

    depths_coarse = stratified_depths(n, m, ray_start, ray_end, depth_resolution, ray_origins.device, deterministic,
                                      generator)
    colors_coarse, densities_coarse = evaluate(depths_coarse)
    _, _, weights = ray_march(colors_coarse, densities_coarse, depths_coarse)
    depths_fine = importance_depths(depths_coarse, weights, depth_resolution_importance, deterministic, generator)
    colors_fine, densities_fine = evaluate(depths_fine)
    depths = torch.cat([depths_coarse, depths_fine], dim=-2)
    colors = torch.cat([colors_coarse, colors_fine], dim=-2)
    densities = torch.cat([densities_coarse, densities_fine], dim=-2)
    _, order = torch.sort(depths, dim=-2)
    depths = torch.gather(depths, -2, order)
    colors = torch.gather(colors, -2, order.expand(-1, -1, -1, colors.shape[-1]))
    densities = torch.gather(densities, -2, order)
    rgb, depth, weights = ray_march(colors, densities, depths)
    return rgb, depth, weights.sum(2)


def previous_render(net, planes, ws, cameras, monkeypatch, **kwargs):
    """The previous multi-view render: planes and ws expanded to one row per camera, the plane features laid out
    per point before the decoder, the previous `render_rays`."""
    import core.nets.triplane as triplane
    from core.nets.volume_rendering import sample_from_planes

    def field(planes):
        def evaluate(coordinates, directions):
            return net.decoder(sample_from_planes(planes, coordinates, net.rendering_kwargs["box_warp"],
                                                  net.plane_axes, net.grid_depth))
        return evaluate

    count = len(cameras)
    with monkeypatch.context() as patch:
        patch.setattr(triplane, "render_rays", _previous_render_rays)
        patch.setattr(net, "_field", field)
        return net.render_planes(planes.expand(count, *planes.shape[1:]), ws.expand(count, -1, -1), cameras,
                                       **kwargs)


@torch.no_grad()
def test_multi_view_render_matches_previous_path(reference, monkeypatch):
    """Planes and ws of batch 1 for N cameras (sampled per view from the one set of planes, background once) give
    the previous path's images within float32 rounding (sums in another order), on the official test generators;
    seeded renders draw the same numbers."""
    from core.nets.camera import camera_label

    generator, io, _, planes = reference
    ws = io["ws_psi0.7"][:1]
    cameras = torch.cat([camera_label(yaw, pitch) for yaw, pitch in ((-30, 0), (0, 10), (25, -5))])
    for kwargs in ({"deterministic": True}, {"generator": torch.Generator().manual_seed(3)}):
        mine = generator.render_planes(planes[:1], ws, cameras, noise_mode="const", **dict(kwargs))
        if "generator" in kwargs:
            kwargs = {"generator": torch.Generator().manual_seed(3)}
        before = previous_render(generator, planes[:1], ws, cameras, monkeypatch, noise_mode="const", **kwargs)
        assert mine.keys() == before.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], before[key], rtol=1e-5, atol=2e-5)


@torch.no_grad()
def test_query_density_is_query_planes_sigma(reference):
    generator, io, _, planes = reference
    points = io["probe_points"][None]
    torch.testing.assert_close(generator.query_density(planes[:1], points),
                               generator.query_planes(planes[:1], points, torch.zeros_like(points))["sigma"],
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("pattern", ["ragged", "one_row_full", "none"])
def test_evaluate_where_gives_the_field_at_kept_points_and_zero_elsewhere(pattern):
    from core.nets.volume_rendering import evaluate_where

    torch.manual_seed(0)
    weight = torch.randn(3, 5)

    def field(coordinates, directions):
        x = coordinates @ weight
        return x[..., 1:], x[..., :1]

    coordinates = torch.randn(3, 40, 3)
    keep = torch.rand(3, 40) > 0.5
    if pattern == "one_row_full":
        keep[1] = True
    elif pattern == "none":
        keep[:] = False
    colors, densities = evaluate_where(field, coordinates, coordinates, keep)
    expected_colors, expected_densities = field(coordinates, coordinates)
    torch.testing.assert_close(colors, expected_colors * keep[..., None], rtol=0, atol=0)
    torch.testing.assert_close(densities, expected_densities * keep[..., None], rtol=0, atol=0)


def test_depth_of_an_empty_ray_is_the_far_end_with_finite_gradients():
    from core.nets.volume_rendering import ray_depth, ray_weights

    depths = torch.linspace(2.25, 3.3, 6).reshape(1, 1, 6, 1).repeat(1, 2, 1, 1)
    densities = torch.randn(1, 2, 6, 1)
    densities[:, 1] = -1e3  # the second ray is side-cropped all along: no weight
    densities.requires_grad_(True)
    depth = ray_depth(ray_weights(densities, depths), depths)
    assert float(depth[0, 1].detach()) == pytest.approx(3.3)  # the official 0/0 -> inf -> clamped to the far end
    weights = ray_weights(densities, depths)[0, 0]
    midpoints = (depths[0, 0, :-1] + depths[0, 0, 1:]) / 2
    expected = (weights * midpoints).sum() / weights.sum()
    assert float(depth[0, 0].detach()) == pytest.approx(float(expected.detach()))
    depth.sum().backward()
    assert torch.isfinite(densities.grad).all()
    assert densities.grad[0, 0].abs().sum() > 0 and densities.grad[0, 1].abs().sum() == 0
