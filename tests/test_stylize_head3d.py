"""3D head stylization training side: 2D style filters, diffusion teacher, multiview score distillation (tiny)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.identity import IdentityEncoder
from core.nets.style_delta import apply_style_delta, build_style_delta
from training.diffusion_teacher import (
    DiffusionTeacher,
    TeacherConfig,
    TeacherTrainer,
    load_teacher,
    save_teacher,
    teacher_data_from_images,
)
from training.diffusion_teacher import train as train_teacher
from training.resumable import Deadline
from training.style_filters import STYLE_FILTERS, stylize
from training.stylize_head3d import (
    StylizeConfig,
    StylizeTrainer,
    rank_weighed,
    tile_grid,
    trainable_names,
    untile_grid,
)
from training.stylize_head3d import train as train_style
from training.train_head3d import Head3DConfig, build_head_generator

TINY_HEAD = Head3DConfig(z_dim=16, mapping_layers=1, channel_base=256, channel_max=16, triplane_size=16,
                         neural_rendering_resolution=16, depth_samples=4, importance_samples=4)
TINY_TEACHER = TeacherConfig(resolution=16, channels=8, channel_multipliers=(1, 2), batch=4, timesteps=50)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(2)


def _faces(count=3, size=64):
    """Synthetic face-like crops: a skin ellipse with dark eyes and mouth on a coloured background."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    faces = []
    for index in range(count):
        image = np.zeros((size, size, 3), np.float32) + rng.uniform(40, 200, 3)
        head = ((x - 0.5) / 0.3) ** 2 + ((y - 0.5) / 0.4) ** 2 < 1
        image[head] = rng.uniform(150, 230, 3)
        for cx in (0.4, 0.6):
            image[((x - cx) ** 2 + (y - 0.42) ** 2) < 0.002 * (1 + index)] = 20
        image[(abs(x - 0.5) < 0.1) & (abs(y - 0.68) < 0.015)] = 60
        faces.append(np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8))
    return faces


# ---- style filters -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", sorted(STYLE_FILTERS))
def test_filters_keep_shape_are_deterministic_and_change_the_image(style):
    face = _faces(1)[0]
    out = stylize(face, style)
    assert out.shape == face.shape and out.dtype == np.uint8
    assert np.array_equal(out, stylize(face.copy(), style))
    assert np.abs(out.astype(np.float32) - face).mean() > 8


def test_styles_differ_from_each_other_and_are_consistent_across_faces():
    faces = _faces(3)
    outputs = {style: [stylize(face, style).astype(np.float32) for face in faces] for style in STYLE_FILTERS}
    styles = sorted(outputs)
    for i, a in enumerate(styles):
        for b in styles[i + 1:]:
            assert np.abs(outputs[a][0] - outputs[b][0]).mean() > 5, (a, b)
    # a style's colour statistics vary less across faces than across styles
    signature = {s: np.array([o.mean((0, 1)) for o in outputs[s]]) for s in styles}
    within = np.mean([signature[s].std(0).mean() for s in styles])
    between = np.stack([signature[s].mean(0) for s in styles]).std(0).mean()
    assert within < between
    assert np.ptp(outputs["sketch"][0], axis=2).max() <= 30  # pencil: nearly grey


def test_unknown_style_is_rejected():
    with pytest.raises(ValueError):
        stylize(_faces(1)[0], "watercolour")


# ---- diffusion teacher ---------------------------------------------------------------------------------------

def test_teacher_trains_saves_resumes_and_samples(tmp_path):
    data = teacher_data_from_images(_faces(3), "toon", TINY_TEACHER.resolution)
    assert data.photos.shape == data.styled.shape == (3, 3, 16, 16) and data.edges.shape == (3, 1, 16, 16)
    trainer = TeacherTrainer(TINY_TEACHER, data)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    train_teacher(trainer, tmp_path / "run", Deadline(600, 1), max_steps=2, log_every=1)
    assert trainer.step_count == 2
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2

    resumed = TeacherTrainer(TINY_TEACHER, data)
    assert resumed.load(tmp_path / "run") and resumed.step_count == 2
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])
    train_teacher(resumed, tmp_path / "run", Deadline(600, 1), max_steps=1, log_every=1)
    assert resumed.step_count == 3

    save_teacher(resumed.ema, tmp_path / "teacher")
    teacher = load_teacher(tmp_path / "teacher")
    x = torch.randn(2, 3, 32, 32)  # a 2x2 grid of 16-px tiles: the UNet is fully convolutional
    eps = teacher.score(x, torch.tensor([3, 40]), -torch.ones(2, 1, 32, 32))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    samples = teacher.sample((2, 3, 16, 16), steps=3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 16, 16) and torch.isfinite(samples).all()


def test_teacher_domains_and_conditioning_change_the_score():
    teacher = DiffusionTeacher(TINY_TEACHER)
    torch.manual_seed(0)
    for parameter in teacher.parameters():  # zero-initialised outputs would hide the inputs' effect
        parameter.data.normal_(0, 0.3)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    edges = torch.where(torch.rand(1, 1, 16, 16) > 0.8, 1.0, -1.0)
    assert not torch.allclose(teacher.score(x, t, edges, 0), teacher.score(x, t, edges, 1))
    assert not torch.allclose(teacher.score(x, t, edges, 1), teacher.score(x, t, None, 1))


# ---- score distillation --------------------------------------------------------------------------------------

def test_grid_tiling_round_trips_and_rank_weighing_keeps_statistics():
    views = torch.randn(8, 3, 4, 4)
    grids = tile_grid(views)
    assert grids.shape == (2, 3, 8, 8)
    assert torch.equal(grids[0, :, :4, 4:], views[1]) and torch.equal(grids[1, :, 4:, 4:], views[7])
    assert torch.equal(untile_grid(grids), views)
    score = torch.randn(2, 3, 8, 8) * torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    weighed = rank_weighed(score)
    assert weighed.shape == score.shape and not torch.allclose(weighed, score)
    assert torch.allclose(weighed.mean((2, 3)), score.mean((2, 3)), atol=1e-5)
    assert torch.allclose(weighed.std((2, 3)), score.std((2, 3)), atol=1e-4)


def _tiny_identity():
    return IdentityEncoder({"stem_channels": 4, "stages": [[4, 1, False], [8, 1, True]], "embedding_dim": 8,
                            "input_size": 40})


def _tiny_setup(objective):
    torch.manual_seed(0)
    base = build_head_generator(TINY_HEAD).eval().requires_grad_(False)
    teacher = DiffusionTeacher(TINY_TEACHER)
    for parameter in teacher.parameters():  # a random teacher with non-zero outputs
        parameter.data.normal_(0, 0.2)
    config = StylizeConfig(objective=objective, lr=1e-2, delta_rank=2, yaw_range=40, identity_max_yaw=60)
    return base, teacher, config


def test_sds_step_trains_only_synthesis_and_sr():
    base, teacher, config = _tiny_setup("sds")
    trainer = StylizeTrainer(config, base, teacher, None)
    stats = trainer.step()
    assert stats["gradient_abs"] > 0 and "identity_cosine" not in stats
    base_state, tuned_state = base.state_dict(), trainer.tuned.state_dict()
    changed = {k for k in base_state if not torch.equal(base_state[k], tuned_state[k])}
    assert changed and changed <= set(trainable_names(trainer.tuned))


def test_ld_distillation_trains_resumes_and_exports_a_delta(tmp_path):
    objective = "ld"
    base, teacher, config = _tiny_setup(objective)
    trainer = StylizeTrainer(config, base, teacher, _tiny_identity())
    names = set(trainable_names(trainer.tuned))
    assert names and all(n.startswith(("backbone.synthesis.", "superresolution.")) for n in names)
    assert not any(n.endswith(".bias") for n in names)

    train_style(trainer, tmp_path / "run", Deadline(600, 1), max_steps=2, log_every=1)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "identity_cosine" in log[-1] and log[-1]["gradient_abs"] > 0
    assert (tmp_path / "run" / "samples.png").exists()
    base_state, tuned_state = base.state_dict(), trainer.tuned.state_dict()
    changed = {k for k in base_state if not torch.equal(base_state[k], tuned_state[k])}
    assert changed and changed <= names

    resumed = StylizeTrainer(config, base, teacher, _tiny_identity())
    assert resumed.load(tmp_path / "run") and resumed.step_count == 2
    assert all(torch.equal(v, resumed.tuned.state_dict()[k]) for k, v in tuned_state.items())
    train_style(resumed, tmp_path / "run", Deadline(600, 1), max_steps=1, log_every=1)
    assert resumed.step_count == 3

    metrics = resumed.evaluate(seeds=range(2), yaws=(0,))
    assert set(metrics) == {"heads", "style_strength", "identity_base_vs_stylized", "identity_between_people_stylized",
                            "identity_between_people_base"}
    assert metrics["style_strength"] > 0
    export = resumed.export(tmp_path / "style", metrics=metrics)
    config_json = json.loads((export / "config.json").read_text())
    assert config_json["kind"] == "style_delta" and config_json["base"] == "head3d-faces128"
    assert config_json["objective"] == objective and (export / "README.md").exists()
    delta = build_style_delta(config_json, load_file(str(export / "model.safetensors")))
    styled = apply_style_delta(base, delta)
    styled_state = styled.state_dict()
    moved = {k for k in base_state if not torch.equal(base_state[k], styled_state[k])}
    assert moved and moved <= names


def test_objectives_give_different_gradients():
    from training.stylize_head3d import distillation_gradient

    teacher = DiffusionTeacher(TINY_TEACHER)
    for parameter in teacher.parameters():
        parameter.data.normal_(0, 0.2)
    grid, noise, t = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 3, 32, 32), torch.tensor([5])
    ld = distillation_gradient(teacher, grid, None, t, noise, "ld", 7.5)
    sds = distillation_gradient(teacher, grid, None, t, noise, "sds", 7.5)
    assert ld.shape == sds.shape == grid.shape and not torch.allclose(ld, sds)
    with pytest.raises(ValueError):
        distillation_gradient(teacher, grid, None, t, noise, "vsd", 7.5)


def test_cli_runs_over_a_named_base_and_resumes(tmp_path):
    """The command line: a run over a base registered under another name than the default exports a delta that
    names that base, with the style strength in its metrics (no identity network: strength only)."""
    from tests.tiny_weights import TINY_HEAD3D
    from training.stylize_head3d import main as stylize_main
    from training.train_head3d import Head3DTrainer

    Head3DTrainer(TINY_HEAD3D, None).export(tmp_path / "base", None)
    teacher = DiffusionTeacher(TINY_TEACHER)
    for parameter in teacher.parameters():
        parameter.data.normal_(0, 0.2)
    save_teacher(teacher, tmp_path / "teacher")
    arguments = ["--run", str(tmp_path / "run"), "--identity", "", "--steps", "1", "--minutes", "1", "--reserve-s", "0",
                 "--device", "cpu"]
    stylize_main([*arguments, "--base", str(tmp_path / "base"), "--base-name", "head3d-faces64",
                  "--teacher", str(tmp_path / "teacher"), "--lr", "1e-2"])
    # resumed from the run's stored config:
    stylize_main([*arguments, "--export", str(tmp_path / "style"), "--eval-seeds", "2"])
    config_json = json.loads((tmp_path / "style" / "config.json").read_text())
    assert config_json["base"] == "head3d-faces64" and config_json["steps"] == 2
    assert set(config_json["metrics"]) == {"heads", "style_strength"} and config_json["metrics"]["heads"] == 2
    assert config_json["metrics"]["style_strength"] > 0
