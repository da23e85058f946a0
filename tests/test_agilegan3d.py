"""AgileGAN3D CLI: the three stages end to end in a tiny configuration, resuming a stage, exporting a style delta."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.nets import load_generator
from core.nets.camera import camera_label
from core.nets.style_delta import apply_style_delta, build_style_delta
from training.agilegan3d import (
    AgileConfig,
    LATENTS_FILE,
    MARKER_FILE,
    STAGES,
    STYLED3D_FILE,
    STYLIZER_FILE,
    TINY,
    StylePriorTrainer,
    main,
    project_to_w,
    read_augmented,
    run_prior_stage,
)
from training.resumable import STATE_FILE
from training.train_head3d import Head3DConfig, Head3DTrainer
from training.train_stylegan2 import StyleGAN2Trainer, TrainConfig, TrainingImages

TINY_2D = TrainConfig(resolution=32, z_dim=16, w_dim=16, mapping_layers=1, channel_base=256, channel_max=16,
                      num_fp16_res=0, mbstd_group=2, batch=2)
TINY_3D = Head3DConfig(z_dim=16, mapping_layers=1, channel_base=256, channel_max=16, triplane_size=16,
                       neural_rendering_resolution=16, depth_samples=4, importance_samples=4, d_channel_base=256,
                       d_channel_max=16, mbstd_group=2, batch=2, prior_kimg=0.0)


class StepsDeadline:
    """A deadline that expires after `checks` calls of `expired()`."""

    elapsed_s = 0.0

    def __init__(self, checks: int):
        self.checks = checks

    def expired(self) -> bool:
        self.checks -= 1
        return self.checks < 0


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random base generators exported in the bundled format, and 6 tiny exemplars with a SOURCE.md."""
    root = tmp_path_factory.mktemp("agile")
    torch.manual_seed(0)
    StyleGAN2Trainer(TINY_2D, None).export(root / "base2d")
    Head3DTrainer(TINY_3D, None).export(root / "base3d")
    exemplars = root / "exemplars"
    exemplars.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, [40, 40, 3], dtype=np.uint8)).save(exemplars / f"ex{index}.png")
    (exemplars / "SOURCE.md").write_text("Random noise images made by the test (public domain).")
    return root


def _args(bases, run, *extra):
    return ["--exemplars", str(bases / "exemplars"), "--name", "noise", "--base2d", str(bases / "base2d"),
            "--base3d", str(bases / "base3d"), "--run", str(run), "--tiny", "--aligned", "--reserve-s", "1",
            "--log-every", "1", *extra]


def test_projection_reduces_the_reconstruction_error():
    torch.manual_seed(0)
    G = StyleGAN2Trainer(TINY_2D, None).G_ema
    target = G(torch.randn([2, TINY_2D.z_dim]), torch.zeros([2, 0]), noise_mode="const")
    start = project_to_w(G, target, steps=0, lr=0.05)
    fitted = project_to_w(G, target, steps=30, lr=0.05)
    error = [float((G.synthesis(ws, noise_mode="const") - target).abs().mean()) for ws in (start, fitted)]
    assert error[1] < 0.8 * error[0]


def test_style_prior_keeps_mapping_and_low_resolution_blocks_frozen():
    torch.manual_seed(0)
    base = StyleGAN2Trainer(TINY_2D, None).G_ema
    images = torch.randint(0, 256, [3, 3, 32, 32], dtype=torch.uint8)
    latents = base.mapping.w_avg.reshape(1, 1, -1).repeat(3, base.num_ws, 1)
    trainer = StylePriorTrainer(TINY_2D, TrainingImages(images), base, latents, frozen_resolution=8,
                                consistency_weight=1.0)
    stats = trainer.step()
    assert "consistency" in stats
    after = trainer.G.state_dict()
    for name, value in base.state_dict().items():
        if name.endswith("w_avg"):
            continue
        changed = not torch.equal(value, after[name])
        trainable = name.startswith(("synthesis.b16.", "synthesis.b32.")) and "noise_const" not in name \
            and "resample_filter" not in name
        assert changed == trainable, name


def test_cli_runs_all_stages_resumes_and_exports_a_style_delta(bases, tmp_path):
    run, out = tmp_path / "run", tmp_path / "style"
    assert main(_args(bases, run, "--minutes", "0")) == 0  # starts the run folder only
    marker = json.loads((run / MARKER_FILE).read_text())
    assert marker["completed"] == [] and len(marker["exemplars"]) == 6
    assert "public domain" in marker["exemplar_source"]["origin"]

    # Stage 1 stopped by its deadline after one of its two steps: a checkpoint is left to resume from.
    finished = run_prior_stage(run, AgileConfig(**marker["config"]), bases / "exemplars", True, bases / "base2d",
                               StepsDeadline(1), "cpu", log_every=1)
    assert not finished and (run / STATE_FILE).exists() and (run / LATENTS_FILE).exists()
    assert json.loads((run / STATE_FILE).read_text())["step"] == 1

    assert main(_args(bases, run, "--minutes", "5", "--export", str(out))) == 0
    marker = json.loads((run / MARKER_FILE).read_text())
    assert marker["completed"] == list(STAGES)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2]  # the prior stage continued at step 2, then the 3D stage logged its own steps
    assert (run / STYLIZER_FILE).exists() and (run / STYLED3D_FILE).exists()
    assert not (run / LATENTS_FILE).exists() and not (run / STATE_FILE).exists()
    blobs, yaw, pitch = read_augmented(run)
    assert len(blobs) == TINY.augment_count == len(yaw) == len(pitch)
    assert np.abs(yaw).max() <= TINY.yaw_range

    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "style_delta" and config["base"] == "head3d-faces128" and config["style"] == "noise"
    assert "public domain" in (out / "README.md").read_text()
    base = load_generator(bases / "base3d")
    styled = apply_style_delta(base, build_style_delta(config, load_file(out / "model.safetensors")))
    z = torch.randn([1, TINY_3D.z_dim], generator=torch.Generator().manual_seed(1))
    c = camera_label(0, 0)

    def render(G):
        with torch.no_grad():
            return G.synthesis(G.mapping(z, c), c, noise_mode="const", deterministic=True)["image"]

    assert (render(styled) - render(base)).abs().max() > 1e-3

    assert main(_args(bases, run, "--stage", "encoder")) == 2  # reported TODO


class _CropArchive:
    """Stand-in for a face archive: named random crops."""

    def __init__(self, count: int):
        self.names = [f"set/{index:03d}.jpg" for index in range(count)]
        self._images = np.random.default_rng(1).integers(0, 256, [count, 32, 32, 3], dtype=np.uint8)

    def __len__(self):
        return len(self.names)

    def image(self, index):
        return self._images[index]


def test_exemplar_sets_are_nested_filtered_crops_with_a_source_note(tmp_path):
    from training.agile_exemplars import build_exemplars, pick_samples

    assert list(pick_samples(5, 30, 0)) == list(pick_samples(10, 30, 0)[:5])
    archive = _CropArchive(30)
    out = build_exemplars(archive, "sketch", 5, tmp_path / "ex", seed=0, origin="of a test archive")
    files = sorted(p.name for p in out.glob("*.png"))
    assert len(files) == 5 and files[0] == "00_sketch.png"
    first = np.array(Image.open(out / files[0]))
    assert first.shape == (32, 32, 3)
    assert not np.array_equal(first, archive.image(int(pick_samples(1, 30, 0)[0])))
    note = (out / "SOURCE.md").read_text()
    assert "sketch" in note and "non-commercial" in note
    assert archive.names[int(pick_samples(1, 30, 0)[0])] in note
