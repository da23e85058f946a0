"""AgileGAN3D CLI: the four stages end to end in a tiny configuration, resuming each stage, exporting a style with its
encoder delta and evaluation, the exemplar-count study, and the fresh-encoder fallback."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.beauty import load_identity_encoder
from core.nets import load_generator
from core.nets.camera import camera_label
from core.nets.style_delta import apply_style_delta, build_style_delta
from tests.test_head3d_encoder import TINY_ENCODER
from training.agilegan3d import (
    AUGMENTED_FILE,
    LATENTS_FILE,
    MARKER_FILE,
    PHOTOS_FILE,
    STAGES,
    STYLED3D_FILE,
    STYLED_ENCODER_FILE,
    STYLIZER_FILE,
    TINY,
    AgileConfig,
    StylePriorTrainer,
    _save_weights,
    export_style,
    load_base_encoder,
    main,
    project_to_w,
    read_photos,
    run_encoder_stage,
    run_prior_stage,
)
from training.data.archive import pack_bytes, write_archive
from training.resumable import STATE_FILE
from training.train_head3d import Head3DConfig, Head3DTrainer
from training.train_head3d_encoder import Head3DEncoderConfig, Head3DEncoderTrainer
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


def _camera_archive(path, count: int = 9):
    """A 32-px face archive of random crops with camera labels: 6 train, 3 test."""
    rng = np.random.default_rng(2)
    blobs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, [32, 32, 3], dtype=np.uint8)).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    image_data, image_offsets = pack_bytes(blobs)
    cameras = torch.cat([camera_label(float(yaw), 0.0) for yaw in np.linspace(-30, 30, count)]).numpy()
    split = np.array([0] * 6 + [1] * (count - 6), np.uint8)
    metadata = {"size": 32, "names": [f"s{i}" for i in range(count)], "splits": ["train", "test"],
                "class_names": ["background"]}
    return write_archive(path, {"image_data": image_data, "image_offsets": image_offsets, "split": split,
                                "camera": cameras.astype(np.float32)}, metadata)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random base generators and base 3D encoder exported in the bundled format, 6 tiny exemplars with a
    SOURCE.md, and a tiny archive with camera labels."""
    root = tmp_path_factory.mktemp("agile")
    torch.manual_seed(0)
    StyleGAN2Trainer(TINY_2D, None).export(root / "base2d")
    Head3DTrainer(TINY_3D, None).export(root / "base3d")
    Head3DEncoderTrainer(Head3DEncoderConfig(encoder_overrides=TINY_ENCODER), load_generator(root / "base3d"),
                         load_identity_encoder("identity-resnet")).export(root / "encoder")
    exemplars = root / "exemplars"
    exemplars.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, [40, 40, 3], dtype=np.uint8)).save(exemplars / f"ex{index}.png")
    (exemplars / "SOURCE.md").write_text("Random noise images made by the test (public domain).")
    _camera_archive(root / "faces32.npz")
    return root


def _args(bases, run, *extra):
    return ["--exemplars", str(bases / "exemplars"), "--name", "noise", "--base2d", str(bases / "base2d"),
            "--base3d", str(bases / "base3d"), "--base-encoder", str(bases / "encoder"), "--data",
            str(bases / "faces32.npz"), "--run", str(run), "--recipe", "tiny", "--aligned", "--reserve-s", "1",
            "--log-every", "1", *extra]


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


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


def test_cli_runs_every_stage_resumes_and_exports_a_style_with_its_encoder(bases, tmp_path):
    run, out = tmp_path / "run", tmp_path / "style"
    assert main(_args(bases, run, "--minutes", "0")) == 0  # starts the run folder only
    marker = json.loads((run / MARKER_FILE).read_text())
    assert marker["completed"] == [] and len(marker["exemplars"]) == 6
    assert "public domain" in marker["exemplar_source"]["origin"]
    assert marker["base_encoder"] == {"name": "head3d-encoder-faces128", "dir": str(bases / "encoder")}
    images, cameras, mirrored = read_photos(run / PHOTOS_FILE, "train", 128)
    assert images.shape == (TINY.encoder_photos, 3, 128, 128) and cameras.shape == mirrored.shape == (4, 25)
    assert read_photos(run / PHOTOS_FILE, "test", 128)[0].shape[0] == TINY.eval_photos
    with pytest.raises(SystemExit):
        main(_args(bases, run, "--stage", "encoder"))  # needs the earlier stages

    # Stage 1 stopped by its deadline after one of its two steps: a checkpoint is left to resume from.
    finished = run_prior_stage(run, AgileConfig(**marker["config"]), bases / "exemplars", True, bases / "base2d",
                               StepsDeadline(1), "cpu", log_every=1)
    assert not finished and (run / STATE_FILE).exists() and (run / LATENTS_FILE).exists()
    assert json.loads((run / STATE_FILE).read_text())["step"] == 1

    for stage in STAGES[:2]:  # every call resumes the run folder and continues with the next stage
        assert main(_args(bases, run, "--minutes", "5", "--stage", stage)) == 0
        assert json.loads((run / MARKER_FILE).read_text())["completed"] == list(STAGES[:STAGES.index(stage) + 1])
    assert main(_args(bases, run, "--minutes", "5", "--stop-after", "transfer")) == 0
    assert json.loads((run / MARKER_FILE).read_text())["completed"] == list(STAGES[:3])
    assert _steps(run)[:2] == [1, 2]  # the prior stage continued at step 2
    assert (run / STYLED3D_FILE).exists() and not (run / STATE_FILE).exists()
    assert not any((run / name).exists() for name in (LATENTS_FILE, STYLIZER_FILE, AUGMENTED_FILE))

    # Stage 4 stopped after one of its two steps, then resumed by the exporting call.
    marker = json.loads((run / MARKER_FILE).read_text())
    assert not run_encoder_stage(run, AgileConfig(**marker["config"]), marker, StepsDeadline(1), "cpu", 1)
    assert json.loads((run / STATE_FILE).read_text())["step"] == 1
    assert main(_args(bases, run, "--minutes", "5", "--export", str(out))) == 0
    assert json.loads((run / MARKER_FILE).read_text())["completed"] == list(STAGES)
    assert _steps(run)[-2:] == [1, 2] and (run / STYLED_ENCODER_FILE).exists()
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(record[key]) for key in ("identity", "multiview", "pixel", "latent", "delta"))

    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "style_delta" and config["base"] == "head3d-faces128" and config["style"] == "noise"
    part = config["parts"]["encoder"]
    assert part["base"] == "head3d-encoder-faces128" and part["file"] == "encoder.safetensors"
    card = (out / "README.md").read_text()
    assert "public domain" in card and "style's `encoder` part" in card
    evaluation = config["evaluation"]
    assert evaluation["encoder"] == "style" and evaluation["style"]["photos"] == TINY.eval_photos
    for metrics in (evaluation["style"], evaluation["base"]):
        assert -1 <= metrics["photo_identity"] <= 1 and -1 <= metrics["multiview_identity"] <= 1
        assert 0 <= metrics["distinct_people_rate"] <= 1 and -1 <= metrics["identity_between_portraits"] <= 1
    assert evaluation["style"]["style_strength"] > 0 and "style_strength" not in evaluation["base"]
    # the same photos under both rows
    assert evaluation["style"]["identity_between_photos"] == evaluation["base"]["identity_between_photos"]
    assert f"| {evaluation['style']['photo_identity']:.3f} |" in card and "different photos, different people" in card

    base = load_generator(bases / "base3d")
    styled = apply_style_delta(base, build_style_delta(config, load_file(out / "model.safetensors")))
    z = torch.randn([1, TINY_3D.z_dim], generator=torch.Generator().manual_seed(1))
    c = camera_label(0, 0)

    def render(G):
        with torch.no_grad():
            return G.synthesis(G.mapping(z, c), c, noise_mode="const", deterministic=True)["image"]

    assert (render(styled) - render(base)).abs().max() > 1e-3

    # The encoder delta holds only the tuned modules (the photo backbone stays frozen) and changes the codes.
    base_encoder = load_base_encoder(marker["base_encoder"])
    delta = build_style_delta(part, load_file(out / "encoder.safetensors"))
    assert delta.changes() and all(name.startswith(("laterals.", "heads.", "camera_offset."))
                                   for name in delta.changes())
    styled_encoder = apply_style_delta(base_encoder, delta)
    crops = torch.rand([1, 3, 128, 128]) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(styled_encoder(crops, c), base_encoder(crops, c))


def test_without_a_base_encoder_stage_4_starts_fresh_and_the_style_ships_none(bases, tmp_path, capsys):
    run = tmp_path / "run"
    main(_args(bases, run, "--minutes", "0"))
    marker = json.loads((run / MARKER_FILE).read_text())
    marker.update(base_encoder=None, completed=list(STAGES[:3]))
    _save_weights(load_generator(bases / "base3d"), run / STYLED3D_FILE)  # stands in for the tuned generator
    assert run_encoder_stage(run, AgileConfig(**marker["config"]), marker, StepsDeadline(5), "cpu", 1)
    assert "fresh Head3DEncoder" in capsys.readouterr().out
    marker["completed"].append("encoder")
    marker["base3d_name"] = "head3d-faces64"  # recorded at the start: the delta names it, whatever export is told
    out = export_style(run, marker, tmp_path / "style")
    config = json.loads((out / "config.json").read_text())
    assert config["base"] == "head3d-faces64"
    assert "parts" not in config and "evaluation" not in config and not (out / "encoder.safetensors").exists()
    assert "Trained from a fresh Head3DEncoder, so it is not shipped" in (out / "README.md").read_text()


def test_exemplar_count_study_trains_each_count_and_writes_the_table(bases, tmp_path):
    root, out = tmp_path / "study", tmp_path / "style"
    args = _args(bases, root, "--exemplar-counts", "3,2", "--minutes", "5", "--export", str(out))
    assert main([*args, "--stop-after", "transfer"]) == 0  # the first count stops before stage 4
    assert json.loads((root / "n2" / MARKER_FILE).read_text())["completed"] == list(STAGES[:3])
    assert json.loads((root / "n3" / MARKER_FILE).read_text())["completed"] == []
    assert not (root / "n2_style").exists() and not out.exists()
    assert main(args) == 0
    subsets = [json.loads((root / f"n{count}" / MARKER_FILE).read_text())["exemplars"] for count in (2, 3)]
    assert len(subsets[0]) == 2 and len(subsets[1]) == 3 and set(subsets[0]) < set(subsets[1])
    assert not (root / "n2" / STYLED3D_FILE).exists() and (root / "n3" / STYLED3D_FILE).exists()
    table = (root / "study.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "portraits of" not in line]
    assert [row.split(" | ")[1] for row in rows] == ["-", "2", "3"]
    evaluations = [json.loads((root / f"n{count}_style" / "config.json").read_text())["evaluation"]
                   for count in (2, 3)]
    assert f"{evaluations[0]['style']['multiview_identity']:.3f}" in rows[1]
    card = (out / "README.md").read_text()
    assert "## Exemplar-count study" in card and table.strip() in card
    assert json.loads((out / "config.json").read_text())["training"]["exemplars"] == subsets[1]
    resume = ["--run", str(root), "--minutes", "0", "--export", str(tmp_path / "again")]
    assert main(resume) == 0  # a finished study folder is resumed as one: it only rewrites its table and export
    assert (tmp_path / "again" / "README.md").read_text() == card


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
