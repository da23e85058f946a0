"""3D head inversion: Head3DEncoder trainer (2 steps, save, resume, export, reload), the pipeline's photo path and
the evaluation script, on a tiny random head3d generator."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.beauty import load_identity_encoder
from core.nets.camera import camera_label
from core.nets.encoders import Head3DEncoder, build_head3d_encoder, head3d_encoder_config
from core.pipelines.head3d import Head3DPipeline
from core.runtime import Runtime
from tabs.common import EXAMPLE_PHOTOS
from tests.test_head3d import TINY
from training.eval_head3d import card_section, encoder_card_section, evaluate
from training.resumable import Deadline
from training.train_head3d import build_head_generator
from training.train_head3d_encoder import Head3DEncoderConfig, Head3DEncoderTrainer, train

TINY_ENCODER = {"channels": [8, 8, 8], "pyramid_channels": 8, "head_channels": 4, "head_grid": 2, "head_hidden": 8}


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    return build_head_generator(TINY).eval(), load_identity_encoder("identity-resnet")


def test_encoder_camera_term_and_bundled_size():
    encoder = Head3DEncoder(head3d_encoder_config(10, 512, 128))
    assert sum(p.numel() for p in encoder.parameters()) * 2 <= 3 * 2**20  # float16 bytes
    images = torch.zeros(1, 3, 128, 128)
    torch.testing.assert_close(encoder(images, camera_label(0, 0)), encoder(images, camera_label(30, 0)))
    with torch.no_grad():
        encoder.camera_offset.weight.normal_()
    assert not torch.allclose(encoder(images, camera_label(0, 0)), encoder(images, camera_label(30, 0)))


def test_train_save_resume_export_reload(parts, tmp_path):
    generator, identity = parts
    images = torch.randint(0, 256, [3, 3, 128, 128], dtype=torch.uint8)
    cameras = torch.cat([camera_label(yaw, 0) for yaw in (-20, 0, 20)])
    mirrored = torch.cat([camera_label(-yaw, 0) for yaw in (-20, 0, 20)])
    config = Head3DEncoderConfig(batch=2, encoder_overrides=TINY_ENCODER)
    trainer = Head3DEncoderTrainer(config, generator, identity, images, cameras, mirrored)
    before = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    record = train(trainer, tmp_path / "run", Deadline(600, 1), max_steps=2, log_every=1)
    assert trainer.step_count == 2
    for key in ("pixel", "identity", "multiview", "latent", "delta"):
        assert np.isfinite(record[key]), key
    assert record["multiview"] > 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.encoder.state_dict().items())

    resumed = Head3DEncoderTrainer(config, generator, identity, images, cameras, mirrored)
    assert resumed.load(tmp_path / "run") and resumed.step_count == 2
    for key, value in trainer.encoder.state_dict().items():
        torch.testing.assert_close(resumed.encoder.state_dict()[key], value)
    resumed.step()
    assert resumed.step_count == 3

    export = trainer.export(tmp_path / "export", record)
    config_json = json.loads((export / "config.json").read_text())
    assert config_json["num_ws"] == generator.backbone.num_ws and config_json["camera_dim"] == 25
    reloaded = build_head3d_encoder(config_json, load_file(str(export / "model.safetensors")))
    crops, camera = torch.rand(1, 3, 128, 128) * 2 - 1, camera_label(10, 5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(crops, camera), trainer.encoder.eval()(crops, camera), rtol=1e-2,
                                   atol=1e-2)


@pytest.fixture(scope="module")
def pipeline(parts):
    generator, identity = parts
    torch.manual_seed(1)
    encoder = Head3DEncoder(head3d_encoder_config(generator.backbone.num_ws, generator.w_dim, 128, **TINY_ENCODER))
    with torch.no_grad():
        encoder.w_avg.copy_(generator.backbone.mapping.w_avg)
    return Head3DPipeline(generator, Runtime("cpu"), model_name="tiny-random", encoder=encoder, identity=identity)


def test_photo_path_inverts_refines_and_meshes(pipeline, tmp_path):
    plain = pipeline.invert(EXAMPLE_PHOTOS[0])
    refined = pipeline.invert(EXAMPLE_PHOTOS[0], refine_steps=2)
    assert plain.aligned.shape == (128, 128, 3) and -90 < plain.yaw < 90
    assert plain.reconstruction.shape == (128, 128, 3) and -1 <= plain.identity_similarity <= 1
    assert refined.refine_steps == 2 and not torch.equal(plain.ws, refined.ws)
    result = pipeline(photo=EXAMPLE_PHOTOS[0], yaws=(0,), pitches=(0,), turntable_frames=1, mesh_resolution=32,
                      mesh_level=0.0, face_budget=500, output_dir=tmp_path)
    assert result.inversion is not None and result.provenance.seed is None
    assert result.provenance.parameters["latent"] == "photo" and "inversion_s" in result.timings
    np.testing.assert_allclose(result.orbit[0, 0], plain.frontal, atol=2)  # batched renders: rounding
    assert result.glb_path is not None and result.glb_path.exists()


def test_photo_path_needs_the_encoder(parts):
    from core.weights import WeightsError

    with pytest.raises(WeightsError, match="encoder"):
        Head3DPipeline(parts[0], Runtime("cpu"), identity=parts[1]).invert(EXAMPLE_PHOTOS[0])


def test_evaluation_produces_numbers(pipeline):
    crops = [np.asarray(Image.open(path).convert("RGB").resize((128, 128)))
             for path in EXAMPLE_PHOTOS[:2]]
    metrics = evaluate(pipeline, crops, seeds=2, photos=1, refine_steps=(0, 1))
    assert 0 <= metrics["face_detection_rate"] <= 1 and 0 <= metrics["nose_in_front_rate"] <= 1
    for key in ("identity_consistency", "nose_depth_margin", "fd_id"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fd_id"] >= 0 and [row["refine_steps"] for row in metrics["inversion"]] == [0, 1]
    assert all(np.isfinite(row["identity"]) and row["photos"] == 1 for row in metrics["inversion"])
    assert metrics["same_person_rate"] == 0  # random renders show no face: never the same person
    assert all(row["same_person_rate"] == 0 for row in metrics["inversion"])  # nor a random inversion the photo's
    assert metrics["distinct_people_rate_test_crops"] == 1.0  # the two example photos are two people
    assert -1 <= metrics["identity_between_seeds"] <= 1 and metrics["identity_between_test_crops"] < 0.95
    assert "different seeds' frontal renders" in card_section(metrics)
    section = encoder_card_section({**metrics, "generator": "tiny-random"})
    assert section.count("photo inversion: same person") == 2 and "1 refinement steps" in section
    alone = evaluate(pipeline, crops, seeds=0, photos=1)
    assert "fd_id" not in alone and len(alone["inversion"]) == 1
