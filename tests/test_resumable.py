"""Resumable training: a checkpoint restores modules, optimizers and RNG so a resumed run equals an unbroken one."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from training.resumable import Deadline, load_checkpoint, save_checkpoint


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.0, 0.99))
    return model, optimizer


def _train(model, optimizer, steps):
    for _ in range(steps):
        x = torch.randn(16, 8)  # draws from the global RNG, which the checkpoint must restore
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_resumed_run_equals_unbroken_run(tmp_path):
    model, optimizer = _setup()
    _train(model, optimizer, 10)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer = _setup()
    _train(model, optimizer, 4)
    save_checkpoint(tmp_path / "ckpt", 4, {"net": model}, {"net": optimizer}, extra={"kimg": 0.064},
                    max_shard_bytes=8192)
    assert len(list((tmp_path / "ckpt").glob("tensors-*.safetensors"))) > 1  # sharded
    _train(model, optimizer, 3)  # diverge, then come back

    model, optimizer = _setup()
    step, extra = load_checkpoint(tmp_path / "ckpt", {"net": model}, {"net": optimizer})
    assert step == 4 and extra == {"kimg": 0.064}
    _train(model, optimizer, 6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_compressed_copies_load_into_float32_modules(tmp_path):
    model, optimizer = _setup()
    _train(model, optimizer, 2)
    ema = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    ema.load_state_dict(model.state_dict())
    save_checkpoint(tmp_path / "c", 2, {"ema": ema}, {"net": optimizer},
                    module_dtypes={"ema": torch.float16}, moment_dtype=torch.bfloat16)
    restored = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    fresh_model, fresh_optimizer = _setup()
    load_checkpoint(tmp_path / "c", {"ema": restored}, {"net": fresh_optimizer})
    assert restored[0].weight.dtype == torch.float32
    assert torch.allclose(restored[0].weight, ema[0].weight, atol=1e-3)
    state = fresh_optimizer.state_dict()["state"][0]
    assert state["exp_avg_sq"].dtype == torch.float32 and float(state["step"]) == 2.0


def test_checkpoint_replacement_keeps_other_run_files_and_missing_is_none(tmp_path):
    model, optimizer = _setup()
    assert load_checkpoint(tmp_path / "none", {"net": model}) is None
    save_checkpoint(tmp_path / "ckpt", 1, {"net": model})
    (tmp_path / "ckpt" / "log.jsonl").write_text("{}\n")
    first_shards = sorted(p.name for p in (tmp_path / "ckpt").glob("tensors-*"))
    save_checkpoint(tmp_path / "ckpt", 2, {"net": model})
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["step"] == 2
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == sorted(["log.jsonl", "state.json", *state["shard_files"]])  # old shards gone, the log kept
    assert not set(first_shards) & set(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_oversized_tensor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="larger than a shard"):
        save_checkpoint(tmp_path / "c", 0, {"net": nn.Linear(100, 100)}, max_shard_bytes=1000)


def test_deadline_reserves_time_for_saving(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("training.resumable.time.monotonic", lambda: now[0])
    deadline = Deadline(600, reserve_s=30)
    now[0] += 569
    assert not deadline.expired()
    now[0] += 1
    assert deadline.expired()
    with pytest.raises(ValueError):
        Deadline(10, reserve_s=20)


def test_skipped_optimizer_state_is_not_stored_and_comes_back_as_zeros(tmp_path):
    model, optimizer = _setup()
    _train(model, optimizer, 2)
    save_checkpoint(tmp_path / "c", 2, {"net": model}, {"net": optimizer}, skip_state=("exp_avg",))
    fresh_model, fresh_optimizer = _setup()
    load_checkpoint(tmp_path / "c", {"net": fresh_model}, {"net": fresh_optimizer})
    restored = fresh_optimizer.state_dict()["state"][0]
    assert torch.equal(restored["exp_avg"], torch.zeros_like(restored["exp_avg"]))
    assert torch.equal(restored["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])
    assert "exp_avg" in optimizer.state_dict()["state"][0]  # the live optimizer is untouched
