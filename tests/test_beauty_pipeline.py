"""Beauty optimisation: the style encoder, the CMA-ES pipeline with tiny injected modules, the encoder trainer and
its evaluation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from core.nets import CONFIG_FILE, WEIGHTS_FILE, load_generator
from core.nets.encoders import StyleEncoder, build_style_encoder, style_encoder_config, style_layer_groups
from core.nets.stylegan2 import Generator
from core.pipelines.beauty import (DEFAULT_IDENTITY_WEIGHT, DEFAULT_STRENGTH, GENERATOR_ENCODER_PAIRS, BeautyOptimizer,
                                   OptimizerSettings, principal_directions)
from core.runtime import Runtime
from core.weights import WeightsError
from tabs import available_tabs, beauty
from training import eval_beauty
from training.eval.cards import write_card_section
from training.data.archive import pack_bytes, write_archive
from training.eval_encoder import evaluate_encoder
from training.eval_encoder import main as eval_main
from training.resumable import Deadline
from training.train_encoder import LOG_FILE, EncoderTrainConfig, EncoderTrainer, read_run_config, train
from training.train_encoder import main as train_main

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
PHOTO = sorted((REPO / "tests" / "fixtures" / "faces").glob("*.jpg"))[0]
TINY_GENERATOR = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs={"num_layers": 2},
                      synthesis_kwargs={"channel_base": 128, "channel_max": 8})
TINY_ENCODER = dict(channels=[8, 8, 8], pyramid_channels=8, head_channels=4, head_grid=2, head_hidden=8)


def tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    generator = Generator(**TINY_GENERATOR)
    with torch.no_grad():
        generator.mapping.w_avg.copy_(torch.randn(8) * 0.1)
    return generator.eval().requires_grad_(False)


def tiny_encoder(generator: Generator) -> StyleEncoder:
    torch.manual_seed(1)
    return StyleEncoder(style_encoder_config(generator.num_ws, generator.w_dim, 16, **TINY_ENCODER)).eval()


class Brightness(torch.nn.Module):
    """A synthetic 'beauty' score: the mean pixel value."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


class PooledIdentity(torch.nn.Module):
    """A cheap identity stand-in: 4x4-pooled pixels as the raw descriptor."""

    config = {"same_person_distance": 10.0}  # far: the identity barrier stays off unless a test moves it

    def chip_from_aligned(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def descriptor(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, 4).flatten(1)

    def embed_aligned(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.descriptor(images), dim=1)


@pytest.fixture(scope="module")
def pipeline() -> BeautyOptimizer:
    generator = tiny_generator()
    return BeautyOptimizer(generator, tiny_encoder(generator), Brightness(), Brightness(), PooledIdentity(),
                           settings=OptimizerSettings(directions=3, batch_size=8))


# ---- encoder ---------------------------------------------------------------------------------------------------


def test_style_layer_groups_cover_every_code_once():
    for num_ws in (3, 6, 12, 18):
        groups = style_layer_groups(num_ws)
        assert [i for start, stop in groups for i in range(start, stop)] == list(range(num_ws))
        assert all(stop > start for start, stop in groups)
    assert style_layer_groups(12) == ((0, 4), (4, 8), (8, 12))
    with pytest.raises(ValueError):
        style_layer_groups(2)


def test_style_encoder_codes_progressive_deltas_and_size():
    generator = tiny_generator()
    encoder = tiny_encoder(generator)
    images = torch.rand(2, 3, 40, 40) * 2 - 1  # any crop size is resized to the input size
    base, deltas = encoder.offsets(images)
    assert base.shape == (2, 8) and deltas.shape == (2, generator.num_ws, 8)
    assert torch.all(deltas[:, 0] == 0) and deltas[:, 1:].abs().sum() > 0
    encoder.delta_layers = 2
    _, deltas = encoder.offsets(images)
    assert deltas[:, 1:3].abs().sum() > 0 and torch.all(deltas[:, 3:] == 0)
    encoder.delta_layers = 0
    ws = encoder(images)
    assert torch.allclose(ws, ws[:, :1].expand_as(ws))  # stage 0: one code for every layer
    # the 128-px base configuration fits the bundle budget (<= 3 MiB in float16)
    parameters = sum(p.numel() for p in StyleEncoder(style_encoder_config(12, 256, 128)).parameters())
    assert parameters * 2 <= 3 * 2**20


def test_build_style_encoder_round_trips_float16_weights():
    encoder = tiny_encoder(tiny_generator())
    with torch.no_grad():
        encoder.w_avg.normal_()
    half = {k: v.half() for k, v in encoder.state_dict().items()}
    rebuilt = build_style_encoder(encoder.config, half)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(rebuilt(images), encoder(images), atol=1e-2)


# ---- pipeline --------------------------------------------------------------------------------------------------


def test_principal_directions_are_orthonormal_sorted_and_cached():
    generator = tiny_generator()
    basis = principal_directions(generator, 4, samples=2000)
    assert basis.directions.shape == (4, 8)
    assert torch.allclose(basis.directions @ basis.directions.T, torch.eye(4), atol=1e-4)
    assert torch.all(basis.stds[:-1] >= basis.stds[1:]) and basis.stds[-1] > 0
    generator.mapping.forward = None  # a cached basis never maps again
    again = principal_directions(generator, 3)
    assert torch.equal(again.directions, basis.directions[:3])


def test_optimiser_improves_the_objective_reports_every_generation_and_keeps_the_budget(pipeline):
    reports = []
    result = pipeline(seed=3, budget=6, population=6, identity_weight=0.0,
                      progress=lambda generation, budget, record: reports.append((generation, budget, record)))
    assert [(g, b) for g, b, _ in reports] == [(g, 6) for g in range(1, 7)]
    assert [r for _, _, r in reports] == result.history
    assert result.evaluations == 6 * 6
    assert result.score_after > result.score_before + 0.01
    best = max(result.history, key=lambda r: r.best_objective)  # the returned face is the best candidate seen
    assert result.score_after == pytest.approx(best.best_score, abs=1e-5)
    assert result.evaluator_after > result.evaluator_before  # the same synthetic score
    assert result.optimized.shape == result.reconstruction.shape == (16, 16, 3)
    assert result.optimized.dtype == np.uint8 and np.array_equal(result.input_image, result.reconstruction)
    assert result.reconstruction_identity == pytest.approx(1.0, abs=1e-5)
    # only the coarse and middle layers move
    fine_start = style_layer_groups(pipeline.generator.num_ws)[2][0]
    assert np.abs(result.latent_offset[:fine_start]).sum() > 0
    assert np.all(result.latent_offset[fine_start:] == 0)
    assert set(result.timings) == {"inversion_s", "optimisation_s", "total_s"}
    assert "bias" in result.note


def test_optimiser_is_reproducible_and_ignores_global_numpy_state(pipeline):
    np.random.seed(1)
    first = pipeline(seed=5, budget=3, population=4)
    np.random.seed(2)
    second = pipeline(seed=5, budget=3, population=4)
    other = pipeline(seed=6, budget=3, population=4)
    assert first.history == second.history
    assert np.array_equal(first.optimized, second.optimized)
    assert first.history != other.history


def test_strength_bounds_the_search_and_identity_weight_holds_identity(pipeline):
    settings = pipeline.settings
    small = pipeline(seed=2, budget=4, population=6, identity_weight=0.0, strength=0.2)
    assert np.abs(small.coefficients).max() <= settings.max_coefficient * 0.2 + 1e-9
    free = pipeline(seed=2, budget=4, population=6, identity_weight=0.0)
    held = pipeline(seed=2, budget=4, population=6, identity_weight=100.0)
    assert held.identity_similarity > free.identity_similarity
    with pytest.raises(ValueError):
        pipeline(seed=2, budget=0)


def test_identity_barrier_keeps_the_result_within_the_same_person_distance(pipeline):
    fixture_settings = pipeline.settings
    try:
        pipeline.settings = OptimizerSettings(directions=3, batch_size=8, identity_barrier=0.0)
        free = pipeline(seed=2, budget=6, population=6, identity_weight=0.0)
        allowed = free.identity_distance / 2
        margin = free.same_person_distance - allowed
        pipeline.settings = OptimizerSettings(directions=3, batch_size=8, identity_margin=margin)
        guarded = pipeline(seed=2, budget=6, population=6, identity_weight=0.0)
    finally:
        pipeline.settings = fixture_settings
    assert free.same_person_distance == 10.0 and free.identity_distance > 0.05
    assert guarded.identity_distance <= allowed + 1e-4
    assert guarded.score_after > guarded.score_before  # the search still finds a gain inside the allowed distance
    assert free.score_after > guarded.score_after


def test_photo_path_aligns_encodes_and_refines(pipeline):
    target = torch.rand(1, 3, 16, 16) * 2 - 1
    anchor = pipeline.identity.embed_aligned(target)
    fixture_settings = pipeline.settings
    try:
        pipeline.settings = OptimizerSettings(directions=3, refine_steps=0)
        encoded = pipeline.invert(target, anchor)
        pipeline.settings = OptimizerSettings(directions=3, refine_steps=8, refine_lr=0.05)
        refined = pipeline.invert(target, anchor)
        result = pipeline(str(PHOTO), seed=0, budget=2, population=4)
    finally:
        pipeline.settings = fixture_settings

    def error(ws):
        return F.mse_loss(pipeline.generator.synthesis(ws, noise_mode="const"), target).item()

    assert error(refined) < error(encoded)
    assert result.input_image.shape == (256, 256, 3) and result.reconstruction.shape == (16, 16, 3)
    assert len(result.history) == 2 and result.settings["photo"] is True
    assert np.isfinite([result.score_before, result.score_after, result.identity_similarity]).all()


# ---- encoder training and evaluation ---------------------------------------------------------------------------


def export_generator(directory: Path) -> Path:
    directory.mkdir(parents=True)
    generator = tiny_generator()
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps({"kind": "stylegan2", "init_kwargs": TINY_GENERATOR}))
    return directory


def tiny_archive(path: Path, count: int = 6) -> Path:
    rng = np.random.RandomState(0)
    blobs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    image_data, image_offsets = pack_bytes(blobs)
    split = np.array([0, 0, 0, 0, 1, 1], np.uint8)[:count]
    metadata = {"size": 32, "names": [f"s{i}" for i in range(count)], "splits": ["train", "test"],
                "class_names": ["background"]}
    return write_archive(path, {"image_data": image_data, "image_offsets": image_offsets, "split": split}, metadata)


def test_encoder_trainer_learns_saves_resumes_and_exports(tmp_path):
    generator = load_generator(export_generator(tmp_path / "generator"))
    images = torch.randint(0, 256, [6, 3, 32, 32], dtype=torch.uint8)  # resized to 16 px by the trainer
    config = EncoderTrainConfig(batch=4, progressive_steps=1, encoder_overrides=TINY_ENCODER, lr=1e-3)

    def make():
        return EncoderTrainer(config, generator, PooledIdentity(), images)

    trainer = make()
    assert trainer.encoder.delta_layers == 0 and torch.equal(trainer.encoder.w_avg, generator.mapping.w_avg)
    before = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    train(trainer, tmp_path / "run", Deadline(600, 1), max_steps=2, log_every=1)
    assert trainer.step_count == 2 and trainer.encoder.delta_layers == 2
    assert any(not torch.equal(before[k], v) for k, v in trainer.encoder.state_dict().items())
    assert len((tmp_path / "run" / LOG_FILE).read_text().splitlines()) == 2
    assert read_run_config(tmp_path / "run") == config

    resumed = make()
    assert resumed.load(tmp_path / "run") and resumed.step_count == 2 and resumed.encoder.delta_layers == 2
    for key, value in trainer.encoder.state_dict().items():
        assert torch.equal(resumed.encoder.state_dict()[key], value)
    stats = resumed.step()
    assert np.isfinite(list(stats.values())).all() and resumed.step_count == 3
    assert len((tmp_path / "run" / LOG_FILE).read_text().splitlines()) == 2  # kept across saves

    export = resumed.export(tmp_path / "encoder")
    rebuilt = build_style_encoder(json.loads((export / CONFIG_FILE).read_text()), load_file(export / WEIGHTS_FILE))
    assert rebuilt.delta_layers == 3
    probe = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(rebuilt(probe), resumed.encoder.eval()(probe), atol=2e-2)
    assert "W+" in (export / "README.md").read_text()


def test_encoder_cli_trains_resumes_exports_and_evaluates(tmp_path):
    generator_dir = export_generator(tmp_path / "generator")
    archive = tiny_archive(tmp_path / "faces.npz")
    common = ["--generator", str(generator_dir), "--run", str(tmp_path / "run"), "--device", "cpu"]
    train_main([*common, "--data", str(archive), "--steps", "1", "--batch", "2", "--minutes", "5", "--reserve-s", "1",
                "--log-every", "1", "--encoder-channels", "8,8,8"])
    train_main([*common, "--steps", "1", "--minutes", "5", "--reserve-s", "1", "--log-every", "1",
                "--export", str(tmp_path / "encoder")])
    assert read_run_config(tmp_path / "run").batch == 2
    assert json.loads((tmp_path / "encoder" / CONFIG_FILE).read_text())["training"]["steps"] == 2
    metrics = eval_main(["--generator", str(generator_dir), "--encoder", str(tmp_path / "encoder"), "--data",
                         str(archive), "--card", "--device", "cpu"])
    assert metrics["count"] == 2 and np.isfinite(metrics["psnr_db"]) and -1 <= metrics["identity_similarity"] <= 1
    assert "PSNR" in (tmp_path / "encoder" / "README.md").read_text()
    assert json.loads((tmp_path / "encoder" / "eval.json").read_text())["split"] == "test"


def test_evaluate_encoder_scores_a_perfect_reconstruction_higher():
    generator = tiny_generator()
    ws = generator.mapping(torch.randn(3, 8), torch.zeros(3, 0))
    rendered = generator.synthesis(ws, noise_mode="const").clamp(-1, 1)
    images = ((rendered * 127.5 + 128).clamp(0, 255)).to(torch.uint8)

    class Oracle(torch.nn.Module):
        def forward(self, targets):
            return ws

    perfect = evaluate_encoder(generator, Oracle(), PooledIdentity(), images)
    average = evaluate_encoder(generator, tiny_encoder(generator), PooledIdentity(), images)
    assert perfect["count"] == 3 and perfect["psnr_db"] > 40 and perfect["identity_similarity"] > 0.999
    assert average["psnr_db"] < perfect["psnr_db"] and average["identity_similarity"] < perfect["identity_similarity"]


# ---- evaluation of the optimiser on held-out faces -------------------------------------------------------------


def photo_archive(path: Path, photos: list[np.ndarray]) -> Path:
    """An archive whose test split holds `photos` (uint8 RGB of any size)."""
    blobs = []
    for photo in photos:
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    image_data, image_offsets = pack_bytes(blobs)
    metadata = {"size": 256, "names": [f"p{i}" for i in range(len(photos))], "splits": ["train", "test"],
                "class_names": ["background"]}
    return write_archive(path, {"image_data": image_data, "image_offsets": image_offsets,
                                "split": np.ones(len(photos), np.uint8)}, metadata)


def test_beauty_evaluation_cli_reports_the_issue_targets(tmp_path):
    generator = tiny_generator()
    generator_dir = export_generator(tmp_path / "generator")
    encoder, encoder_dir = tiny_encoder(generator), tmp_path / "encoder"
    encoder_dir.mkdir()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(encoder_dir / WEIGHTS_FILE))
    (encoder_dir / CONFIG_FILE).write_text(json.dumps(encoder.config))
    (encoder_dir / "README.md").write_text("# encoder\n")
    faces = [np.asarray(Image.open(path).convert("RGB"))
             for path in sorted((REPO / "tests" / "fixtures" / "faces").glob("*.jpg"))[:2]]
    archive = photo_archive(tmp_path / "photos.npz", [faces[0], np.full((200, 200, 3), 128, np.uint8), faces[1]])
    out = tmp_path / "eval.json"
    results = eval_beauty.main(["--generator", str(generator_dir), "--encoder", str(encoder_dir), "--data",
                                str(archive), "--faces", "3", "--budget", "2", "--population", "4", "--out", str(out),
                                "--card", str(encoder_dir), "--device", "cpu"])
    summary = results["summary"]
    assert summary["faces"] == 2 and summary["skipped"] == 1 and results["skipped"][0]["face"] == 1
    assert summary["settings"] == {"budget": 2, "population": 4, "identity_weight": DEFAULT_IDENTITY_WEIGHT,
                                   "strength": DEFAULT_STRENGTH}
    rows = results["faces"]
    assert [row["face"] for row in rows] == [0, 2]
    for row in rows:
        assert 1 <= row["evaluator_before"] <= 10 and 1 <= row["evaluator_after"] <= 10
        assert row["distance_to_input"] > 0 and row["reconstruction_distance_to_input"] > 0
    gains = [row["evaluator_after"] - row["evaluator_before"] for row in rows]
    assert summary["evaluator_gain_mean"] == pytest.approx(np.mean(gains))
    threshold = summary["same_person_distance"]
    assert summary["same_person_rate"] == np.mean([row["distance_to_input"] < threshold for row in rows])
    assert json.loads(out.read_text())["summary"] == summary
    card = (encoder_dir / "README.md").read_text()
    assert "Beauty optimisation on held-out faces" in card and f"{summary['evaluator_gain_mean']:+.3f}" in card
    assert summary["identity_barrier"] == {"margin": 0.1, "weight": 50.0}
    assert "barrier from descriptor distance 0.5" in card
    (encoder_dir / "README.md").write_text(card + "\n## Later section\n\nkept\n")
    section = "\n## Beauty optimisation on held-out faces (again)\n\nnew\n"
    write_card_section(encoder_dir / "README.md", section)
    card = (encoder_dir / "README.md").read_text()
    assert card.count("## Beauty optimisation on held-out faces") == 1 and card.startswith("# encoder\n")
    assert "(again)" in card and "## Later section\n\nkept" in card


def test_from_pretrained_and_the_tab_use_the_first_available_generator_encoder_pair(tmp_path):
    from tests.tiny_weights import add_beauty_models, load_registry  # tiny_weights imports this module

    add_beauty_models(tmp_path, GENERATOR_ENCODER_PAIRS[-1])
    registry = load_registry(tmp_path)
    assert beauty in available_tabs(registry)
    optimizer = BeautyOptimizer.from_pretrained(runtime=Runtime("cpu", registry=registry))
    generator, encoder = GENERATOR_ENCODER_PAIRS[-1]
    assert optimizer.model_names["generator"] == generator and optimizer.model_names["encoder"] == encoder
    (tmp_path / encoder / "model.safetensors").unlink()  # a generator without its encoder is no pair
    assert beauty not in available_tabs(load_registry(tmp_path))
    with pytest.raises(WeightsError, match="photo encoder"):
        BeautyOptimizer.from_pretrained(runtime=Runtime("cpu", registry=load_registry(tmp_path)))
