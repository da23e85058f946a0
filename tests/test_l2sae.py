"""L2SAE network, region-edit pipeline, trainer (save/resume/export) and evaluation, with tiny random configs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core.nets.l2sae import L2SAE, L2SAEConfig, build_l2sae, load_l2sae, parameter_count
from core.pipelines.latents2semantics import MODES, Latents2SemanticsPipeline, feathered_region_mask, load_pipeline
from training.eval_l2sae import evaluate, write_metrics
from training.resumable import Deadline
from training.train_l2sae import FaceCrops, L2SAETrainer, TrainConfig, main, soft_dice_loss, train

TINY = L2SAEConfig(resolution=32, structure_resolution=8, channels_per_region=2, style_dim=16, channel_base=256,
                   channel_max=16, mask_channels=4)


def tiny_model(seed: int = 0) -> L2SAE:
    torch.manual_seed(seed)
    return L2SAE(TINY).eval()


def random_crop(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def tiny_trainer() -> L2SAETrainer:
    config = TrainConfig(model=TINY.to_dict(), d_channel_base=256, d_channel_max=16, batch=2, mbstd_group=2,
                         identity_weight=0.0, r1_interval=2)
    generator = torch.Generator().manual_seed(0)
    data = FaceCrops(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator),
                     torch.randint(0, len(TINY.regions), (4, 32, 32), dtype=torch.uint8, generator=generator))
    return L2SAETrainer(config, data)


def test_default_config_fits_the_weights_budget():
    assert parameter_count(L2SAE()) * 2 <= 3 * 2**20  # float16 bytes


def test_shapes_and_region_slices():
    model = tiny_model()
    structure, style = model.encode(torch.randn(2, 3, 32, 32))
    assert structure.shape == (2, len(TINY.regions) * 2, 8, 8) and style.shape == (2, 16)
    assert model.decode(structure, style).shape == (2, 3, 32, 32)
    logits = model.mask_logits(structure)
    assert logits.shape == (2, len(TINY.regions), 32, 32)
    # A region's mask depends on its own slice only.
    eyes = model.region_index("eyes")
    changed = structure.clone()
    changed[:, :eyes * 2] += 1.0
    changed_logits = model.mask_logits(changed)
    assert torch.allclose(changed_logits[:, eyes], logits[:, eyes])
    assert not torch.allclose(changed_logits[:, 0], logits[:, 0])
    with pytest.raises(ValueError):
        model.region_index("ears")


def test_untrained_style_manipulation_is_the_plain_perturbation():
    model = tiny_model()
    style, direction = torch.randn(3, 16), torch.randn(3, 16)
    assert torch.allclose(model.edit_style(style, direction, 2, 0.5), style + 0.5 * direction)


def test_feathered_mask_is_exactly_zero_beyond_twice_the_feather():
    region = torch.zeros(1, 1, 20, 20)
    region[..., 8:12, 8:12] = 1
    mask = feathered_region_mask(region, 2)[0, 0]
    assert torch.all(mask[8:12, 8:12] == 1)
    assert mask[7, 10] > 0 and mask[4:16, 4:16].sum() > mask[8:12, 8:12].sum()
    outside = torch.ones(20, 20, dtype=torch.bool)
    outside[4:16, 4:16] = False
    assert torch.all(mask[outside] == 0)


def test_pipeline_edits_only_inside_the_mask():
    pipeline = Latents2SemanticsPipeline(tiny_model())
    crop = random_crop(64)
    edited_regions = 0
    for region in TINY.regions:
        result = pipeline(crop, region, MODES[0], strength=1.5, seed=7, n_variants=2)
        assert len(result.edited) == 2 and result.seeds == [7, 8]
        assert result.reconstruction.shape == (32, 32, 3) and result.mask_overlay.shape == crop.shape
        outside = result.blend_mask == 0
        for edited in result.edited:
            assert edited.dtype == np.uint8 and edited.shape == crop.shape
            assert np.array_equal(edited[outside], crop[outside])
        if (result.blend_mask > 0).any():
            edited_regions += 1
            assert not np.array_equal(result.edited[0], result.edited[1])
    assert edited_regions > 0
    again = pipeline(crop, "hair", MODES[0], strength=1.5, seed=8, n_variants=1)
    hair = pipeline(crop, "hair", MODES[0], strength=1.5, seed=7, n_variants=2)
    assert np.array_equal(again.edited[0], hair.edited[1])
    assert result.seconds > 0 and result.provenance.seed == 7


def test_keep_detail_adds_the_decoded_change_to_the_photo():
    pipeline = Latents2SemanticsPipeline(tiny_model())
    crop = random_crop(64)
    region = next(name for name in TINY.regions
                  if (pipeline(crop, name, MODES[0], strength=0.0).blend_mask == 1).any())
    unchanged = pipeline(crop, region, MODES[0], strength=0.0, keep_detail=True)
    pasted = pipeline(crop, region, MODES[0], strength=0.0)
    assert np.array_equal(unchanged.edited[0], crop)  # no style change: the photo as it was, detail and all
    assert not np.array_equal(pasted.edited[0], crop)  # the paper's blend pastes the decoder's reconstruction
    edited = pipeline(crop, region, MODES[0], strength=1.5, seed=3, keep_detail=True)
    plain = pipeline(crop, region, MODES[0], strength=1.5, seed=3)
    inside, outside = edited.blend_mask == 1, edited.blend_mask == 0
    assert np.array_equal(edited.edited[0][outside], crop[outside])
    change = edited.edited[0].astype(int) - crop.astype(int)
    decoded_change = plain.edited[0].astype(int) - pasted.edited[0].astype(int)  # x_g - G(S, s) on the region
    unclipped = inside & (edited.edited[0] > 0).all(-1) & (edited.edited[0] < 255).all(-1)
    assert np.abs(change[unclipped] - decoded_change[unclipped]).max() <= 2  # up to rounding
    assert edited.provenance.parameters["keep_detail"] is True


def test_pipeline_reference_mode_and_errors():
    pipeline = Latents2SemanticsPipeline(tiny_model())
    crop, reference = random_crop(32, 0), random_crop(32, 1)
    result = pipeline(crop, "skin", MODES[1], reference=reference, n_variants=4)
    assert len(result.edited) == 1 and result.seeds == []
    untouched = pipeline(crop, "skin", MODES[1], strength=0.0, reference=reference)
    full = pipeline(crop, "skin", MODES[1], strength=1.0, reference=reference)
    recon = pipeline(crop, "skin", MODES[0], strength=0.0)
    assert np.array_equal(untouched.edited[0], recon.edited[0])
    if (full.blend_mask > 0).any():
        assert not np.array_equal(full.edited[0], untouched.edited[0])
    with pytest.raises(ValueError):
        pipeline(crop, "skin", MODES[1])
    with pytest.raises(ValueError):
        pipeline(crop, "skin", "sketch")
    with pytest.raises(ValueError):
        pipeline(crop[:, :20], "skin")


def test_train_save_resume_export_reload(tmp_path):
    run, export = tmp_path / "run", tmp_path / "export"
    trainer = tiny_trainer()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    record = train(trainer, run, Deadline(600, 1), max_steps=2, log_every=1)
    assert record["step"] == 2 and all(np.isfinite(record[key]) for key in ("l1", "mask_ce", "mask_dice"))
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert (run / "samples.png").exists() and len((run / "log.jsonl").read_text().splitlines()) == 2

    resumed = tiny_trainer()
    assert resumed.load(run) and resumed.step_count == 2
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value.half().float())
    train(resumed, run, Deadline(600, 1), max_steps=1, log_every=1)
    assert resumed.step_count == 3

    main(["--run", str(run), "--minutes", "0", "--export", str(export)])
    config = json.loads((export / "config.json").read_text())
    assert config["kind"] == "l2sae" and config["training"]["steps"] == 3
    assert "L2SAE" in (export / "README.md").read_text()
    reloaded = load_l2sae(export)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value.half().float())
    with pytest.raises(ValueError):
        build_l2sae({"kind": "stylegan2"}, {})


def test_evaluation_numbers_and_card(tmp_path):
    trainer = tiny_trainer()
    trainer.export(tmp_path)
    pipeline = load_pipeline(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    masks = rng.integers(0, len(TINY.regions), (3, 32, 32), dtype=np.uint8)
    metrics = evaluate(pipeline, images, masks, identity=None, edit_limit=2, batch=2)
    assert metrics["images"] == 3 and metrics["edited_images"] == 2 and metrics["identity_cosine"] is None
    assert set(metrics["regions"]) == set(TINY.regions)
    assert 0 <= metrics["mean_mask_iou"] <= 1 and np.isfinite(metrics["reconstruction_psnr"])
    assert metrics["max_locality"] == 0.0  # the blend leaves everything beyond the dilated mask untouched
    for values in metrics["regions"].values():
        assert 0 <= values["mask_iou"] <= 1
        assert (values["strength"] is None) == (values["strength_keep_detail"] is None)
    edited = [v for v in metrics["regions"].values() if v["strength"] is not None]
    assert edited and all(v["strength"] >= 0 and v["strength_keep_detail"] >= 0 for v in edited)
    write_metrics(tmp_path, metrics, "test")
    write_metrics(tmp_path, metrics, "test")
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "| eyes |" in card and "not yet measured" not in card
    assert json.loads((tmp_path / "metrics.json").read_text())["images"] == 3


def test_float32_pass_uses_a_float32_copy_of_a_half_precision_model():
    pipeline = Latents2SemanticsPipeline(tiny_model().to(torch.bfloat16))
    result = pipeline(random_crop(), "hair", seed=1)  # the CPU runtime computes in float32
    assert next(pipeline._model_float32.parameters()).dtype == torch.float32
    assert next(pipeline.model.parameters()).dtype == torch.bfloat16
    assert result.edited[0].shape == (32, 32, 3)


def tiny_region_archive(path, masks=None):
    """An archive of four random 32-px crops with region label maps (random unless given) in the train split."""
    from core.nets.l2sae import DATASET_REGIONS
    from training.data.archive import pack_bytes, write_archive

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    if masks is None:
        masks = [rng.integers(0, len(DATASET_REGIONS), (32, 32), dtype=np.uint8) for _ in range(4)]
    arrays = {}
    for key, items in (("image", images), ("mask", masks)):
        blobs = []
        for array in items:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            blobs.append(buffer.getvalue())
        arrays[f"{key}_data"], arrays[f"{key}_offsets"] = pack_bytes(blobs)
    arrays["split"] = np.zeros(4, np.uint8)
    metadata = {"names": [f"s{i}" for i in range(4)], "size": 32, "class_names": list(DATASET_REGIONS),
                "splits": ["train", "val", "test"]}
    return write_archive(path, arrays, metadata)


def test_cli_starts_a_run_from_an_archive(tmp_path):
    """`--data` starts a new run from the command line (the recipe options and the archive path both reach it)."""
    data = tiny_region_archive(tmp_path / "faces32.npz")
    run = tmp_path / "run"
    main(["--run", str(run), "--data", str(data), "--steps", "1", "--log-every", "1", "--minutes", "5", "--batch", "2",
          "--mbstd-group", "2", "--identity-weight", "0", "--d-channel-base", "256", "--d-channel-max", "16",
          "--model-json", json.dumps({"resolution": 32, "structure_resolution": 8, "channels_per_region": 2,
                                      "style_dim": 16, "channel_base": 256, "channel_max": 16, "mask_channels": 4}),
          "--device", "cpu"])
    stored = json.loads((run / "state.json").read_text())["extra"]["config"]
    assert stored["data"] == str(data) and stored["batch"] == 2 and stored["model"]["channel_max"] == 16
    assert len((run / "log.jsonl").read_text().splitlines()) == 1


def test_soft_dice_loss_rewards_overlap_and_skips_absent_regions():
    labels = torch.zeros([1, 8, 8], dtype=torch.long)
    labels[:, :, 4:] = 1  # regions 0 and 1 present, region 2 absent
    perfect = F.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 50
    assert float(soft_dice_loss(perfect, labels)) < 1e-6
    assert float(soft_dice_loss(perfect.flip(-1), labels)) > 0.99
    region_2_everywhere = perfect.clone()
    region_2_everywhere[:, 2] = 49.0  # the right region keeps p = sigmoid(1) of each pixel; region 2 takes the rest
    p = 1 / (1 + np.exp(-1.0))
    # the absent region 2 (Dice 0 if it counted) is left out of the mean
    assert float(soft_dice_loss(region_2_everywhere, labels)) == pytest.approx(1 - 2 * p / (p + 1), abs=1e-4)


def test_mask_refinement_trains_only_the_mask_head_resumes_and_exports(tmp_path):
    from training.refine_l2sae_masks import main as refine

    source = tiny_trainer().export(tmp_path / "source")
    masks = [np.where(np.arange(32)[None, :] < 16, 1, 7).repeat(32, 0).astype(np.uint8) for _ in range(4)]
    data = tiny_region_archive(tmp_path / "faces32.npz", masks)  # skin left, hair right: learnable from position
    run, export = tmp_path / "run", tmp_path / "export"
    refine(["--run", str(run), "--model", str(source), "--data", str(data), "--steps", "40", "--log-every", "20",
            "--minutes", "5", "--batch", "2", "--lr", "0.01", "--device", "cpu"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["mask_ce"] < log[0]["mask_ce"] and log[-1]["mask_dice"] < log[0]["mask_dice"]
    refine(["--run", str(run), "--steps", "2", "--log-every", "1", "--minutes", "5", "--data", str(data)])
    refine(["--run", str(run), "--minutes", "0", "--export", str(export)])
    before, after = load_l2sae(source).state_dict(), load_l2sae(export).state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith("mask_predictor.") for key in changed)
    config = json.loads((export / "config.json").read_text())
    assert config["training"]["mask_refinement"]["steps"] == 42 and config["kind"] == "l2sae"
    card = (export / "README.md").read_text()
    assert "## Mask head refinement" in card and "42 steps" in card and "L2SAE" in card

    with open(source / "model.safetensors", "ab") as weights:  # the source changed under the run
        weights.write(b" ")
    with pytest.raises(SystemExit):
        refine(["--run", str(run), "--minutes", "0", "--export", str(export)])
