"""Style deltas: only changed tensors are kept, low-rank changes are exact, the delta round-trips through files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from core.nets.style_delta import apply_style_delta, build_style_delta, make_style_delta, save_style_delta


def _pair():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4))
    tuned = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4))
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned[0].weight += 0.1 * torch.outer(torch.randn(16), torch.randn(8 * 9)).reshape(16, 8, 3, 3)  # rank 1
        tuned[0].bias += 0.05
    return base, tuned


def test_unchanged_tensors_are_dropped_and_low_rank_changes_are_exact():
    base, tuned = _pair()
    delta = make_style_delta(base, tuned, "base-model", rank=2)
    assert set(delta.changes()) == {"0.weight", "0.bias"}
    assert set(delta.tensors()) == {"0.weight.up", "0.weight.down", "0.bias.delta"}
    styled = apply_style_delta(base, delta)
    for key, value in tuned.state_dict().items():
        assert torch.allclose(styled.state_dict()[key].float(), value.float(), atol=1e-5), key
    assert not torch.equal(base[0].weight, styled[0].weight)  # the base itself is untouched


def test_full_rank_changes_are_approximated_by_their_leading_modes():
    base, tuned = _pair()
    with torch.no_grad():
        tuned[2].weight += 0.1 * torch.randn_like(tuned[2].weight)
    low = apply_style_delta(base, make_style_delta(base, tuned, "b", rank=1))
    full = apply_style_delta(base, make_style_delta(base, tuned, "b", rank=None))
    assert torch.allclose(full[2].weight, tuned[2].weight, atol=1e-6)
    error_low = (low[2].weight - tuned[2].weight).norm()
    assert 0 < error_low < (base[2].weight - tuned[2].weight).norm()


def test_files_round_trip_in_float16(tmp_path):
    base, tuned = _pair()
    folder = save_style_delta(make_style_delta(base, tuned, "head3d-faces128", rank=2), tmp_path / "style",
                              extra_config={"style": "sketch"})
    config = json.loads((folder / "config.json").read_text())
    assert config == {"kind": "style_delta", "base": "head3d-faces128", "rank": 2, "style": "sketch"}
    tensors = load_file(str(folder / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    styled = apply_style_delta(base, build_style_delta(config, tensors))
    assert torch.allclose(styled[0].weight, tuned[0].weight, atol=2e-3)
    with pytest.raises(ValueError, match="style_delta"):
        build_style_delta({"kind": "stylegan2"}, tensors)


def test_mismatched_architectures_are_refused():
    base, _ = _pair()
    with pytest.raises(ValueError, match="different state-dict keys"):
        make_style_delta(base, nn.Linear(2, 2), "b")
