"""Runtime: device/dtype policy, LRU model cache, finite-output check with float32 retry, GPU decorator."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core import weights as W
from core.runtime import NonFiniteOutputError, Runtime, all_finite, dtype_for, gpu, select_device


def test_dtype_policy():
    assert dtype_for(torch.device("cpu"), fp16_safe=True) == torch.float32
    assert dtype_for(torch.device("cuda"), fp16_safe=True) == torch.float16
    assert dtype_for(torch.device("cuda"), fp16_safe=False) == torch.float32


def test_cuda_request_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        select_device("cuda")
    assert select_device(None).type == "cpu"


def test_all_finite_walks_nested_outputs():
    good = {"image": torch.zeros(2), "extras": [torch.ones(1), 3, "text"]}
    assert all_finite(good)
    assert not all_finite({"image": torch.tensor([0.0, float("nan")])})
    assert not all_finite((torch.tensor([float("inf")]),))
    assert all_finite(torch.tensor([1, 2]))  # integers are always finite


@pytest.fixture()
def registry(tmp_path):
    weights_dir = tmp_path / "weights"
    for name in ("a", "b", "c"):
        folder = weights_dir / name
        folder.mkdir(parents=True)
        save_file({"weight": torch.ones(2, 2, dtype=torch.float16)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"features": 2}))
        W.main(["register", str(folder), "--name", name, "--licence", "MIT",
                "--registry", str(weights_dir / "registry.json")])
    return W.Registry.load(weights_dir / "registry.json")


def _build_linear(config, state_dict):
    module = nn.Linear(config["features"], config["features"], bias=False)
    module.load_state_dict(state_dict)
    return module


def test_models_load_lazily_in_eval_float32_and_are_evicted_lru(registry):
    runtime = Runtime("cpu", max_resident_models=2, registry=registry)
    a = runtime.get_model("a", _build_linear)
    assert a.weight.dtype == torch.float32 and not a.training and not a.weight.requires_grad
    assert runtime.get_model("a", _build_linear) is a
    runtime.get_model("b", _build_linear)
    runtime.get_model("a", _build_linear)  # a becomes most recent
    runtime.get_model("c", _build_linear)  # evicts b
    assert runtime.resident_models == ["a", "c"]


def test_run_retries_once_in_float32_then_raises(monkeypatch):
    runtime = Runtime("cpu", registry=W.Registry([]))
    monkeypatch.setattr(runtime, "dtype", lambda fp16_safe=True: torch.float16 if fp16_safe else torch.float32)
    seen = []

    def flaky(dtype):
        seen.append(dtype)
        return torch.tensor([float("nan")]) if dtype == torch.float16 else torch.ones(1)

    assert runtime.run(flaky).item() == 1.0
    assert seen == [torch.float16, torch.float32]

    with pytest.raises(NonFiniteOutputError, match="NaN/Inf"):
        runtime.run(lambda dtype: torch.tensor([float("inf")]), what="the generator")


def test_run_uses_inference_mode_unless_grad_is_asked():
    runtime = Runtime("cpu", registry=W.Registry([]))
    assert runtime.run(lambda dtype: torch.is_inference_mode_enabled()) is True
    assert runtime.run(lambda dtype: torch.is_inference_mode_enabled(), grad=True) is False


def test_gpu_decorator_is_a_no_op_off_zerogpu(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def generate(x):
        return x + 1

    assert gpu(30)(generate)(1) == 2


def test_describe_reports_device_and_dtype():
    described = Runtime("cpu", registry=W.Registry([])).describe()
    assert described["device"].startswith("cpu") and described["dtype"] == "float32"


def test_default_cache_holds_the_largest_tab(monkeypatch, registry):
    from core.runtime import DEFAULT_MAX_RESIDENT_MODELS

    monkeypatch.delenv("FACE_SUITE_MAX_MODELS", raising=False)
    assert Runtime("cpu", registry=registry).max_resident_models == DEFAULT_MAX_RESIDENT_MODELS
    assert DEFAULT_MAX_RESIDENT_MODELS >= 5 + 3  # beauty's five models, and the 3D tabs' generator, encoder, style
