"""3D head generator: trainer (tiny config: steps, save, resume, export, load) and runtime pipeline."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from core.nets import load_generator
from core.nets.camera import camera_label
from training.resumable import Deadline
from training.train_head3d import (
    PRIOR_FILE,
    Head3DConfig,
    Head3DTrainer,
    HeadTrainingData,
    geometry_prior,
    main,
    prior_loss,
    train,
)

TINY = Head3DConfig(z_dim=16, mapping_layers=1, channel_base=256, channel_max=16, triplane_size=16,
                    neural_rendering_resolution=16, depth_samples=4, importance_samples=4, d_channel_base=256,
                    d_channel_max=16, mbstd_group=2, batch=2, r1_interval=2, ada_interval=1, augment_p=0.5,
                    prior_kimg=1.0)


def _tiny_data(count: int = 3) -> HeadTrainingData:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, [count, 3, 128, 128], dtype=torch.uint8, generator=generator)
    cameras = torch.cat([camera_label(yaw, 0) for yaw in (-20, 0, 20)][:count])
    mirrored = torch.cat([camera_label(-yaw, 0) for yaw in (-20, 0, 20)][:count])
    prior = torch.full([count, 8, 8], float("nan"))
    prior[:, 2:6, 2:6] = torch.rand([count, 4, 4], generator=generator)
    return HeadTrainingData(images, cameras, mirrored, prior)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(2)


def test_prior_loss_is_zero_for_matching_shape_and_shift_invariant():
    cameras = camera_label(0, 0)
    nearness = torch.full([1, 4, 4], float("nan"))
    nearness[0, 1:3, 1:3] = torch.tensor([[0.1, 0.3], [0.2, 0.0]])
    world_per_unit = float(cameras[0, [3, 7, 11]].norm() * 0.5 / cameras[0, 16])
    depth = 2.6 - torch.nan_to_num(nearness)[:, None] * world_per_unit  # nearer = smaller depth, any offset
    opacity = torch.ones_like(depth)
    opacity_loss, depth_loss = prior_loss(depth, opacity, nearness, cameras)
    assert float(opacity_loss) == 0 and float(depth_loss) < 1e-6
    flat_opacity_loss, flat_depth_loss = prior_loss(torch.full_like(depth, 2.6), opacity * 0.5, nearness, cameras)
    assert float(flat_depth_loss) > 0.01 and float(flat_opacity_loss) == pytest.approx(0.25)


def test_geometry_prior_puts_the_nose_in_front():
    from core.face3dmm import load_face_model

    model = load_face_model()
    vector = model.neutral_params().to_vector().numpy()
    prior = geometry_prior(np.stack([vector, np.full_like(vector, np.nan)]), 32)
    assert prior.shape == (2, 32, 32) and prior.dtype == np.float16
    assert np.isnan(prior[1]).all()
    face = prior[0].astype(np.float32)
    assert 0.1 < np.isfinite(face).mean() < 0.8
    centre, cheek = face[16, 16], np.nanmean(face[16, 6:9])  # the nose tip is nearer than the cheek
    assert centre > cheek


def test_train_save_resume_export_load(tmp_path):
    data = _tiny_data()
    trainer = Head3DTrainer(TINY, data)
    before = {k: v.clone() for k, v in trainer.G.state_dict().items()}
    train(trainer, tmp_path / "run", Deadline(600, 1), max_steps=1, log_every=1)  # step 0 has R1 and the prior
    assert trainer.step_count == 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.G.state_dict().items())
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"state.json", "log.jsonl", "samples.png"} <= files
    assert len(files) <= 8
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    for key in ("loss_G", "loss_D", "r1_penalty", "prior_opacity", "prior_depth", "prior_surface", "prior_weight"):
        assert np.isfinite(first[key]), key
    assert first["nonfinite_grads_G"] == first["nonfinite_grads_D"] == 0  # the prior's depth loss sends no NaN

    resumed = Head3DTrainer(TINY, data)
    assert resumed.load(tmp_path / "run") and resumed.step_count == 1
    for key, value in trainer.G_ema.state_dict().items():  # float16 copies: equal up to rounding
        torch.testing.assert_close(resumed.G_ema.state_dict()[key], value, rtol=1e-3, atol=1e-3)

    export = trainer.export(tmp_path / "export", {"step": 1})
    generator = load_generator(export)
    config = json.loads((export / "config.json").read_text())
    assert config["kind"] == "panohead" and config["neural_rendering_resolution"] == 16
    assert generator.neural_rendering_resolution == 16 and generator.grid_depth == TINY.triplane_depth
    with torch.no_grad():
        ws = generator.mapping(torch.randn(1, TINY.z_dim), camera_label(0, 0))
        out = generator.synthesis(ws, camera_label(30, 0), noise_mode="const", deterministic=True)
    assert out["image"].shape == (1, 3, 128, 128) and torch.isfinite(out["image"]).all()
    torch.testing.assert_close(generator.state_dict()["decoder.net.0.weight"],
                               trainer.G_ema.state_dict()["decoder.net.0.weight"], rtol=1e-3, atol=1e-3)


def test_prior_fades_out():
    trainer = Head3DTrainer(dataclasses.replace(TINY, prior_kimg=0.004), None)
    assert trainer.prior_weight == 1.0
    trainer.step_count = 1
    assert trainer.prior_weight == pytest.approx(0.5)
    trainer.step_count = 5
    assert trainer.prior_weight == 0.0


def test_cli_export_only_uses_stored_config(tmp_path):
    trainer = Head3DTrainer(TINY, _tiny_data())
    trainer.save(tmp_path / "run")
    (tmp_path / "run" / PRIOR_FILE).write_bytes(b"kept")
    trainer.save(tmp_path / "run")
    assert (tmp_path / "run" / PRIOR_FILE).read_bytes() == b"kept"
    main(["--run", str(tmp_path / "run"), "--minutes", "0", "--export", str(tmp_path / "export"),
          "--device", "cpu"])
    assert load_generator(tmp_path / "export").backbone.mapping.z_dim == TINY.z_dim


def test_zero_generator_conditioning_makes_the_exported_mapping_ignore_the_camera(tmp_path):
    trainer = Head3DTrainer(dataclasses.replace(TINY, c_gen_conditioning_zero=True), None)
    generator = load_generator(trainer.export(tmp_path / "export"))
    z = torch.randn(2, TINY.z_dim)
    with torch.no_grad():
        frontal = generator.mapping(z, camera_label(0, 0).expand(2, -1))
        turned = generator.mapping(z, camera_label(30, 10).expand(2, -1))
    torch.testing.assert_close(frontal, turned)
    default = load_generator(Head3DTrainer(TINY, None).export(tmp_path / "default"))
    with torch.no_grad():
        assert not torch.allclose(default.mapping(z, camera_label(0, 0).expand(2, -1)),
                                  default.mapping(z, camera_label(30, 10).expand(2, -1)))


@pytest.fixture(scope="module")
def pipeline():
    from core.pipelines.head3d import Head3DPipeline
    from core.runtime import Runtime
    from training.train_head3d import build_head_generator

    torch.manual_seed(0)
    return Head3DPipeline(build_head_generator(TINY), Runtime("cpu"), model_name="tiny-random")


def test_pipeline_orbit_turntable_glb(pipeline, tmp_path):
    from core.mesh import read_glb_asset_extras

    result = pipeline(seed=3, yaws=(-30, 0, 30), pitches=(0, 10), turntable_frames=4, mesh_resolution=32,
                      mesh_level=0.0, face_budget=500, output_dir=tmp_path)
    assert result.orbit.shape == (2, 3, 128, 128, 3) and result.orbit.dtype == np.uint8
    assert len(result.turntable) == 4 and result.turntable[0].shape == (128, 128, 3)
    assert result.turntable_yaws[0] == 0 and max(result.turntable_yaws) == pytest.approx(60)
    assert not np.array_equal(result.orbit[0, 0], result.orbit[0, 2])  # the camera moves
    np.testing.assert_array_equal(result.orbit[0, 1], result.turntable[0])  # yaw 0, pitch 0 in both
    assert result.glb_path is not None and result.glb_path.exists() and 0 < result.mesh_faces <= 500
    extras = read_glb_asset_extras(result.glb_path)
    assert extras["model"] == "tiny-random" and extras["seed"] == 3
    assert {"latent_s", "orbit_s", "turntable_s", "mesh_s", "total_s"} <= set(result.timings)


def test_pipeline_seeds_and_given_ws(pipeline):
    first = pipeline(seed=1, yaws=(0,), pitches=(0,), turntable_frames=1, mesh=False)
    again = pipeline(seed=1, yaws=(0,), pitches=(0,), turntable_frames=1, mesh=False)
    other = pipeline(seed=2, yaws=(0,), pitches=(0,), turntable_frames=1, mesh=False)
    np.testing.assert_array_equal(first.orbit, again.orbit)
    assert not np.array_equal(first.orbit, other.orbit)
    given = pipeline(ws=pipeline.latent(1, 0.7), yaws=(0,), pitches=(0,), turntable_frames=1, mesh=False)
    np.testing.assert_array_equal(first.orbit, given.orbit)
    assert given.provenance.seed is None and first.glb_path is None and "latent_s" not in given.timings


def test_pipeline_reports_missing_surface(pipeline, tmp_path):
    result = pipeline(seed=0, yaws=(0,), pitches=(0,), turntable_frames=1, mesh_resolution=16, mesh_level=1e6,
                      output_dir=tmp_path)
    assert result.glb_path is None and result.mesh_faces is None and result.warnings


def test_pipeline_without_turntable_frames(pipeline):
    result = pipeline(seed=1, yaws=(0,), pitches=(0,), turntable_frames=0, mesh=False)
    assert result.turntable == [] and result.turntable_yaws == () and result.orbit.shape == (1, 1, 128, 128, 3)
    assert pipeline.render_views(pipeline.latent(1), []).shape == (0, 128, 128, 3)


def test_render_views_match_the_previous_per_view_path(pipeline, monkeypatch):
    """One set of planes sampled for every view and the background synthesised once give the previous path's
    images (planes and ws expanded to one row per view) within float32 rounding: uint8 pixels differ by at most 1
    (a value on a rounding boundary), and almost none do."""
    from core.pipelines.head3d import RENDER_BATCH, _to_uint8
    from tests.test_triplane import previous_render

    views = [(yaw, pitch) for yaw in (-40.0, -10.0, 0.0, 25.0) for pitch in (-15.0, 0.0, 15.0)]
    assert len(views) > RENDER_BATCH  # more than one batch
    generator = pipeline.generator
    with torch.inference_mode():
        ws = pipeline.latent(5)
        images = pipeline.render_views(ws, views)
        planes = generator.generate_planes(ws, noise_mode="const")
        cameras = torch.cat([pipeline.camera(yaw, pitch) for yaw, pitch in views])
        before = previous_render(generator, planes, ws, cameras, monkeypatch, deterministic=True,
                                 noise_mode="const")
        mine = generator.render_planes(planes, ws, cameras, deterministic=True, noise_mode="const")
    torch.testing.assert_close(mine["image"], before["image"], rtol=1e-5, atol=2e-5)
    difference = np.abs(images.astype(int) - _to_uint8(before["image"]).astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_style_encoder_is_built_once_and_cached(tmp_path):
    from core.pipelines.head3d import Head3DPipeline
    from core.runtime import Runtime
    from tests.tiny_weights import AGILE_PLAIN_STYLE, AGILE_STYLE
    from tests.tiny_weights import (add_agilegan3d_styles, add_head3d_encoder, add_head3d_generator, add_identity,
                                    load_registry)

    base = add_head3d_generator(tmp_path)
    add_identity(tmp_path)
    add_head3d_encoder(tmp_path)
    add_agilegan3d_styles(tmp_path, base, AGILE_STYLE, AGILE_PLAIN_STYLE)
    runtime = Runtime("cpu", registry=load_registry(tmp_path))
    pipeline = Head3DPipeline.from_pretrained(runtime=runtime)
    encoder = pipeline.style_encoder(AGILE_STYLE)
    keys = set(pipeline.style_generator(AGILE_STYLE).state_dict())
    again = Head3DPipeline.from_pretrained(runtime=runtime)  # the tabs build a pipeline per call
    assert again.style_encoder(AGILE_STYLE) is encoder and encoder is not pipeline.encoder
    assert set(again.style_generator(AGILE_STYLE).state_dict()) == keys  # the cache adds no tensors
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


@pytest.mark.parametrize("density_shift", [0.0, 2000.0])
def test_renders_skip_side_cropped_samples_without_changing_images(density_shift, monkeypatch):
    """The field is not evaluated at the samples PanoHead's side crop forces to -1000, unless their colour counts
    after all (a density of ~1000 beside them, forced here with a shifted density bias): the images stay those of
    the previous path, which evaluated every sample."""
    import core.nets.volume_rendering as volume_rendering
    from core.pipelines.head3d import Head3DPipeline
    from core.runtime import Runtime
    from tests.test_triplane import previous_render
    from training.train_head3d import build_head_generator

    torch.manual_seed(2)
    generator = build_head_generator(TINY)
    with torch.no_grad():
        generator.decoder.net[-1].bias[0] += density_shift
    pipeline = Head3DPipeline(generator, Runtime("cpu"), model_name="tiny-random")
    calls = []
    evaluate_where = volume_rendering.evaluate_where
    monkeypatch.setattr(volume_rendering, "evaluate_where", lambda *args: calls.append(1) or evaluate_where(*args))
    with torch.inference_mode():
        ws = pipeline.latent(0)
        planes = generator.generate_planes(ws, noise_mode="const")
        cameras = torch.cat([pipeline.camera(yaw, 0.0) for yaw in (-60.0, 0.0, 90.0)])
        mine = generator.render_planes(planes, ws, cameras, deterministic=True, noise_mode="const")
        before = previous_render(generator, planes, ws, cameras, monkeypatch, deterministic=True,
                                 noise_mode="const")
    assert len(calls) == (3 if density_shift else 2)  # coarse, fine (and the counted masked samples)
    for key in mine:
        torch.testing.assert_close(mine[key], before[key], rtol=1e-5, atol=2e-5)


def test_the_geometry_prior_alone_shapes_the_density():
    """G trained on the prior losses (and the translation penalty) only: gradients stay finite although some rays
    are side-cropped all along, and the face pixels become more opaque."""
    trainer = Head3DTrainer(TINY, _tiny_data())
    losses = []
    for step in range(40):
        trainer.step_count = step  # a fresh draw of cameras and prior each step
        trainer.opt_G.zero_grad(set_to_none=True)
        cameras, conditioning, prior = trainer._fake_cameras(2)
        out, shifted, delta = trainer._generate(trainer.G, cameras, conditioning)
        opacity_loss, depth_loss = prior_loss(out["image_depth"], out["image_mask"], prior, shifted)
        (opacity_loss + depth_loss + TINY.translation_reg * delta.square().sum(1).mean()).backward()
        assert all(torch.isfinite(p.grad).all() for p in trainer.G.parameters() if p.grad is not None), step
        trainer.opt_G.step()
        losses.append((float(opacity_loss.detach()), float(depth_loss.detach())))
    first, last = np.mean(losses[:5], axis=0), np.mean(losses[-5:], axis=0)
    assert last[0] < first[0] - 0.05, (first, last)  # opacity rises (slowly: Adam moves the decoder ~lr a step)


def test_the_64_px_preview_uses_the_half_size_superresolution_and_other_sizes_are_refused():
    from training.train_head3d import build_head_generator

    config = dataclasses.replace(TINY, resolution=64)
    generator = build_head_generator(config).eval()
    assert generator.superresolution.variant == "SuperresolutionPreview2X"
    assert generator.superresolution.input_resolution == 32
    with torch.no_grad():
        ws = generator.mapping(torch.randn(1, TINY.z_dim), camera_label(0, 0))
        out = generator.synthesis(ws, camera_label(20, 0), noise_mode="const", deterministic=True)
    assert out["image"].shape == (1, 3, 64, 64) and out["image_raw"].shape == (1, 3, 16, 16)
    assert torch.isfinite(out["image"]).all()
    with pytest.raises(ValueError, match="96"):
        build_head_generator(dataclasses.replace(TINY, resolution=96))


@pytest.mark.parametrize("shape, expected", [("dome", True), ("plate", False), ("bowl", False), ("none", False)])
def test_mesh_bulge_metric_accepts_a_dome_toward_the_viewer_only(shape, expected):
    import trimesh

    from training.eval_head3d import mesh_bulges

    class MeshOnly:
        def extract_mesh(self, ws):
            if shape == "none":
                raise ValueError("no surface")
            grid = trimesh.creation.box(extents=(0.4, 0.4, 0.01)).subdivide().subdivide().subdivide()
            vertices = grid.vertices.copy()
            radius2 = vertices[:, 0] ** 2 + vertices[:, 1] ** 2
            vertices[:, 2] += {"dome": -radius2, "plate": 0 * radius2, "bowl": radius2}[shape]
            vertices = np.concatenate([vertices, vertices[:4] + 5])  # a small stray piece far away
            faces = np.concatenate([grid.faces, [[len(grid.vertices), len(grid.vertices) + 1,
                                                   len(grid.vertices) + 2]]])
            return vertices, faces, None

    assert mesh_bulges(MeshOnly(), torch.zeros(1)) is expected


def test_eval_card_section_checks_the_targets_and_small_renders_are_upsampled_for_detection(tmp_path):
    from PIL import Image

    from core.face import prepare_face
    from tabs.common import EXAMPLE_PHOTOS
    from training.eval.cards import write_card_section
    from training.eval_head3d import card_section, detect

    small = np.asarray(Image.fromarray(prepare_face(EXAMPLE_PHOTOS[0], size=128).image).resize((64, 64)))
    faces = detect(small)
    assert faces and faces[0].landmarks[:, 0].max() > 64  # landmarks in the 128-px upsampled frame
    metrics = dict(seeds=8, face_detection_rate=0.975, identity_consistency=0.81, same_person_rate=0.25,
                   nose_in_front_rate=1.0, nose_depth_margin=0.012, fd_id=1.5, test_crops=20,
                   face_detection_by_yaw={"-40": 0.875, "0": 1.0, "40": 0.75}, mesh_bulge_rate=0.9)
    card = tmp_path / "README.md"
    card.write_text("# head\n\n## Evaluation (eval_head3d)\n\nold\n")
    write_card_section(card, card_section(metrics), key="Evaluation (eval_head3d)")
    text = card.read_text()
    assert "old" not in text and text.count("## Evaluation") == 1
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["face detected, yaw -40..40 (5 views per head)"].endswith("✓ |")
    assert rows["same person frontal vs ±30° (dlib distance < 0.6, faces detected)"].endswith("✗ |")
    assert "97.5%" in text and "+0.0120" in text
    mesh_row = rows["mesh's largest piece frontmost across its middle fifth (GLB shape, 128³)"]
    assert mesh_row.endswith("| 90.0% | >= 95 % | ✗ |")
    yaw_row = rows["face detected at yaw -40 / 0 / 40"]
    assert yaw_row.startswith("| face detected at yaw -40 / 0 / 40 | 88% / 100% / 75% |")


def test_surface_loss_is_low_for_a_sharp_surface_at_the_rendered_depth_and_high_for_fog():
    from training.train_head3d import SURFACE_DENSITY, surface_loss

    cameras = torch.cat([camera_label(yaw, 0) for yaw in (0, 25)])
    centres = cameras[:, :16].view(-1, 4, 4)[:, :3, 3]
    depth = torch.full([2, 1, 8, 8], 2.7)
    nearness = torch.full([2, 8, 8], float("nan"))
    nearness[:, 2:6, 2:6] = 0.0

    class Field:
        def __init__(self, raw):
            self.raw = raw

        def query_density(self, planes, points):
            return self.raw((points - centres[:, None]).norm(dim=-1, keepdim=True))

    sharp = surface_loss(Field(lambda distance: torch.where(distance > 2.7, 1e3, -1e3)), None, depth, nearness,
                         cameras, gap=0.05, rays=16)
    fog = surface_loss(Field(lambda distance: torch.full_like(distance, 5.0)), None, depth, nearness, cameras,
                       gap=0.05, rays=16)
    density = torch.nn.functional.softplus(torch.tensor(5.0 - 1)).item()
    assert sharp.item() < 1e-3
    assert fog.item() == pytest.approx(density * 0.05 + (SURFACE_DENSITY - density) / SURFACE_DENSITY, rel=1e-4)
    solid_in_front = surface_loss(Field(lambda distance: torch.full_like(distance, 1e3)), None, depth, nearness,
                                  cameras, gap=0.05, rays=16)
    assert solid_in_front.item() > 10  # density in front of the surface is what costs most


def test_glb_without_output_dir_goes_to_the_pruned_output_root(pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("FACE_SUITE_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setattr(pipeline, "identity_similarity", lambda original, stylized: np.ones(len(original)))
    generated = pipeline(seed=1, yaws=(0,), pitches=(0,), turntable_frames=1, mesh_resolution=32, mesh_level=0.0,
                         face_budget=200)
    stylized = pipeline.stylize(None, seed=1, yaws=(0,), mesh_resolution=32, mesh_level=0.0, face_budget=200)

    for path in (generated.glb_path, stylized.glb_path):
        assert path.exists() and path.parent.parent == tmp_path
