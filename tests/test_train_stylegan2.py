"""StyleGAN2 trainer: discriminator, differentiable augmentation, resumable tiny training runs, export, size budget."""

from __future__ import annotations

import json

import pytest
import torch

from core.nets import load_generator
from training import train_stylegan2 as trainer_module
from training.augment import AdaptiveProbability, augment, parse_operations
from training.discriminator import Discriminator
from training.resumable import Deadline
from training.train_stylegan2 import (
    LOG_FILE,
    SAMPLES_FILE,
    StyleGAN2Trainer,
    TrainConfig,
    TrainingImages,
    images_from_dataset,
    nan_to_num_grads,
    train,
)

torch.set_num_threads(2)

TINY = dict(resolution=16, z_dim=16, w_dim=16, channel_base=128, channel_max=16, batch=4, mbstd_group=2,
            r1_interval=2, augment_p=0.3, ada_interval=1, ada_kimg=1.0, ema_kimg=0.01)


def _random_images(count=8, size=16, c_dim=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, [count, 3, size, size], dtype=torch.uint8, generator=generator)
    labels = torch.randn([count, c_dim], generator=generator) if c_dim else None
    return TrainingImages(images, labels, -labels if c_dim else None)


def _run(tmp_path, name, steps, **kwargs):
    return train(kwargs.pop("trainer"), tmp_path / name, Deadline(600, 1), max_steps=steps, log_every=1, **kwargs)


# ---- discriminator ---------------------------------------------------------------------------------------------


def test_discriminator_names_and_shapes():
    torch.manual_seed(0)
    D = Discriminator(c_dim=0, img_resolution=32, img_channels=3, channel_base=256, channel_max=32)
    keys = set(D.state_dict())
    assert {"b32.fromrgb.weight", "b32.conv0.weight", "b32.conv1.weight", "b32.skip.weight", "b8.conv1.bias",
            "b4.conv.weight", "b4.fc.weight", "b4.out.weight"} <= keys
    assert not any(k.startswith(("b16.fromrgb", "mapping.")) for k in keys)
    assert D.b32.conv0.weight.shape == (8, 8, 3, 3) and D.b4.conv.weight.shape == (32, 33, 3, 3)  # +1 mbstd channel
    logits = D(torch.randn(4, 3, 32, 32), None)
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()


def test_discriminator_projection_conditioning():
    torch.manual_seed(0)
    D = Discriminator(c_dim=5, img_resolution=16, img_channels=3, channel_base=128, channel_max=16,
                      mapping_kwargs=dict(num_layers=2))
    assert D.mapping.embed.weight.shape == (16, 5) and D.b4.out.weight.shape == (16, 16)  # cmap_dim = channels[4]
    images, c = torch.randn(4, 3, 16, 16), torch.randn(4, 5)
    logits = D(images, c)
    assert logits.shape == (4, 1)
    assert not torch.allclose(logits, D(images, torch.randn(4, 5)))
    assert torch.autograd.grad(D(images, c).sum(), D.mapping.embed.weight)[0].abs().sum() > 0


def test_minibatch_stddev_channel_is_constant_per_sample():
    D = Discriminator(c_dim=0, img_resolution=8, img_channels=3, channel_base=64, channel_max=8,
                      epilogue_kwargs=dict(mbstd_group_size=2))
    x = torch.randn(4, 8, 4, 4)
    y = D.b4.mbstd(x)
    assert y.shape == (4, 9, 4, 4) and torch.equal(y[:, :8], x)
    assert torch.allclose(y[:, 8], y[:, 8, :1, :1].expand(4, 4, 4))
    assert torch.equal(y[0, 8], y[2, 8]) and not torch.equal(y[0, 8], y[1, 8])  # groups {0, 2} and {1, 3}


# ---- augmentation ----------------------------------------------------------------------------------------------


def test_augment_is_differentiable_and_keeps_shape():
    torch.manual_seed(0)
    images = (torch.rand(6, 3, 16, 16) * 2 - 1).requires_grad_(True)
    out = augment(images, 1.0, parse_operations("color,translation,cutout"))
    assert out.shape == images.shape and torch.isfinite(out).all()
    (gradient,) = torch.autograd.grad(out.square().sum(), images)
    assert gradient.abs().sum() > 0
    assert augment(images, 0.0) is images


def test_augment_ranges():
    torch.manual_seed(0)
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    for name in ("translation", "cutout"):  # pixels are moved or zeroed, never invented
        out = augment(images, 1.0, (name,))
        assert out.abs().max() <= 1 and (out == 0).any()
        assert not torch.equal(out, images)
    colour = augment(images, 1.0, parse_operations("color"))
    assert colour.abs().max() <= (1 + 0.5) * 2 * 1.5 * 2  # brightness, saturation x2, contrast x1.5 bounds
    assert not torch.allclose(colour, images)
    with pytest.raises(ValueError):
        parse_operations("color,rotate")


def test_adaptive_probability_follows_rt():
    ada = AdaptiveProbability(p=0.5, target=0.6, adjust_kimg=1.0)
    ada.observe(torch.ones(100, 1))  # D sure of every real: overfitting, raise p
    assert ada.update(100) == 1.0 and ada.p == pytest.approx(0.6)
    ada.observe(-torch.ones(100, 1))
    ada.update(1000)
    assert ada.p == 0.0  # clamped
    fixed = AdaptiveProbability(p=0.2, target=None)
    fixed.observe(torch.ones(4, 1))
    fixed.update(1000)
    assert fixed.p == 0.2


# ---- training, resume, export ----------------------------------------------------------------------------------


def test_dataset_adapter_accepts_chw_hwc_and_labels():
    chw = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8) for _ in range(3)]
    data = images_from_dataset([(image.permute(1, 2, 0).numpy(), [1.0, 2.0]) for image in chw])
    assert torch.equal(data.images, torch.stack(chw)) and data.c_dim == 2
    assert images_from_dataset(chw).labels is None


def test_resumed_run_equals_unbroken_run(tmp_path):
    config = TrainConfig(**TINY)
    data = _random_images()
    unbroken = StyleGAN2Trainer(config, data)
    _run(tmp_path, "unbroken", 3, trainer=unbroken, compact=False)

    first = StyleGAN2Trainer(config, data)
    _run(tmp_path, "resumed", 2, trainer=first, compact=False)
    resumed = StyleGAN2Trainer(config, data)
    assert resumed.load(tmp_path / "resumed") and resumed.step_count == 2
    assert resumed.ada.p == first.ada.p != config.augment_p  # p adapted and restored
    _run(tmp_path, "resumed", 1, trainer=resumed, compact=False)
    assert resumed.step_count == 3
    for name in ("G", "D", "G_ema"):
        expected = getattr(unbroken, name).state_dict()
        for key, value in getattr(resumed, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key}"

    files = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert len(files) <= 8 and LOG_FILE in files and SAMPLES_FILE in files and "state.json" in files
    log = [json.loads(line) for line in (tmp_path / "resumed" / LOG_FILE).read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3]  # the log survives checkpoint saves
    assert {"loss_G", "loss_D", "augment_p", "images_per_s", "kimg"} <= set(log[-1]) and "r1_penalty" in log[0]


def test_compact_checkpoint_resumes_and_exports_conditional(tmp_path):
    config = TrainConfig(**TINY, c_dim=3, pl_weight=1.0, pl_interval=1)
    data = _random_images(c_dim=3)
    trainer = StyleGAN2Trainer(config, data)
    _run(tmp_path, "run", 2, trainer=trainer)
    resumed = StyleGAN2Trainer(config, data)
    assert resumed.load(tmp_path / "run") and resumed.step_count == 2
    for key, value in resumed.G_ema.state_dict().items():  # float16 copies, loaded strictly into float32 modules
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, trainer.G_ema.state_dict()[key], rtol=1e-3, atol=1e-3)
    assert all("exp_avg" in state and "exp_avg_sq" in state for state in resumed.opt_G.state.values())
    stats = resumed.step()
    assert resumed.step_count == 3 and all(torch.isfinite(torch.as_tensor(v)) for v in stats.values())

    resumed.export(tmp_path / "export")
    G = load_generator(tmp_path / "export")
    images = G(torch.randn(2, config.z_dim), torch.randn(2, 3), noise_mode="const")
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert torch.equal(G.mapping.w_avg, resumed.G_ema.mapping.w_avg.half().float())
    card = (tmp_path / "export" / "README.md").read_text()
    assert "3 steps" in card


def test_command_line_trains_resumes_and_exports(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "images_from_archive", lambda path, split, label_key: _random_images())
    tiny = ["--z-dim", "16", "--w-dim", "16", "--channel-base", "128", "--channel-max", "16", "--batch", "4",
            "--mbstd-group", "2", "--mirror", "false", "--ada-target", "none", "--log-every", "1", "--device", "cpu"]
    run = str(tmp_path / "run")
    trainer_module.main(["--data", "faces16.npz", "--run", run, "--steps", "2", *tiny])
    record = json.loads((tmp_path / "run" / LOG_FILE).read_text().splitlines()[-1])
    assert record["nonfinite_grads_G"] == record["nonfinite_grads_D"] == 0
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 2 and state["extra"]["config"]["mirror"] is False
    assert state["extra"]["config"]["ada_target"] is None and state["extra"]["config"]["resolution"] == 16
    trainer_module.main(["--data", "faces16.npz", "--run", run, "--steps", "1", "--export", str(tmp_path / "g")])
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 3
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["kind"] == "stylegan2" and config["training"]["steps"] == 3
    assert load_generator(tmp_path / "g")(torch.randn(1, 16), None).shape == (1, 3, 16, 16)


def test_base_config_checkpoint_fits_the_transfer_budget(tmp_path):
    trainer = StyleGAN2Trainer(TrainConfig(), data=None)
    for optimizer in (trainer.opt_G, trainer.opt_D):  # the state Adam holds after its first step
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                optimizer.state[parameter] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(parameter),
                                              "exp_avg_sq": torch.zeros_like(parameter)}
    trainer.save(tmp_path / "run")
    shards = sorted((tmp_path / "run").glob("tensors-*.safetensors"))
    sizes = [path.stat().st_size for path in shards]
    assert 1 <= len(shards) <= 4 and max(sizes) <= 16 * 2**20
    assert sum(sizes) <= 24 * 2**20, f"{sum(sizes) / 2**20:.1f} MiB"
    restored = StyleGAN2Trainer(TrainConfig(), data=None)
    assert restored.load(tmp_path / "run")


def test_nan_to_num_grads_reports_the_nonfinite_fraction():
    module = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    module.weight.grad = torch.tensor([[1.0, float("nan"), 2.0], [float("inf"), 0.0, -1.0]])
    module.bias.grad = torch.tensor([float("-inf"), 3.0])
    assert float(nan_to_num_grads(module)) == pytest.approx(3 / 8)
    assert module.weight.grad.tolist() == [[1.0, 0.0, 2.0], [1e5, 0.0, -1.0]] and module.bias.grad[0] == -1e5
    assert float(nan_to_num_grads(module)) == 0
    assert float(nan_to_num_grads(torch.nn.Linear(2, 2))) == 0  # no gradients yet
