"""The CUDA mixed-precision training paths, run on CPU: fp16 blocks of G and D compute in float16 (as on the GPU
machine, where no test runs) and a training step stays finite with float32 master weights.

The network and trainer tests also run this way with FACE_SUITE_FP16_ON_CPU=1 (float16 convolutions are slow on
CPU: over 40 minutes here). Done on 2026-11-21: no dtype error anywhere; what failed were the comparisons with
float32 references at float32 tolerances (up to 7e-3 apart, as float16 should be) and the AgileGAN3D exemplar study,
whose 5-minute budget ran out before its last stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.nets import stylegan2
from training.resumable import Deadline
from training.train_head3d import Head3DTrainer
from training.train_stylegan2 import StyleGAN2Trainer, TrainConfig, TrainingImages, train as train_stylegan2
from tests.test_head3d import TINY as HEAD3D_TINY, _tiny_data as head3d_data


def _record_block_dtypes(*networks: torch.nn.Module) -> dict[str, set[torch.dtype]]:
    """Hook every block with a `use_fp16` flag; returns {block name: dtypes of its outputs} filled as they run."""
    seen: dict[str, set[torch.dtype]] = {}
    for network in networks:
        for name, module in network.named_modules():
            if hasattr(module, "use_fp16"):
                key = f"{type(network).__name__}.{name}.{'fp16' if module.use_fp16 else 'fp32'}"

                def hook(_module, _inputs, output, key=key):
                    first = output[0] if isinstance(output, tuple) else output
                    seen.setdefault(key, set()).add(first.dtype)

                module.register_forward_hook(hook)
    return seen


def _assert_precision(seen: dict[str, set[torch.dtype]]) -> None:
    fp16 = {key: dtypes for key, dtypes in seen.items() if key.endswith(".fp16")}
    fp32 = {key: dtypes for key, dtypes in seen.items() if key.endswith(".fp32")}
    assert fp16 and all(dtypes == {torch.float16} for dtypes in fp16.values()), fp16
    assert fp32 and all(dtypes == {torch.float32} for dtypes in fp32.values()), fp32


def _assert_finite_log(run_dir) -> None:
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("loss_G", "loss_D"):
            assert np.isfinite(record[key]), (key, record)


@pytest.fixture
def float16_blocks(fp16_on_cpu):
    assert stylegan2.block_dtype(True, False, torch.device("cpu")) == torch.float16


def test_stylegan2_step_runs_fp16_blocks_in_float16(float16_blocks, tmp_path):
    config = TrainConfig(resolution=16, z_dim=16, w_dim=16, channel_base=128, channel_max=16, batch=4, mbstd_group=2,
                         r1_interval=2, augment_p=0.3, ada_interval=1, ema_kimg=0.01, num_fp16_res=2,
                         conv_clamp=256)
    images = torch.randint(0, 256, [8, 3, 16, 16], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    trainer = StyleGAN2Trainer(config, TrainingImages(images, None, None))
    seen = _record_block_dtypes(trainer.G.synthesis, trainer.D)
    train_stylegan2(trainer, tmp_path / "run", Deadline(600, 1), max_steps=2, log_every=1)  # step 0 has R1
    _assert_precision(seen)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.G.parameters())
    _assert_finite_log(tmp_path / "run")
    with torch.no_grad():
        image = trainer.G_ema(torch.randn(2, 16), None, noise_mode="const")
    assert image.dtype == torch.float32 and torch.isfinite(image).all()


def test_head3d_generator_and_discriminator_run_fp16_blocks_in_float16(float16_blocks):
    """The 3D trainer's own pieces: render, dual discriminator and its loss gradients (a whole step in float16 takes
    minutes on this CPU; the trainer's loop and R1 through fp16 blocks are covered by the StyleGAN2 test)."""
    trainer = Head3DTrainer(HEAD3D_TINY, head3d_data())
    seen = _record_block_dtypes(trainer.G, trainer.D)
    cameras, conditioning, _ = trainer._fake_cameras(0)
    render, shifted, _ = trainer._generate(trainer.G, cameras, conditioning)
    logits = trainer._discriminate(render["image"], render["image_raw"], shifted)
    torch.nn.functional.softplus(-logits).mean().backward()
    _assert_precision(seen)
    assert render["image"].dtype == torch.float32 and logits.dtype == torch.float32
    grads = [p.grad for p in [*trainer.G.parameters(), *trainer.D.parameters()] if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
