"""Style variants stored as compact deltas over a base generator.

A style is a fine-tuned copy of a base generator. Only what changed is kept: tensors whose change is below
`min_relative_change` are dropped, weights of two or more dimensions are stored as a rank-r factorisation of their
change (`<name>.up` [out, r] @ `<name>.down` [r, rest], from a truncated SVD), and everything else as a full
difference (`<name>.delta`). `apply_style_delta` adds the changes to a deep copy of the base.

Bundled format: `model.safetensors` (float16) + `config.json` {"kind": "style_delta", "base": <registry name>,
"rank": r | null, ...}. A style may also carry deltas of companion modules over their own bases (e.g. a photo encoder
fine-tuned for the style): each part `<part>` is `<part>.safetensors` in the same folder, described by
`config["parts"][<part>]` = {"kind": "style_delta", "base": ..., "rank": ..., "file": "<part>.safetensors"}, and is
read back with `build_style_delta(config["parts"][<part>], tensors)`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

KIND = "style_delta"


class StyleDelta(torch.nn.Module):
    """The difference between a fine-tuned generator and its base `base` (a registry name), as buffers."""

    def __init__(self, base: str, rank: int | None, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.base = base
        self.rank = rank
        self._names = sorted(tensors)
        for index, name in enumerate(self._names):
            self.register_buffer(f"t{index}", tensors[name].detach().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (`<param>.delta`, or `<param>.up` / `<param>.down`)."""
        return {name: getattr(self, f"t{index}") for index, name in enumerate(self._names)}

    def changes(self) -> dict[str, torch.Tensor]:
        """The full change of every modified base tensor, by state-dict name."""
        stored = self.tensors()
        out = {}
        for name, value in stored.items():
            if name.endswith(".delta"):
                out[name[: -len(".delta")]] = value
            elif name.endswith(".up"):
                key = name[: -len(".up")]
                out[key] = value.float() @ stored[key + ".down"].float()
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": KIND, "base": self.base, "rank": self.rank}


def make_style_delta(base: torch.nn.Module, tuned: torch.nn.Module, base_name: str, rank: int | None = 8,
                     min_relative_change: float = 1e-4) -> StyleDelta:
    """The delta from `base` to `tuned` (same architecture); unchanged tensors are dropped."""
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    if base_state.keys() != tuned_state.keys():
        raise ValueError("base and tuned generators have different state-dict keys")
    tensors: dict[str, torch.Tensor] = {}
    for name, before in base_state.items():
        after = tuned_state[name]
        if not before.is_floating_point():
            if not torch.equal(before, after):
                raise ValueError(f"non-float tensor {name} differs; a style delta cannot hold it")
            continue
        change = after.detach().float() - before.detach().float()
        scale = before.detach().float().norm().clamp_min(1e-12)
        if float(change.norm() / scale) < min_relative_change:
            continue
        if rank is not None and change.ndim >= 2 and rank < min(change.shape[0], change[0].numel()):
            matrix = change.reshape(change.shape[0], -1)
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            tensors[name + ".up"] = u[:, :rank] * s[:rank]
            tensors[name + ".down"] = vh[:rank]
        else:
            tensors[name + ".delta"] = change
    return StyleDelta(base_name, rank, tensors)


def apply_style_delta(base: torch.nn.Module, delta: StyleDelta) -> torch.nn.Module:
    """A deep copy of `base` with the style's changes added (in the base's dtype and device)."""
    styled = copy.deepcopy(base)
    state = styled.state_dict()
    changes = delta.changes()
    unknown = sorted(set(changes) - set(state))
    if unknown:
        raise ValueError(f"the style changes tensors the base does not have: {unknown[:3]}")
    mismatched = sorted(name for name, change in changes.items() if change.numel() != state[name].numel())
    if mismatched:
        raise ValueError(f"the style's changes do not fit the base's tensor shapes: {mismatched[:3]}")
    with torch.no_grad():
        for name, change in changes.items():
            target = state[name]
            target.add_(change.reshape(target.shape).to(device=target.device, dtype=target.dtype))
    return styled


def save_style_delta(delta: StyleDelta, directory: str | Path, extra_config: dict | None = None,
                     parts: dict[str, StyleDelta] | None = None) -> Path:
    """Write `model.safetensors` (float16) and `config.json` into `directory`, and each named part (the delta of a
    companion module over its own base) as `<part>.safetensors` described under `config["parts"]`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(delta, directory / "model.safetensors")
    config = {**delta.config(), **(extra_config or {})}
    for name, part in (parts or {}).items():
        if name == "model" or not name.isidentifier():
            raise ValueError(f"invalid style part name {name!r}")
        _save_tensors(part, directory / f"{name}.safetensors")
        config.setdefault("parts", {})[name] = {**part.config(), "file": f"{name}.safetensors"}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def _save_tensors(delta: StyleDelta, path: Path) -> None:
    save_file({k: v.to(torch.float16).contiguous() for k, v in delta.tensors().items()}, str(path))


def build_style_delta(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> StyleDelta:
    """A StyleDelta from a bundled folder's config and tensors (for `Runtime.get_model`)."""
    if config.get("kind") != KIND:
        raise ValueError(f"expected a {KIND} config, got kind {config.get('kind')!r}")
    return StyleDelta(config["base"], config.get("rank"), {k: v.float() for k, v in state_dict.items()})
