"""Tiny random-weight models for the tabs' end-to-end tests and the browser test, until trained weights are bundled.

Each builder writes its model(s) into `weights_dir/<registry name>/` and registers them in `weights_dir/registry.json`
(created on first use), so several builders can share one registry: `all_tabs_registry` holds every method tab's
models at once. The beauty tab's models are placeholders that only make the tab show; `patch_beauty` replaces
`BeautyOptimizer.from_pretrained` with a tiny random pipeline. Test code only: production code never imports this.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import weights as W
from core.face3dmm import EXPRESSION_NAMES, FaceParams, load_face_model
from core.nets.encoders import StyleEncoder, build_head3d_encoder, style_encoder_config
from core.nets.l2sae import L2SAE, L2SAEConfig
from core.nets.style_delta import make_style_delta, save_style_delta
from core.nets.stylegan2 import Generator
from core.pipelines import head3d, latents2semantics, taxfree
from core.pipelines.beauty import GENERATOR_ENCODER_PAIRS, BeautyOptimizer, OptimizerSettings
from core.runtime import Runtime
from tabs import beauty
from tests.test_beauty_pipeline import TINY_GENERATOR, PooledIdentity
from tests.test_head3d import TINY as TINY_HEAD3D
from tests.test_head3d_encoder import TINY_ENCODER

TINY_L2SAE = L2SAEConfig(resolution=32, structure_resolution=8, channels_per_region=2, style_dim=16, channel_base=256,
                         channel_max=16, mask_channels=4)
STYLIZE3D_STYLE = "head3d-faces128-style-test"
AGILE_STYLE = "agilegan3d-test"  # ships its own encoder
AGILE_PLAIN_STYLE = "agilegan3d-plain"  # generator delta only


def _tiny_stylegan2_kwargs(c_dim: int) -> dict:
    return {**TINY_GENERATOR, "c_dim": c_dim}


def registry_path(weights_dir: Path) -> Path:
    return Path(weights_dir) / "registry.json"


def load_registry(weights_dir: Path) -> W.Registry:
    return W.Registry.load(registry_path(weights_dir))


def register(folder: Path, name: str, weights_dir: Path) -> None:
    """Register the model folder `folder` as `name` in `weights_dir`'s registry."""
    W.main(["register", str(folder), "--name", name, "--licence", "test",
            "--registry", str(registry_path(weights_dir))])


def copy_identity(folder: Path) -> None:
    """The real identity network's files (bundled or converted from its package), copied into `folder`."""
    folder.mkdir()
    for name, path in W.default_registry().resolve("identity-resnet").paths.items():
        shutil.copyfile(path, folder / name)


def add_identity(weights_dir: Path) -> None:
    """The real identity network, registered as `head3d.IDENTITY_NAME`."""
    copy_identity(weights_dir / head3d.IDENTITY_NAME)
    register(weights_dir / head3d.IDENTITY_NAME, head3d.IDENTITY_NAME, weights_dir)


def add_taxfree(weights_dir: Path, alternative: int = 0) -> None:
    """Both conditional generators of the 'tax-free' tab: tiny random StyleGAN2s conditioned on 3DMM parameters,
    registered under each variant's `alternative`-th model name (0: the preferred one)."""
    face_model = load_face_model()
    size = FaceParams.vector_size(face_model.num_identity)
    init_kwargs = _tiny_stylegan2_kwargs(size)
    for index, names in enumerate(taxfree.VARIANTS.values()):
        name = names[alternative]
        torch.manual_seed(index)
        folder = weights_dir / name
        folder.mkdir()
        save_file({k: v.half() for k, v in Generator(**init_kwargs).state_dict().items()},
                  str(folder / "model.safetensors"))
        average = FaceParams.neutral(face_model.num_identity)
        average.expression[EXPRESSION_NAMES.index("eyeWide_L")] = 0.5  # like the real fits: not all zeros
        conditioning = {"mean": average.to_vector().tolist(), "std": [1.0] * size}
        (folder / "config.json").write_text(json.dumps({"kind": "stylegan2", "init_kwargs": init_kwargs,
                                                        "conditioning": conditioning}))
        register(folder, name, weights_dir)


def add_l2sae(weights_dir: Path, name: str = latents2semantics.MODEL_NAMES[0]) -> None:
    """A tiny random Latents2Semantics autoencoder registered as `name`."""
    folder = weights_dir / name
    folder.mkdir()
    torch.manual_seed(0)
    model = L2SAE(TINY_L2SAE)
    save_file({k: v.half() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"kind": "l2sae", "config": TINY_L2SAE.to_dict()}))
    register(folder, name, weights_dir)


def add_head3d_generator(weights_dir: Path, name: str = head3d.MODEL_NAME) -> torch.nn.Module:
    """A tiny random 3D head generator export registered as `name`; returns the generator (the base of the style
    deltas)."""
    from training.train_head3d import Head3DTrainer

    torch.set_num_threads(2)
    trainer = Head3DTrainer(TINY_HEAD3D, None)
    with torch.no_grad():  # a dense field, so that the official density level finds a surface
        trainer.G_ema.decoder.net[-1].bias[0] += 20
    trainer.export(weights_dir / name, None)
    register(weights_dir / name, name, weights_dir)
    return trainer.G_ema


def add_head3d_encoder(weights_dir: Path, generator: str = head3d.MODEL_NAME) -> None:
    """A tiny random photo encoder for the registered 3D head generator `generator`, registered under its
    `head3d.ENCODER_NAMES` name (needs the identity network registered)."""
    from core.beauty import load_identity_encoder
    from core.nets import load_generator
    from training.train_head3d_encoder import Head3DEncoderConfig, Head3DEncoderTrainer

    encoder = Head3DEncoderTrainer(Head3DEncoderConfig(encoder_overrides=TINY_ENCODER),
                                   load_generator(weights_dir / generator),
                                   load_identity_encoder("identity-resnet"))
    name = head3d.ENCODER_NAMES[generator]
    encoder.export(weights_dir / name)
    register(weights_dir / name, name, weights_dir)


def _perturbed(module: torch.nn.Module, part: str) -> torch.nn.Module:
    """A copy of `module` whose parameters under the submodule `part` moved by random noise."""
    tuned = copy.deepcopy(module)
    with torch.no_grad():
        for parameter in tuned.get_submodule(part).parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return tuned


def add_stylize3d_style(weights_dir: Path, base: torch.nn.Module, name: str = STYLIZE3D_STYLE) -> None:
    """A 3D stylization style: the delta of a perturbed copy of `base` (the registered 3D generator)."""
    tuned = _perturbed(base, "backbone.synthesis")
    save_style_delta(make_style_delta(base, tuned, head3d.MODEL_NAME), weights_dir / name,
                     extra_config={"method": "stylize3d"})
    register(weights_dir / name, name, weights_dir)


def add_agilegan3d_styles(weights_dir: Path, base: torch.nn.Module, name: str = AGILE_STYLE,
                          plain_name: str | None = AGILE_PLAIN_STYLE, base_name: str = head3d.MODEL_NAME) -> None:
    """AgileGAN3D styles over `base` (registered as `base_name`): `name` ships its own encoder part (needs the
    generator's photo encoder registered), `plain_name` (unless None) has the same generator delta only."""
    generator_delta = make_style_delta(base, _perturbed(base, "superresolution"), base_name)
    encoder_name = head3d.ENCODER_NAMES[base_name]
    encoder_folder = weights_dir / encoder_name
    base_encoder = build_head3d_encoder(json.loads((encoder_folder / "config.json").read_text()),
                                        load_file(encoder_folder / "model.safetensors"))
    encoder_delta = make_style_delta(base_encoder, _perturbed(base_encoder, "heads"), encoder_name)
    save_style_delta(generator_delta, weights_dir / name, extra_config={"method": "agilegan3d", "style": "test"},
                     parts={"encoder": encoder_delta})
    register(weights_dir / name, name, weights_dir)
    if plain_name is not None:
        save_style_delta(generator_delta, weights_dir / plain_name,
                         extra_config={"method": "agilegan3d", "style": "plain"})
        register(weights_dir / plain_name, plain_name, weights_dir)


class MeanBrightness(torch.nn.Module):
    """Stand-in scorer: mean pixel value mapped to the 1-10 scale."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 5.5 + 4.5 * images.mean(dim=(1, 2, 3))


def tiny_beauty_pipeline(runtime: Runtime) -> BeautyOptimizer:
    """The beauty optimizer on a tiny random generator and encoder, a brightness scorer and a pooled identity."""
    torch.manual_seed(0)
    generator = Generator(**_tiny_stylegan2_kwargs(0))
    encoder = StyleEncoder(style_encoder_config(generator.num_ws, generator.w_dim, 16, **TINY_ENCODER))
    return BeautyOptimizer(generator.eval(), encoder.eval(), MeanBrightness(), MeanBrightness(), PooledIdentity(),
                           runtime=runtime, settings=OptimizerSettings(directions=3, batch_size=8),
                           model_names={"generator": "tiny-generator"})


def add_beauty_placeholders(weights_dir: Path) -> None:
    """Placeholder entries for the beauty tab's models not registered yet (so that the tab shows); the pipeline
    itself comes from `patch_beauty`."""
    registered = set(load_registry(weights_dir).names) if registry_path(weights_dir).exists() else set()
    for name in (*beauty.REQUIRED_MODELS, *GENERATOR_ENCODER_PAIRS[0]):
        if name in registered:
            continue
        folder = weights_dir / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"placeholder": name}))
        register(folder, name, weights_dir)


def add_beauty_models(weights_dir: Path, pair: tuple[str, str]) -> None:
    """The beauty tab's real scorer, evaluator and identity network (copies of the bundled ones) plus a tiny random
    generator and encoder registered under the (generator, encoder) names `pair`."""
    add_identity(weights_dir)
    bundled = W.default_registry()
    for name in ("beauty-regressor", "beauty-evaluator"):
        folder = weights_dir / name
        folder.mkdir()
        for file, path in bundled.resolve(name).paths.items():
            shutil.copyfile(path, folder / file)
        register(folder, name, weights_dir)
    torch.manual_seed(0)
    generator = Generator(**_tiny_stylegan2_kwargs(0))
    encoder = StyleEncoder(style_encoder_config(generator.num_ws, generator.w_dim, 16, **TINY_ENCODER))
    configs = ({"kind": "stylegan2", "init_kwargs": _tiny_stylegan2_kwargs(0)}, encoder.config)
    for name, module, config in zip(pair, (generator, encoder), configs):
        folder = weights_dir / name
        folder.mkdir()
        save_file({k: v.half() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
        register(folder, name, weights_dir)


def patch_beauty(patch: pytest.MonkeyPatch) -> None:
    """Make `BeautyOptimizer.from_pretrained` return `tiny_beauty_pipeline`."""
    patch.setattr(BeautyOptimizer, "from_pretrained",
                  classmethod(lambda cls, runtime=None, **_: tiny_beauty_pipeline(runtime)))


def all_tabs_registry(weights_dir: Path) -> W.Registry:
    """One registry with every method tab's tiny models (beauty: placeholders, see `patch_beauty`)."""
    add_taxfree(weights_dir)
    add_l2sae(weights_dir)
    base = add_head3d_generator(weights_dir)
    add_identity(weights_dir)
    add_head3d_encoder(weights_dir)
    add_stylize3d_style(weights_dir, base)
    add_agilegan3d_styles(weights_dir, base, plain_name=None)
    add_beauty_placeholders(weights_dir)
    return load_registry(weights_dir)
