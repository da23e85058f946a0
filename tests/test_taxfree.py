"""'Tax-free' 3DMM conditioning: the estimator F_R, its trainer, both conditional GAN recipes (train, resume, export,
reload) and the evaluation, all on a tiny synthetic archive with random-weight networks."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from core.face3dmm import EXPRESSION_NAMES, FaceParams
from core.nets import load_generator
from core.nets.face3dmm_estimator import Face3DMMEstimator, load_face3dmm_estimator, parameter_groups
from training import eval_taxfree, train_taxfree
from training.data.archive import pack_bytes, write_archive
from training.train_face3dmm_estimator import (export, grouped_loss, load_split, normalisation_stats,
                                               parameter_errors, train_estimator)
from training.train_stylegan2 import LOG_FILE, StyleGAN2Trainer, TrainConfig
from training.train_taxfree import RENDERS_FILE, TaxFreeConfig, TaxFreeTrainer, normalised_data

torch.set_num_threads(2)

NUM_IDENTITY = 50
SIZE = 16
TINY_ESTIMATOR = dict(num_identity=NUM_IDENTITY, input_size=16, channels=(8, 8), head_features=16)
TINY_GAN = ["z_dim=16", "w_dim=16", "channel_base=128", "channel_max=16", "batch=4", "mbstd_group=2",
            "r1_interval=2", "ada_interval=1", "ema_kimg=0.01", "render_resolution=8"]


def _labels(count: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        params = FaceParams.neutral(NUM_IDENTITY)
        params.identity = torch.randn(NUM_IDENTITY, generator=generator)
        params.expression = torch.rand(len(EXPRESSION_NAMES), generator=generator) * 0.5
        params.rotation = torch.randn(3, generator=generator) * torch.tensor([15.0, 8.0, 3.0])
        rows.append(params.to_vector().numpy())
    return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A 16-px archive of 14 random images (8 train, 2 val, 4 test) with plausible 3DMM labels."""
    count = 14
    rng = np.random.default_rng(0)
    images, masks = [], []
    for _ in range(count):
        for blobs, array in ((images, rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
                             (masks, np.zeros((SIZE, SIZE), np.uint8))):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            blobs.append(buffer.getvalue())
    image_data, image_offsets = pack_bytes(images)
    mask_data, mask_offsets = pack_bytes(masks)
    arrays = {"image_data": image_data, "image_offsets": image_offsets, "mask_data": mask_data,
              "mask_offsets": mask_offsets, "split": np.array([0] * 8 + [1] * 2 + [2] * 4, np.uint8),
              "face3dmm": _labels(count, 0)}
    rotation = arrays["face3dmm"][:, parameter_groups(NUM_IDENTITY)["rotation"]]
    arrays["pose"] = np.stack([-0.8 * rotation[:, 0] + 1.0, 0.9 * rotation[:, 1] - 2.0, rotation[:, 2]], 1)
    metadata = {"names": [f"s{i}" for i in range(count)], "size": SIZE, "class_names": ["background"],
                "splits": ["train", "val", "test"]}
    return write_archive(tmp_path_factory.mktemp("data") / "faces16.npz", arrays, metadata)


@pytest.fixture(scope="module")
def estimator_dir(archive, tmp_path_factory):
    """A tiny F_R trained for one epoch on the tiny archive and exported like the bundled one."""
    torch.manual_seed(0)
    train, val = load_split(archive, "train", 16), load_split(archive, "val", 16)
    mean, std = normalisation_stats(train)
    model, history = train_estimator(Face3DMMEstimator(**TINY_ESTIMATOR, mean=mean, std=std), train, val, epochs=1,
                                     minutes=5, batch=4)
    metrics = parameter_errors(val["labels"].numpy(), val["labels"].numpy(), NUM_IDENTITY)
    training = {"data": str(archive), "train_count": 8, "val_count": 2, "test_count": 2, "batch": 4, "lr": 2e-3,
                "weight_decay": 1e-4}
    return export(model, tmp_path_factory.mktemp("estimator"), training, metrics, metrics, history)


# ---- F_R -------------------------------------------------------------------------------------------------------


def test_estimator_is_small_differentiable_and_normalises():
    model = Face3DMMEstimator(mean=torch.randn(136), std=torch.rand(136) + 0.5).eval()
    assert sum(p.numel() for p in model.parameters()) <= 500_000
    images = torch.randn(2, 3, 128, 128, requires_grad=True)
    output = model(images)
    assert output.shape == (2, 136) == (2, parameter_groups(NUM_IDENTITY)["lighting"].stop)
    (gradient,) = torch.autograd.grad(output.square().sum(), images)
    assert gradient.abs().sum() > 0
    raw = torch.randn(3, 136)
    assert torch.allclose(model.denormalise(model.normalise(raw)), raw, atol=1e-5)


def test_parameter_errors_and_grouped_loss():
    target = _labels(20, 1)
    perfect = parameter_errors(target, target, NUM_IDENTITY)
    assert perfect["yaw_mae_deg"] == 0 and perfect["expression_mae"] == 0 and perfect["identity_r2"] == 1
    assert perfect["curated_expressions"]["jawOpen"]["r"] == pytest.approx(1)
    shifted = target.copy()
    shifted[:, NUM_IDENTITY + len(EXPRESSION_NAMES)] += 5  # yaw + 5 degrees
    assert parameter_errors(shifted, target, NUM_IDENTITY)["yaw_mae_deg"] == pytest.approx(5, abs=1e-4)
    groups = parameter_groups(NUM_IDENTITY)
    predicted, truth = torch.zeros(4, 136), torch.zeros(4, 136)
    predicted[:, groups["rotation"]] = 1.0  # 3 wrong values weigh as much as a whole wrong group
    assert float(grouped_loss(predicted, truth, groups)) == pytest.approx(1 / 6)
    assert float(grouped_loss(predicted, truth, groups, {"identity": 1.0})) == 0


def test_estimator_training_flips_and_bundle(archive, estimator_dir):
    train = load_split(archive, "train", 16)
    assert train["images"].shape == (8, 3, 16, 16) and train["num_identity"] == NUM_IDENTITY
    yaw = NUM_IDENTITY + len(EXPRESSION_NAMES)
    assert torch.allclose(train["mirrored"][:, yaw], -train["labels"][:, yaw])
    mean, std = normalisation_stats(train)
    assert abs(float(mean[yaw])) < 1e-4 and (std > 0).all()  # labels + mirrored copies: yaw is symmetric
    config = json.loads((estimator_dir / "config.json").read_text())
    assert len(config["normalisation"]["mean"]) == 136 and config["training"]["data"] == str(archive)
    assert "Test-split errors" in (estimator_dir / "README.md").read_text()
    loaded = load_face3dmm_estimator(estimator_dir)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert torch.allclose(loaded.mean, mean, atol=1e-6)
    assert torch.isfinite(loaded(torch.randn(2, 3, 32, 32))).all()


# ---- conditional GAN recipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["taxfree", "overconstrained"])
def test_recipe_trains_resumes_exports_and_reloads(recipe, archive, estimator_dir, tmp_path):
    run, estimator = tmp_path / "run", tmp_path / "estimator"
    shutil.copytree(estimator_dir, estimator)
    common = ["--run", str(run), "--log-every", "1", "--render-workers", "1"]
    train_taxfree.main([*common, "--recipe", recipe, "--data", str(archive), "--steps", "2",
                        "--set", *TINY_GAN, f"estimator={estimator}"])
    records = [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss_consistency"]) for r in records)
    assert ("loss_render" in records[0]) == (recipe == "overconstrained")
    assert (run / RENDERS_FILE).exists() == (recipe == "overconstrained")  # the cache survives checkpoints

    train_taxfree.main([*common, "--recipe", "taxfree", "--steps", "1"])  # resumes: the stored recipe wins
    stored = train_taxfree.read_taxfree_config(run)
    assert json.loads((run / "state.json").read_text())["step"] == 3 and stored.recipe == recipe
    assert stored.c_dim == 136 and stored.z_dim == 16

    out = tmp_path / "bundle"
    train_taxfree.main([*common, "--minutes", "0", "--export", str(out)])
    generator = load_generator(out)
    config = json.loads((out / "config.json").read_text())
    assert generator.c_dim == 136 and config["conditioning"]["recipe"] == recipe
    assert len(config["conditioning"]["mean"]) == 136 and f"recipe `{recipe}`" in (out / "README.md").read_text()
    image = generator(torch.randn(1, 16), torch.zeros(1, 136), noise_mode="const")
    assert image.shape == (1, 3, SIZE, SIZE) and torch.isfinite(image).all()

    weights = estimator / "model.safetensors"
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in load_file(weights).items()}, str(weights))
    with pytest.raises(SystemExit):  # another F_R would change c's normalisation under a resumed run
        train_taxfree.main([*common, "--steps", "1"])


def _trainer(recipe, archive, estimator_dir, **overrides):
    from training.train_stylegan2 import images_from_archive

    estimator = load_face3dmm_estimator(estimator_dir)
    raw = images_from_archive(archive, "train", label_key="face3dmm")
    tiny = train_taxfree._parse_overrides(TINY_GAN)
    config = TaxFreeConfig.for_recipe(recipe, resolution=SIZE, c_dim=136, **tiny, **overrides)
    renders = train_taxfree.render_targets(raw.labels, 8) if config.render_weight > 0 else None
    return TaxFreeTrainer(config, normalised_data(raw, estimator), estimator, renders), raw


class _FixedEstimator(torch.nn.Module):
    """Stands in for F_R: predicts `offset` (identity coefficients only) plus a term that keeps the graph to G."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset

    def forward(self, images):
        prediction = torch.zeros(images.shape[0], 136) + images.mean() * 0
        prediction[:, parameter_groups(NUM_IDENTITY)["identity"]] += self.offset
        return prediction


def test_taxfree_consistency_ignores_identity_and_overconstrained_does_not(archive, estimator_dir):
    for recipe, identity_counts in (("taxfree", False), ("overconstrained", True)):
        trainer, _ = _trainer(recipe, archive, estimator_dir)
        torch.manual_seed(1)
        loss = trainer._conditioning_losses(4)["consistency"]
        assert torch.autograd.grad(loss, trainer.G.mapping.embed.weight)[0].abs().sum() > 0  # F_R's gradient reaches G
        losses = []
        for offset in (0.0, 3.0):
            trainer.estimator = _FixedEstimator(offset)
            torch.manual_seed(1)
            losses.append(float(trainer._conditioning_losses(4)["consistency"].detach()))
        assert (losses[0] != pytest.approx(losses[1])) == identity_counts


def test_conditioning_labels_factorise_the_slider_groups_of_some_rows(archive, estimator_dir):
    groups = parameter_groups(NUM_IDENTITY)
    trainer, _ = _trainer("overconstrained", archive, estimator_dir, factorised_fraction=0.5)
    labels = trainer.data.labels
    torch.manual_seed(0)
    c, index, mirror, factorised = trainer._conditioning_labels(64)
    assert 0 < int(factorised.sum()) < 64
    base = trainer._labels(index, mirror)
    kept = [groups[name] for name in ("identity", "translation", "scale")]
    for rows, equal in ((~factorised, True), (factorised, False)):
        assert all(torch.equal(c[rows][:, g], base[rows][:, g]) for g in kept)  # the rest follows the base sample
        assert torch.equal(c[rows], base[rows]) == equal
    for name in train_taxfree.SLIDER_GROUPS:  # every slider group is some training sample's (or its mirror's) values
        candidates = torch.cat([labels, trainer.data.mirrored_labels])[:, groups[name]]
        assert all((candidates == row).all(dim=1).any() for row in c[:, groups[name]])
    trainer, _ = _trainer("taxfree", archive, estimator_dir, factorised_fraction=0.0)
    c, index, mirror, factorised = trainer._conditioning_labels(16)
    assert not factorised.any() and torch.equal(c, trainer._labels(index, mirror))


def test_discriminator_sees_only_its_groups_and_fakes_can_be_factorised(archive, estimator_dir):
    groups = parameter_groups(NUM_IDENTITY)
    trainer, _ = _trainer("taxfree", archive, estimator_dir, discriminator_groups="expression,rotation,lighting",
                          adversarial_factorised_fraction=1.0)
    images = torch.zeros([2, 3, SIZE, SIZE])
    torch.manual_seed(0)
    c = trainer._fake_labels()[:2]
    changed = c.clone()
    changed[:, groups["identity"]] += 5.0
    changed[:, groups["translation"]] -= 5.0
    assert torch.equal(trainer._discriminate(images, c), trainer._discriminate(images, changed))
    changed[:, groups["rotation"]] += 5.0
    assert not torch.equal(trainer._discriminate(images, c), trainer._discriminate(images, changed))
    torch.manual_seed(0)
    index, mirror = trainer._random_label_indices(trainer.config.batch)  # the draw _fake_labels starts with
    torch.manual_seed(0)
    factorised = trainer._fake_labels()
    base = trainer._labels(index, mirror)
    assert torch.equal(factorised[:, groups["identity"]], base[:, groups["identity"]])
    assert not torch.equal(factorised[:, groups["expression"]], base[:, groups["expression"]])
    with pytest.raises(ValueError, match="discriminator groups"):
        _trainer("taxfree", archive, estimator_dir, discriminator_groups="rotation,hair")


def test_render_targets_cover_the_face(archive):
    from training.train_stylegan2 import images_from_archive

    raw = images_from_archive(archive, "train", label_key="face3dmm")
    renders = train_taxfree.render_targets(raw.labels[:2], 16)
    assert renders.shape == (2, 4, 16, 16) and renders.dtype == torch.uint8
    covered = renders[:, 3] > 0
    assert 0.1 < float(covered.float().mean()) < 0.95
    assert int(renders[:, :3].amax(1)[covered].min()) > 0 and int(renders[:, :3].amax(1)[~covered].max()) == 0


# ---- evaluation ------------------------------------------------------------------------------------------------


def test_evaluation_produces_numbers_for_tiny_generators(archive, estimator_dir, tmp_path):
    trainer, _ = _trainer("taxfree", archive, estimator_dir)
    conditional = trainer.export(tmp_path / "taxfree")
    tiny = {k: v for k, v in train_taxfree._parse_overrides(TINY_GAN).items() if k in TrainConfig.__dataclass_fields__}
    base = StyleGAN2Trainer(TrainConfig(resolution=SIZE, **tiny), None).export(tmp_path / "base")
    out = tmp_path / "results.json"
    eval_taxfree.main(["--data", str(archive), "--base", str(base), "--taxfree", str(conditional),
                       "--estimator", str(estimator_dir), "--out", str(out), "--update-cards", "--slider-seeds", "2"])
    results = json.loads(out.read_text())
    assert results["count"] == 4
    for name in ("real", "base", "taxfree"):
        assert np.isfinite(results[name]["fd_id"]) and results[name]["fd_id"] >= 0
    assert results["base"]["fd_id"] > 0 and "pose_control" not in results["base"]
    assert results["base"]["generated_px"] == results["taxfree"]["generated_px"] == SIZE
    control = results["taxfree"]["pose_control"]
    assert 0 <= control["detected"] <= 1 and control["pairs"] <= 4  # random 16-px images: usually no face
    errors = results["taxfree"]["estimator_vs_requested"]
    assert np.isfinite(errors["yaw_mae_deg"]) and set(errors["curated_expressions"]) >= {"jawOpen", "eyeBlink_L"}
    variety = results["taxfree"]["seed_variety"]
    assert variety["labels"] == 4 and variety["std_over_seeds"] > 0 and variety["std_over_labels"] > 0
    assert "How much the latent z matters" in (conditional / "README.md").read_text()
    sliders = results["taxfree"]["slider_control"]
    assert sliders["seeds"] == 2 and "slider_control" not in results["base"]
    assert all(0 <= sliders[axis]["detected"] <= 1 for axis in ("yaw", "pitch"))
    relations = results["angle_relations"]
    assert relations["yaw"]["slope"] == pytest.approx(-0.8, abs=1e-4) and relations["pitch"]["slope"] == pytest.approx(
        0.9, abs=1e-4) and relations["yaw"]["intercept"] == pytest.approx(1.0, abs=1e-3)
    assert "Measured metrics" in (conditional / "README.md").read_text()
    assert "Sliders (only yaw, then only pitch changed" in (conditional / "README.md").read_text()
    assert "| taxfree (" in (base / "README.md").read_text()


def test_base_generator_evaluation_counts_detected_faces(archive, tmp_path, monkeypatch):
    from training import eval_stylegan2

    tiny = {k: v for k, v in train_taxfree._parse_overrides(TINY_GAN).items() if k in TrainConfig.__dataclass_fields__}
    base = StyleGAN2Trainer(TrainConfig(resolution=SIZE, **tiny), None).export(tmp_path / "base")
    seen = []

    def bright_faces(image):  # stands in for MediaPipe: a "face" in every image brighter than mid-grey
        seen.append(image.shape)
        return [object()] if image.mean() > 127 else []

    monkeypatch.setattr(eval_stylegan2, "detect_faces", bright_faces)
    out = tmp_path / "base.json"
    eval_stylegan2.main(["--generator", str(base), "--data", str(archive), "--samples", "6", "--out", str(out),
                         "--update-card"])
    result = json.loads(out.read_text())
    images = eval_stylegan2.resize_like(eval_stylegan2.sample(load_generator(base), 6, 0.7), np.zeros((1, 16, 16, 3)))
    assert seen == [(SIZE, SIZE, 3)] * 6
    assert result["face_detected"] == pytest.approx(np.mean(images.reshape(6, -1).mean(1) > 127))
    assert result["fd_id_count"] == 4 and result["fd_id"] >= 0 and result["fd_id_real_floor"] >= 0
    assert "| face detected (MediaPipe), 6 samples at psi 0.7 |" in (base / "README.md").read_text()


def test_seed_variety_tells_a_generator_that_ignores_z():
    class OnlyC(torch.nn.Module):  # images depend on c alone
        z_dim = 4

        def forward(self, z, c, noise_mode="const"):
            return c[:, :1, None, None].expand(-1, 3, 2, 2) + 0 * z[:, :1, None, None]

    class ZToo(OnlyC):
        def forward(self, z, c, noise_mode="const"):
            return (c[:, :1] + z[:, :1])[:, :, None, None].expand(-1, 3, 2, 2) / 4

    c = torch.tensor([[-0.5], [0.0], [0.5]])
    assert eval_taxfree.seed_variety(OnlyC(), c)["std_over_seeds"] == 0
    assert eval_taxfree.seed_variety(ZToo(), c)["ratio"] > 0.5


def test_smaller_generators_are_measured_at_the_real_crops_size():
    ramp = np.linspace(40, 200, 8).astype(np.uint8)  # smooth content: bicubic keeps the block means
    small = np.broadcast_to(ramp[None, None, :, None], (2, 8, 8, 3)).copy()
    reals = np.zeros((3, 32, 32, 3), np.uint8)
    resized = eval_taxfree.resize_like(small, reals)
    assert resized.shape == (2, 32, 32, 3) and resized.dtype == np.uint8
    np.testing.assert_allclose(resized.reshape(2, 8, 4, 8, 4, 3).mean(axis=(2, 4)), small, atol=3)
    assert eval_taxfree.resize_like(reals, reals) is reals
