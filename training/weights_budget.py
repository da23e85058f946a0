"""The bundled-weights budget: what the registered weights take today plus what each planned model's default
training config will export, against the ~25 MiB that all bundled weights may take together.

    python -m training.weights_budget            # markdown table; exit code 1 when the plan is over budget

Planned sizes come from the default configs of the trainers (randomly initialised models, float16 exports):
change a default and this table changes with it, so a config that would not fit is caught before GPU time is spent
on it. Style deltas are measured by `core.nets.style_delta.make_style_delta` on a random full-rank change of the
tensors their recipe fine-tunes (an upper bound: unchanged tensors are dropped in real exports). The training
checkpoint sizes (compact format, `training.resumable`) are listed too: they decide how many runs fit into one
GPU-machine call (64 MiB carried in, 64 MiB back).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from core.nets.encoders import Head3DEncoder, StyleEncoder, head3d_encoder_config, style_encoder_config
from core.nets.l2sae import L2SAE, L2SAEConfig
from core.nets.stylegan2 import Generator
from core.nets.style_delta import make_style_delta
from core.weights import REGISTRY_PATH, Registry
from training.discriminator import Discriminator
from training.train_head3d import Head3DConfig, build_head_generator
from training.train_l2sae import TrainConfig as L2SAETrainConfig
from training.train_stylegan2 import TrainConfig
from training.train_taxfree import TaxFreeConfig

BUDGET_MIB = 25.0
MIB = 2**20
FACE3DMM_LABEL_DIM = 136  # the dataset's normalised ICT-FaceKit vector (weights/face3dmm_estimator out_dim)
LD_STYLES = 3  # issue 9: at least three likelihood-distillation styles
AGILE_STYLES = 2  # issue 10: at least two AgileGAN3D styles
LD_RANK = 8  # training.stylize_head3d default delta rank
AGILE_RANK = 4  # training.agilegan3d default delta rank of the generator
AGILE_ENCODER_RANK = 8  # ... and of the style's own encoder, whose tuned modules are:
AGILE_ENCODER_PREFIXES = ("laterals.", "heads.", "camera_offset.")
LD_TRAINED_PREFIXES = ("backbone.synthesis.", "superresolution.")  # what the paper fine-tunes


@dataclass
class PlannedModel:
    """A model a trainer will export: registry name, how many of it, float16 export bytes, checkpoint bytes."""

    name: str
    count: int
    export_bytes: int
    checkpoint_bytes: int | None


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def float16_export_bytes(module: torch.nn.Module) -> int:
    """Size of the module's state dict saved as float16 safetensors (what the trainers bundle)."""
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    return len(save(tensors))


def compact_checkpoint_bytes(generator: torch.nn.Module, discriminator: torch.nn.Module) -> int:
    """`training.resumable`'s compact GAN checkpoint: G, G_ema, D in float16 and Adam's second moments in bfloat16
    (first moments are not stored)."""
    g, d = parameter_count(generator), parameter_count(discriminator)
    return 2 * (3 * g + 2 * d)


def style_delta_bytes(base: torch.nn.Module, rank: int, prefixes: tuple[str, ...] | None = None) -> int:
    """Bytes of a rank-`rank` style delta when every fine-tuned float tensor of `base` changed."""
    generator = torch.Generator().manual_seed(0)
    tuned = copy.deepcopy(base)
    changed = 0
    with torch.no_grad():
        for name, tensor in tuned.state_dict().items():
            if tensor.is_floating_point() and (prefixes is None or name.startswith(prefixes)):
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
                changed += 1
    if not changed:
        raise ValueError(f"no tensor of {type(base).__name__} starts with {prefixes}")
    delta = make_style_delta(base, tuned, "base", rank=rank)
    return len(save({k: v.to(torch.float16).contiguous() for k, v in delta.tensors().items()}))


def planned_models() -> list[PlannedModel]:
    """Every generator-side model the issues ask for, at its trainer's default config."""
    torch.manual_seed(0)
    plans: list[PlannedModel] = []

    def add(name: str, count: int, model: torch.nn.Module, discriminator: torch.nn.Module | None = None) -> None:
        ckpt = compact_checkpoint_bytes(model, discriminator) if discriminator is not None else None
        plans.append(PlannedModel(name, count, float16_export_bytes(model), ckpt))

    base2d = TrainConfig()
    g2d = Generator(**base2d.generator_kwargs())
    add("stylegan2-faces128", 1, g2d, Discriminator(**base2d.discriminator_kwargs()))
    for recipe in ("taxfree", "overconstrained"):
        config = TaxFreeConfig.for_recipe(recipe, c_dim=FACE3DMM_LABEL_DIM)
        add(f"{recipe}-faces128", 1, Generator(**config.generator_kwargs()),
            Discriminator(**config.discriminator_kwargs()))
    l2sae = L2SAETrainConfig()
    add("l2sae-faces128", 1, L2SAE(L2SAEConfig(**{k: v for k, v in l2sae.model.items()})),
        Discriminator(**l2sae.discriminator_kwargs()))
    add("style-encoder-faces128", 1, StyleEncoder(style_encoder_config(g2d.num_ws, g2d.w_dim, base2d.resolution)))
    head = Head3DConfig()
    g3d = build_head_generator(head)
    add("head3d-faces128", 1, g3d, Discriminator(**head.discriminator_kwargs()))
    encoder3d = Head3DEncoder(head3d_encoder_config(g3d.backbone.num_ws, g3d.w_dim, head.resolution))
    add("head3d-encoder-faces128", 1, encoder3d)
    plans.append(PlannedModel("head3d-style-* (likelihood distillation)", LD_STYLES,
                              style_delta_bytes(g3d, LD_RANK, LD_TRAINED_PREFIXES), None))
    plans.append(PlannedModel("agilegan3d-* (generator + encoder deltas)", AGILE_STYLES,
                              style_delta_bytes(g3d, AGILE_RANK)
                              + style_delta_bytes(encoder3d, AGILE_ENCODER_RANK, AGILE_ENCODER_PREFIXES), None))
    return plans


def bundled_bytes(registry: Registry) -> dict[str, int]:
    """Registered models whose files live in `weights/` (not derived at install time, not Hub-only): bytes each."""
    sizes = {}
    for name in registry.names:
        entry = registry.entry(name)
        if entry.bundled and "derived_from" not in entry.extra:
            sizes[name] = entry.size
    return sizes


def preview_replacements() -> dict[str, str]:
    """The pipelines' fallback models (CPU-trained previews) -> the planned model preferred over each. A preview is
    deleted when its planned model is registered, so the planned total leaves previews out."""
    from core.pipelines import beauty, head3d, latents2semantics, taxfree

    alternatives = [*taxfree.VARIANTS.values(), *zip(*beauty.GENERATOR_ENCODER_PAIRS), latents2semantics.MODEL_NAMES,
                    head3d.MODEL_NAMES, tuple(head3d.ENCODER_NAMES[name] for name in head3d.MODEL_NAMES)]
    return {fallback: preferred for preferred, *fallbacks in alternatives for fallback in fallbacks}


def _style_base(registry: Registry, name: str) -> str | None:
    """The `base` of a bundled model's config.json (the generator a style delta applies to), if any."""
    _, paths = registry.locate(name)
    if paths is None or "config.json" not in paths:
        return None
    return json.loads(paths["config.json"].read_text()).get("base")


def budget_table(registry: Registry, plans: list[PlannedModel]) -> tuple[str, float]:
    """Markdown table and the planned total in MiB (previews and the styles of previews listed, not counted)."""
    names = set(registry.names)
    previews = preview_replacements()
    lines = ["| model | status | count | float16 export | compact checkpoint |", "|---|---|---|---|---|"]
    total = 0
    for name, size in bundled_bytes(registry).items():
        if name in previews:
            lines.append(f"| {name} | preview, deleted for {previews[name]} | 1 | {size / MIB:.2f} MiB | |")
            continue
        base = _style_base(registry, name)
        if base in previews:
            lines.append(f"| {name} | style of the preview {base}, deleted with it | 1 | {size / MIB:.2f} MiB | |")
            continue
        lines.append(f"| {name} | bundled | 1 | {size / MIB:.2f} MiB | |")
        total += size
    for plan in plans:
        if plan.name in names:
            continue  # already counted as bundled
        ckpt = f"{plan.checkpoint_bytes / MIB:.1f} MiB" if plan.checkpoint_bytes else ""
        lines.append(f"| {plan.name} | planned | {plan.count} | {plan.export_bytes / MIB:.2f} MiB each | {ckpt} |")
        total += plan.count * plan.export_bytes
    lines.append(f"| **total** | | | **{total / MIB:.1f} MiB** of {BUDGET_MIB:.0f} MiB | |")
    return "\n".join(lines), total / MIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, default=REGISTRY_PATH)
    args = parser.parse_args(argv)
    table, total = budget_table(Registry.load(args.registry), planned_models())
    print(table)
    if total > BUDGET_MIB:
        print(f"\nOver budget by {total - BUDGET_MIB:.1f} MiB.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
