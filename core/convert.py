"""Convert official generator checkpoints to `model.safetensors` + `config.json` without running their code.

    python -m core.convert <official.pkl | state_dict.pt> <out_dir> [--kind K] [--key G_ema]
                           [--config manifest.json] [--base NAME] [--half]

Network pickles of NVlabs/stylegan2-ada-pytorch, NVlabs/eg3d and SizheAn/PanoHead hold
{'G', 'D', 'G_ema', 'training_set_kwargs', 'augment_pipe'}; their modules are
`torch_utils.persistence` objects pickled as `_reconstruct_persistent_obj(meta)` with
meta = {'type': 'class', 'version', 'module_src', 'class_name', 'state': module.__dict__}.
Unpickling them normally executes `module_src`. `SafeUnpickler` never does: it maps the few
globals such files need onto inert data-only stand-ins (`PersistentObject`, `OpaqueObject`,
`EasyDict`), rebuilds tensors through `torch.load(weights_only=True)`, and refuses every other
global (`os.system`, `builtins.eval`, ...). The state dict is then read from the module tree
(`_parameters`, persistent `_buffers`, `_modules`) in `state_dict()` order.

Plain `torch.save` state dicts (e.g. stylized PanoHead `.pth` files) are read with
`torch.load(weights_only=True)`; they carry no constructor kwargs, so `--config` names a JSON
file with `init_kwargs` (and for tri-plane models `rendering_kwargs`,
`neural_rendering_resolution`), e.g. a reference manifest or the `config.json` of the converted base model.
`--base NAME` records `"base": NAME` in config.json: the weights are a full generator fine-tuned from the registry
model NAME (e.g. a stylized PanoHead, see `core.official`), listed by the 3D head pipeline as a style of NAME.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from core.nets import CONFIG_FILE, GENERATOR_KINDS, WEIGHTS_FILE, build_generator

# Module paths whose classes may appear in official pickles as plain (non-persistent) nn.Module
# subclasses. They are never imported: instances become `OpaqueObject`s holding their state.
OPAQUE_CLASS_MODULE_PREFIXES = ("torch.nn.modules.", "training.", "torch_utils.", "_imported_module_")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global that the safe unpickler does not allow."""


class PersistentObject:
    """Stand-in for a `torch_utils.persistence` object: class name and `__dict__` only (no source)."""

    def __init__(self, meta: dict[str, Any]):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise UnsafePickleError("unsupported persistent object metadata")
        self.class_name = str(meta.get("class_name"))
        self.state = meta.get("state") or {}


class OpaqueObject:
    """Stand-in for an instance of a non-persistent class: keeps the pickled state only."""

    qualified_name = "?"

    def __init__(self, *args, **kwargs):
        self.state: dict[str, Any] = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (a dict with attribute access in the original)."""


def _opaque_class(qualified_name: str) -> type:
    return type("Opaque", (OpaqueObject,), {"qualified_name": qualified_name})


def _reconstruct_opaque(cls, base=object, state=None):
    """Safe replacement for `copyreg._reconstructor`: only builds `OpaqueObject` stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, OpaqueObject)):
        raise UnsafePickleError(f"copyreg._reconstructor called with {cls!r}")
    return cls()


def _storage_from_bytes(data: bytes):
    """Safe replacement for `torch.storage._load_from_bytes` (a nested legacy `torch.save` blob)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def _numpy_dtype(name, align=False, copy=True):
    dtype = np.dtype(name)
    if dtype.hasobject:
        raise UnsafePickleError("object numpy dtypes are not allowed")
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError("only plain numeric numpy scalars are allowed")
    return np.frombuffer(data, dtype=dtype)[0]


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("copyreg", "_reconstructor"): _reconstruct_opaque,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentObject,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `SAFE_GLOBALS` and inert stand-ins for module classes."""

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module.startswith(OPAQUE_CLASS_MODULE_PREFIXES) and name[:1].isupper():
            return _opaque_class(f"{module}.{name}")
        raise UnsafePickleError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        raise UnsafePickleError("persistent ids are not used by network pickles")


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle an official network pickle into data and inert stand-ins (no code from the file runs)."""
    with open(path, "rb") as f:
        return SafeUnpickler(f).load()


def module_state_dict(obj: PersistentObject | OpaqueObject, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """The `state_dict()` of a stand-in module tree: parameters, persistent buffers, submodules."""
    state = obj.state
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, param in (state.get("_parameters") or {}).items():
        if param is not None:
            out[prefix + name] = param.detach()
    skipped = set(state.get("_non_persistent_buffers_set") or ())
    for name, buf in (state.get("_buffers") or {}).items():
        if buf is not None and name not in skipped:
            out[prefix + name] = buf.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, prefix + name + "."))
    return out


def to_json_value(value: Any) -> Any:
    """Convert EasyDicts, tuples and numpy scalars to plain JSON-compatible values."""
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in config.json")


def infer_kind(class_name: str, state_dict_keys, rendering_kwargs: dict | None) -> str:
    """stylegan2 for `Generator`; panohead for a tri-plane model with PanoHead parts; else eg3d."""
    if class_name.split(".")[-1] == "Generator":
        return "stylegan2"
    keys = list(state_dict_keys)
    rendering_kwargs = rendering_kwargs or {}
    if any(k.startswith(("bcg_synthesis.", "t_mapping.", "torgb.")) for k in keys) or "triplane_depth" in rendering_kwargs:
        return "panohead"
    return "eg3d"


def convert_network_pickle(path: str | Path, key: str = "G_ema", kind: str | None = None):
    """Read generator `key` from an official pickle; returns (state_dict, config dict)."""
    data = safe_load_pickle(path)
    if not isinstance(data, dict) or key not in data:
        raise KeyError(f"{path}: no {key!r} entry (found {sorted(data) if isinstance(data, dict) else type(data)})")
    generator = data[key]
    if not isinstance(generator, PersistentObject):
        raise TypeError(f"{path}: {key!r} is not a persistent network object")
    state = generator.state
    if state.get("init_args"):
        raise ValueError("positional init_args are not supported (official generators use keywords only)")
    state_dict = module_state_dict(generator)
    rendering_kwargs = state.get("rendering_kwargs")
    config = {
        "kind": kind or infer_kind(generator.class_name, state_dict, rendering_kwargs),
        "class_name": generator.class_name,
        "init_kwargs": to_json_value(state.get("init_kwargs") or {}),
        "rendering_kwargs": to_json_value(rendering_kwargs),
        "neural_rendering_resolution": to_json_value(state.get("neural_rendering_resolution")),
    }
    return state_dict, config


def convert_state_dict_file(path: str | Path, config_path: str | Path, key: str | None = None,
                            kind: str | None = None):
    """Read a plain `torch.save` state dict with `torch.load(weights_only=True)`; kwargs from `config_path`."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None and isinstance(data, dict) and isinstance(data.get(key), dict):
        data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise TypeError(f"{path}: expected a dict of tensors (use --key to pick a nested entry)")
    meta = json.loads(Path(config_path).read_text())
    state_dict = OrderedDict((k, v.detach()) for k, v in data.items())
    class_name = meta.get("class_name", "")
    config = {
        "kind": kind or meta.get("kind") or infer_kind(class_name, state_dict, meta.get("rendering_kwargs")),
        "class_name": class_name,
        "init_kwargs": meta["init_kwargs"],
        "rendering_kwargs": meta.get("rendering_kwargs"),
        "neural_rendering_resolution": meta.get("neural_rendering_resolution"),
    }
    return state_dict, config


def write_converted(state_dict, config: dict, out_dir: str | Path, half: bool = False, verify: bool = True) -> Path:
    """Write `model.safetensors` + `config.json`; with `verify`, first load into our generator (strict)."""
    if config["kind"] not in GENERATOR_KINDS:
        raise ValueError(f"unknown kind {config['kind']!r}")
    if verify:
        with torch.device("meta"):
            generator = build_generator(config["kind"], config["init_kwargs"], config.get("rendering_kwargs"),
                                        config.get("neural_rendering_resolution"))
        expected = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state_dict.items()}
        if expected != found:
            missing = sorted(set(expected) - set(found))[:5]
            unexpected = sorted(set(found) - set(expected))[:5]
            wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])[:5]
            raise ValueError(f"state dict does not fit {config['kind']}: missing {missing}, "
                             f"unexpected {unexpected}, wrong shapes {wrong}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.to(dtype if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="official network pickle (.pkl) or torch.save state dict (.pt/.pth)")
    parser.add_argument("out_dir")
    parser.add_argument("--kind", choices=GENERATOR_KINDS, help="override the detected generator kind")
    parser.add_argument("--key", default=None, help="pickle entry (default G_ema) or nested state-dict entry")
    parser.add_argument("--config", help="JSON with init_kwargs (+ rendering kwargs) for plain state dicts")
    parser.add_argument("--base", help="registry name of the model these weights were fine-tuned from (a style of it)")
    parser.add_argument("--half", action="store_true", help="store float16 weights")
    parser.add_argument("--no-verify", action="store_true", help="skip the strict shape check")
    args = parser.parse_args(argv)

    source = Path(args.source)
    if source.suffix == ".pkl":
        state_dict, config = convert_network_pickle(source, key=args.key or "G_ema", kind=args.kind)
    else:
        if not args.config:
            parser.error("--config is required for plain state dicts (they carry no constructor kwargs)")
        state_dict, config = convert_state_dict_file(source, args.config, key=args.key, kind=args.kind)
    if args.base:
        config["base"] = args.base
    out = write_converted(state_dict, config, args.out_dir, half=args.half, verify=not args.no_verify)
    print(f"wrote {out / WEIGHTS_FILE} ({len(state_dict)} tensors, kind {config['kind']}) and {out / CONFIG_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
