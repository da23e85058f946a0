"""Style deltas: only changed tensors are kept, low-rank changes are exact, the delta round-trips through files."""

from __future__ import annotations

import copy
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


def test_a_companion_module_travels_as_a_named_part(tmp_path):
    from core.nets.encoders import Head3DEncoder, head3d_encoder_config

    base, tuned = _pair()
    torch.manual_seed(1)
    encoder = Head3DEncoder(head3d_encoder_config(4, 8, 32, channels=[4, 4, 4], pyramid_channels=4, head_channels=2,
                                                  head_grid=2, head_hidden=4))
    tuned_encoder = copy.deepcopy(encoder)
    with torch.no_grad():
        for parameter in tuned_encoder.heads.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    part = make_style_delta(encoder, tuned_encoder, "encoder-model", rank=None)
    assert part.changes() and all(name.startswith("heads.") for name in part.changes())  # frozen tensors dropped
    folder = save_style_delta(make_style_delta(base, tuned, "generator-model", rank=2), tmp_path / "style",
                              parts={"encoder": part})
    config = json.loads((folder / "config.json").read_text())
    assert config["base"] == "generator-model"
    assert config["parts"] == {"encoder": {"kind": "style_delta", "base": "encoder-model", "rank": None,
                                           "file": "encoder.safetensors"}}
    reloaded = build_style_delta(config["parts"]["encoder"], load_file(str(folder / "encoder.safetensors")))
    styled = apply_style_delta(encoder, reloaded)
    images, cameras = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 25)
    with torch.no_grad():
        torch.testing.assert_close(styled(images, cameras), tuned_encoder(images, cameras), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="part name"):
        save_style_delta(part, tmp_path / "bad", parts={"model": part})
    with pytest.raises(ValueError, match="shapes"):
        apply_style_delta(Head3DEncoder(head3d_encoder_config(4, 8, 32, channels=[4, 4, 4], pyramid_channels=4,
                                                              head_channels=2, head_grid=2, head_hidden=6)),
                          reloaded)
