"""'Tax-free' pipeline: controls -> 3DMM parameters -> faces per variant, condition render, GLB; copy from photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from core.face3dmm import EXPRESSION_NAMES, FaceParams, load_face_model
from core.mesh import read_glb_asset_extras
from core.nets.stylegan2 import Generator
from core.pipelines.taxfree import (CURATED_EXPRESSIONS, FaceControls, TaxFreePipeline, average_controls,
                                   conditional_truncation, directional_sh, light_from_sh)

PHOTOS = sorted((Path(__file__).parent / "fixtures" / "faces").glob("*.jpg"))


@pytest.fixture(scope="module")
def pipeline() -> TaxFreePipeline:
    face_model = load_face_model()
    size = FaceParams.vector_size(face_model.num_identity)
    mean = FaceParams.neutral(face_model.num_identity).to_vector()
    generators, conditioning = {}, {}
    for index, variant in enumerate(("tax-free", "over-constrained")):
        torch.manual_seed(index)
        generators[variant] = Generator(z_dim=8, c_dim=size, w_dim=8, img_resolution=16, img_channels=3,
                                        mapping_kwargs={"num_layers": 2},
                                        synthesis_kwargs={"channel_base": 128, "channel_max": 8}).eval()
        conditioning[variant] = {"mean": mean.tolist(), "std": [1.0] * size}
    return TaxFreePipeline(generators, conditioning, face_model)


def test_curated_expressions_name_real_blendshapes():
    assert 8 <= len(CURATED_EXPRESSIONS) <= 12
    assert all(name in EXPRESSION_NAMES for names in CURATED_EXPRESSIONS.values() for name in names)


def test_controls_become_parameters(pipeline):
    controls = FaceControls(yaw=20, pitch=-5, roll=3, expression={"jawOpen": 0.8, "eyeBlink_L": 1.5})
    params = pipeline.params_from_controls(controls)
    assert params.rotation.tolist() == pytest.approx([20, -5, 3])
    assert params.expression[EXPRESSION_NAMES.index("jawOpen")] == pytest.approx(0.8)
    assert params.expression[EXPRESSION_NAMES.index("eyeBlink_L")] == 1.0  # clipped to [0, 1]
    assert torch.equal(params.identity, torch.zeros(pipeline.face_model.num_identity))  # the mean identity
    random_a = pipeline.params_from_controls(controls, seed=1, random_identity=True).identity
    random_b = pipeline.params_from_controls(controls, seed=2, random_identity=True).identity
    assert not torch.equal(random_a, random_b)
    with pytest.raises(ValueError, match="unknown expressions"):
        pipeline.params_from_controls(FaceControls(expression={"grin": 1.0}))


def test_unset_controls_take_the_training_average_and_random_identities_its_spread():
    face_model = load_face_model()
    size = FaceParams.vector_size(face_model.num_identity)
    average = FaceParams.neutral(face_model.num_identity)
    average.expression[EXPRESSION_NAMES.index("eyeWide_L")] = 0.55
    average = FaceParams(**{**average.__dict__, "identity": torch.full([face_model.num_identity], 0.3),
                            "sh": directional_sh(average.sh, 40, 10, 0.3)})
    std = torch.ones(size)
    std[:face_model.num_identity] = 0.5
    generator = Generator(z_dim=8, c_dim=size, w_dim=8, img_resolution=16, img_channels=3,
                          mapping_kwargs={"num_layers": 2}, synthesis_kwargs={"channel_base": 128, "channel_max": 8})
    conditioning = {"mean": average.to_vector().tolist(), "std": std.tolist()}
    pipeline = TaxFreePipeline({"m": generator}, {"m": conditioning}, face_model)

    params = pipeline.params_from_controls(FaceControls(yaw=10, expression={"jawOpen": 0.7}))
    assert params.expression[EXPRESSION_NAMES.index("eyeWide_L")] == pytest.approx(0.55)  # unset: the average's
    assert params.expression[EXPRESSION_NAMES.index("jawOpen")] == pytest.approx(0.7)
    assert light_from_sh(params.sh) == pytest.approx((40, 10, 0.3), abs=1e-3)
    assert torch.allclose(params.identity, torch.full([face_model.num_identity], 0.3))
    explicit = pipeline.params_from_controls(FaceControls(expression={"eyeWide_L": 0.0}, light_azimuth=-30))
    assert explicit.expression[EXPRESSION_NAMES.index("eyeWide_L")] == 0
    assert light_from_sh(explicit.sh) == pytest.approx((-30, 10, 0.3), abs=1e-3)
    identities = torch.stack([pipeline.params_from_controls(FaceControls(), seed=s, random_identity=True).identity
                              for s in range(40)])
    assert float(identities.mean()) == pytest.approx(0.3, abs=0.05)
    assert float(identities.std()) == pytest.approx(0.5, abs=0.05)

    defaults = average_controls(conditioning)  # the tab's slider positions: rounded to the sliders' steps
    assert defaults.expression["eyeWide_L"] == 0.55 and defaults.expression["jawOpen"] == 0
    assert (defaults.light_azimuth, defaults.light_elevation, defaults.light_intensity) == (40, 10, 0.3)


def test_conditional_truncation_pulls_toward_the_average_w_of_the_condition():
    torch.manual_seed(0)
    generator = Generator(z_dim=8, c_dim=4, w_dim=8, img_resolution=16, img_channels=3,
                          mapping_kwargs={"num_layers": 2}, synthesis_kwargs={"channel_base": 128, "channel_max": 8})
    z, c = torch.randn([3, 8]), torch.randn([1, 4]).expand(3, -1)
    assert torch.equal(conditional_truncation(generator.mapping, z, c, 1.0), generator.mapping(z, c))
    centre = conditional_truncation(generator.mapping, z, c, 0.0)
    assert torch.allclose(centre[0], centre[1]) and torch.allclose(centre[0], centre[2])  # every z: the average of c
    other = conditional_truncation(generator.mapping, z, torch.randn([1, 4]).expand(3, -1), 0.0)
    assert not torch.allclose(centre, other)  # a different condition has its own centre, unlike the global w_avg
    half = conditional_truncation(generator.mapping, z, c, 0.5)
    assert torch.allclose(half, centre + 0.5 * (generator.mapping(z, c) - centre), atol=1e-6)


def test_light_from_the_right_brightens_the_right_side(pipeline):
    face = pipeline.face_model
    params = FaceParams.neutral(face.num_identity)
    shades = {}
    for azimuth in (-90, 90):
        lit = params.__class__(**{**params.__dict__, "sh": directional_sh(params.sh, azimuth, 0, 1.0)})
        render = face.render(lit, 128)
        gray = render.shaded.mean(axis=2)
        shades[azimuth] = (gray[:, 64:][render.mask[:, 64:] > 0].mean(), gray[:, :64][render.mask[:, :64] > 0].mean())
    right_lit, left_lit = shades[90], shades[-90]
    assert right_lit[0] > right_lit[1] + 20 and left_lit[1] > left_lit[0] + 20


def test_generation_per_variant_is_seeded_and_comes_with_render_and_mesh(pipeline, tmp_path):
    controls = FaceControls(yaw=15, expression={"mouthSmile_L": 1.0, "mouthSmile_R": 1.0})
    result = pipeline(controls, seed=3, mesh_path=tmp_path / "face.glb")
    assert set(result.images) == {"tax-free", "over-constrained"}
    assert all(image.shape == (16, 16, 3) and image.dtype == np.uint8 for image in result.images.values())
    again = pipeline(controls, seed=3, variants=("tax-free",))
    assert np.array_equal(again.images["tax-free"], result.images["tax-free"])
    other = pipeline(controls, seed=4, variants=("tax-free",))
    assert not np.array_equal(other.images["tax-free"], result.images["tax-free"])
    assert result.condition_render.shape == (256, 256, 3) and result.condition_render.max() > 0
    turned = pipeline(FaceControls(yaw=-15, expression=controls.expression), seed=3, variants=("tax-free",))
    assert not np.array_equal(turned.condition_render, result.condition_render)
    mesh = trimesh.load(result.mesh_path, force="mesh")
    assert len(mesh.faces) <= 100_000 and mesh.bounds[1][1] - mesh.bounds[0][1] == pytest.approx(0.25, rel=1e-3)
    extras = read_glb_asset_extras(result.mesh_path)
    assert extras["seed"] == 3 and extras["parameters"]["yaw"] == 15
    with pytest.raises(ValueError, match="unknown variants"):
        pipeline(controls, variants=("baseline",))


def test_copy_from_photo_reproduces_the_fit(pipeline):
    controls, warnings = pipeline.controls_from_photo(PHOTOS[0])
    assert abs(controls.yaw) < 25 and abs(controls.roll) < 15
    assert controls.identity.shape == (pipeline.face_model.num_identity,)
    assert set(controls.expression) <= set(EXPRESSION_NAMES)
    params = pipeline.params_from_controls(controls)
    assert params.rotation.tolist() == pytest.approx([controls.yaw, controls.pitch, controls.roll])
    assert isinstance(warnings, list)
