"""Network definitions (pure PyTorch, official-compatible state-dict names) and generator factories.

A converted generator is a folder with `model.safetensors` (the official state dict) and
`config.json` = {"kind": "stylegan2" | "eg3d" | "panohead", "init_kwargs": {...official
constructor kwargs...}, "rendering_kwargs": {...} | null, "neural_rendering_resolution": int | null}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

GENERATOR_KINDS = ("stylegan2", "eg3d", "panohead")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def build_generator(
    kind: str,
    init_kwargs: dict[str, Any],
    rendering_kwargs: dict[str, Any] | None = None,
    neural_rendering_resolution: int | None = None,
) -> torch.nn.Module:
    """Build a randomly initialised generator from the official constructor kwargs.

    `kind` "stylegan2" gives `core.nets.stylegan2.Generator`; "eg3d" / "panohead" give
    `core.nets.triplane.TriPlaneGenerator` (imported lazily). For the tri-plane kinds
    `rendering_kwargs` (default: the copy inside `init_kwargs`) and `neural_rendering_resolution`
    are set as the attributes the forward pass reads.
    """
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"unknown generator kind {kind!r}; expected one of {GENERATOR_KINDS}")
    init_kwargs = dict(init_kwargs)
    if kind == "stylegan2":
        from core.nets.stylegan2 import Generator

        return Generator(**init_kwargs)

    from core.nets.triplane import TriPlaneGenerator

    if rendering_kwargs is None:
        rendering_kwargs = init_kwargs.get("rendering_kwargs")
    init_kwargs["rendering_kwargs"] = dict(rendering_kwargs or {})
    init_kwargs["kind"] = kind
    generator = TriPlaneGenerator(**init_kwargs)
    if neural_rendering_resolution is not None:
        generator.neural_rendering_resolution = int(neural_rendering_resolution)
    return generator


def generator_from_config(config: dict[str, Any]) -> torch.nn.Module:
    """Build a generator from a `config.json` dict (see module docstring)."""
    return build_generator(
        config["kind"],
        config["init_kwargs"],
        rendering_kwargs=config.get("rendering_kwargs"),
        neural_rendering_resolution=config.get("neural_rendering_resolution"),
    )


def load_generator(directory: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load `config.json` + `model.safetensors` from `directory`; returns an eval-mode float32 generator
    (float16 weight files are cast on load)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    generator = generator_from_config(config)
    generator.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=True)
    return generator.eval().requires_grad_(False).to(device)
