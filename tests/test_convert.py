"""Safe checkpoint conversion: official-layout pickles and plain state dicts, without running pickled code.

The pickles are made here with stand-ins that mimic the official layout (`torch_utils.persistence`
objects pickled as `_reconstruct_persistent_obj(meta)`, `dnnlib.util.EasyDict` kwargs, numpy
scalars, plain `torch.nn` submodules); no third-party code is involved.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.convert import (
    OpaqueObject,
    PersistentObject,
    UnsafePickleError,
    convert_network_pickle,
    main,
    module_state_dict,
    safe_load_pickle,
)
from core.nets import load_generator
from core.nets.stylegan2 import FullyConnectedLayer, Generator

torch.set_num_threads(2)

TINY_KWARGS = {"z_dim": 8, "c_dim": 3, "w_dim": 8, "img_resolution": 16, "img_channels": 3,
               "mapping_kwargs": {"num_layers": 2},
               "synthesis_kwargs": {"channel_base": 64, "channel_max": 8, "num_fp16_res": 2, "conv_clamp": 256}}


def fake_official_modules(monkeypatch, marker) -> types.SimpleNamespace:
    """Fake `torch_utils.persistence` / `dnnlib.util` modules so pickles reference the official globals; `wrap`
    turns one of our modules into its official-layout stand-in, whose embedded source would create `marker`."""

    def _reconstruct_persistent_obj(meta):  # never called by the safe loader
        raise AssertionError("official reconstruct function must not run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    easy_dict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict = easy_dict
    for name, module in {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                         "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}.items():
        monkeypatch.setitem(sys.modules, name, module)

    class Persistent:
        """Pickles like a persistent-class instance: reconstruct function + meta with module source."""

        def __init__(self, class_name, state):
            self.class_name, self.state = class_name, state

        def __reduce__(self):
            meta = {"type": "class", "version": 4, "class_name": self.class_name, "state": self.state,
                    "module_src": f"open({str(marker)!r}, 'w').write('ran')\n"}
            return (_reconstruct_persistent_obj, (meta,))

    def wrap(module, init_kwargs=None):
        """Persistent stand-in for our modules; plain torch.nn containers stay plain (as in EG3D's decoder)."""
        children = OrderedDict((name, wrap(child)) for name, child in module._modules.items())
        state = dict(module.__dict__, _modules=children)
        if type(module).__module__.startswith("torch.nn"):
            plain = type(module).__new__(type(module))
            plain.__dict__.update(state)
            return plain
        state["numpy_gain"] = np.float64(0.5)  # official layers store numpy scalars
        if init_kwargs is not None:
            state["init_args"] = ()
            state["init_kwargs"] = easy_dict(init_kwargs)
        return Persistent(f"training.networks.{type(module).__name__}", state)

    return types.SimpleNamespace(wrap=wrap, easy_dict=easy_dict, marker=marker)


@pytest.fixture
def official_layout(monkeypatch, tmp_path):
    return fake_official_modules(monkeypatch, tmp_path / "source_was_executed")


def write_network_pickle(path, official_layout, generator, init_kwargs):
    """An official-layout network pickle with `generator` as G_ema."""
    data = {"G": None, "D": None, "augment_pipe": None,
            "G_ema": official_layout.wrap(generator, init_kwargs),
            "training_set_kwargs": official_layout.easy_dict(path="ffhq.zip", resolution=16)}
    with open(path, "wb") as f:
        pickle.dump(data, f)


def test_network_pickle_round_trip(tmp_path, official_layout):
    torch.manual_seed(0)
    generator = Generator(**TINY_KWARGS).eval()
    for name, buf in generator.named_buffers():  # make buffers distinctive
        buf.add_(torch.rand_like(buf))
    pkl = tmp_path / "network-snapshot.pkl"
    write_network_pickle(pkl, official_layout, generator, TINY_KWARGS)

    state_dict, config = convert_network_pickle(pkl)
    assert not official_layout.marker.exists()
    assert list(state_dict) == list(generator.state_dict())
    assert config["kind"] == "stylegan2" and config["init_kwargs"] == TINY_KWARGS
    assert config["class_name"] == "training.networks.Generator"

    out = tmp_path / "converted"
    assert main([str(pkl), str(out)]) == 0
    assert not official_layout.marker.exists()
    saved = load_file(out / "model.safetensors")
    for name, tensor in generator.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    assert json.loads((out / "config.json").read_text())["kind"] == "stylegan2"
    loaded = load_generator(out)
    z, c = torch.randn(2, 8), torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(loaded(z, c, noise_mode="const"), generator(z, c, noise_mode="const"))


def test_half_precision_output(tmp_path, official_layout):
    generator = Generator(**TINY_KWARGS).eval()
    pkl = tmp_path / "net.pkl"
    write_network_pickle(pkl, official_layout, generator, TINY_KWARGS)
    out = tmp_path / "half"
    main([str(pkl), str(out), "--half"])
    saved = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in saved.values())
    loaded = load_generator(out)
    assert loaded.synthesis.b4.const.dtype == torch.float32
    assert torch.allclose(loaded.synthesis.b4.const, generator.synthesis.b4.const, atol=1e-2)


class _Decoder(torch.nn.Module):
    """Like EG3D's OSGDecoder: persistent layers inside a plain torch.nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(FullyConnectedLayer(4, 6), torch.nn.Softplus(), FullyConnectedLayer(6, 2))
        self.register_buffer("scratch", torch.ones(3), persistent=False)


def test_plain_torch_nn_submodules_become_inert_stand_ins(tmp_path, official_layout):
    decoder = _Decoder()
    pkl = tmp_path / "decoder.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"G_ema": official_layout.wrap(decoder, {})}, f)
    loaded = safe_load_pickle(pkl)["G_ema"]
    assert isinstance(loaded, PersistentObject)
    assert isinstance(loaded.state["_modules"]["net"], OpaqueObject)
    assert loaded.state["_modules"]["net"].qualified_name == "torch.nn.modules.container.Sequential"
    got = module_state_dict(loaded)
    expected = decoder.state_dict()
    assert list(got) == list(expected) and "scratch" not in got
    assert all(torch.equal(got[k], expected[k]) for k in expected)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["shell", "eval"])
def test_code_running_pickle_is_refused(tmp_path, official_layout, payload):
    marker = tmp_path / "pwned"
    evil = _RunsShell(marker) if payload == "shell" else _CallsEval()
    generator = Generator(**TINY_KWARGS)
    wrapped = official_layout.wrap(generator, TINY_KWARGS)
    wrapped.state["innocent_looking"] = evil
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"G_ema": wrapped}, f)
    with pytest.raises(UnsafePickleError, match="refusing"):
        main([str(pkl), str(tmp_path / "out")])
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_plain_state_dict_with_config(tmp_path):
    generator = Generator(**TINY_KWARGS)
    pt = tmp_path / "stylized.pth"
    torch.save({"G_ema": generator.state_dict()}, pt)
    cfg = tmp_path / "manifest.json"
    cfg.write_text(json.dumps({"class_name": "training.networks.Generator", "init_kwargs": TINY_KWARGS}))
    out = tmp_path / "out"
    assert main([str(pt), str(out), "--config", str(cfg), "--key", "G_ema", "--base", "sg2-base"]) == 0
    assert json.loads((out / "config.json").read_text())["base"] == "sg2-base"
    loaded = load_generator(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in generator.state_dict().items())


def test_plain_state_dict_shape_mismatch_and_pickled_module_are_rejected(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"kind": "stylegan2", "init_kwargs": TINY_KWARGS}))
    wrong = Generator(**{**TINY_KWARGS, "w_dim": 16})
    torch.save(wrong.state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit"):
        main([str(tmp_path / "wrong.pt"), str(tmp_path / "o1"), "--config", str(cfg)])
    torch.save(Generator(**TINY_KWARGS), tmp_path / "module.pt")  # a whole pickled module, not weights
    with pytest.raises(pickle.UnpicklingError):
        main([str(tmp_path / "module.pt"), str(tmp_path / "o2"), "--config", str(cfg)])
