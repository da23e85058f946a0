"""StyleGAN2-ADA generator: official state-dict layout, reference outputs, truncation, noise, precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.nets import build_generator, generator_from_config
from core.nets.stylegan2 import Generator, SynthesisBlock, block_dtype

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
FIXTURE_REF = REPO / "tests" / "fixtures" / "reference"
SHARED_REF = REPO.parent / "shared" / "reference"
SG2_MANIFESTS = sorted(SHARED_REF.glob("manifest_stylegan2_*.json"))
RTOL = ATOL = 1e-4  # reference README section 7


def _manifest_entries(entries):
    return [(name, tuple(shape)) for name, shape, _dtype, _is_buffer in entries]


def _state_entries(module):
    return [(name, tuple(t.shape)) for name, t in module.state_dict().items()]


@pytest.fixture(scope="module")
def reference():
    """The small official generator (fixture copy) loaded strictly, with its stored inputs/outputs."""
    meta = json.loads((FIXTURE_REF / "sg2_small_seed0.json").read_text())
    G = Generator(**meta["init_kwargs"]).eval()
    G.load_state_dict(load_file(FIXTURE_REF / meta["state_dict_file"]), strict=True)
    io = {k: v.clone() for k, v in load_file(FIXTURE_REF / meta["io_file"]).items()}
    return meta, G, io


def _tiny(**overrides) -> Generator:
    kwargs = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs={"num_layers": 2},
                  synthesis_kwargs={"channel_base": 64, "channel_max": 8, "num_fp16_res": 2, "conv_clamp": 256})
    kwargs.update(overrides)
    return Generator(**kwargs).eval()


# ---------------------------------------------------------------------------------------------- layout


def test_reference_manifest_matches_state_dict(reference):
    meta, G, _ = reference
    assert _state_entries(G) == _manifest_entries(meta["state_dict"])
    assert G.num_ws == meta["derived"]["num_ws"]
    buffers = {name for name, _ in G.named_buffers()}
    assert buffers == {name for name, _, _, is_buffer in meta["state_dict"] if is_buffer}


@pytest.mark.skipif(not SG2_MANIFESTS, reason=f"official StyleGAN2 manifests not found under {SHARED_REF}")
@pytest.mark.parametrize("manifest_path", SG2_MANIFESTS, ids=lambda p: p.stem)
def test_official_manifests_match(manifest_path):
    manifest = json.loads(manifest_path.read_text())
    with torch.device("meta"):
        G = build_generator("stylegan2", manifest["init_kwargs"])
    assert _state_entries(G) == _manifest_entries(manifest["state_dict"])
    assert G.num_ws == manifest["derived"]["num_ws"]
    fp16_blocks = [res for res in G.synthesis.block_resolutions if getattr(G.synthesis, f"b{res}").use_fp16]
    assert fp16_blocks == manifest["derived"]["fp16_block_resolutions"]


@pytest.mark.parametrize("kind,name", [("eg3d", "manifest_eg3d_ffhq512-128.json"),
                                       ("panohead", "manifest_panohead_released.json")])
def test_build_generator_triplane_kinds(kind, name):
    path = SHARED_REF / name
    if not path.exists():
        pytest.skip(f"{path} not found (shared reference folder absent)")
    manifest = json.loads(path.read_text())
    with torch.device("meta"):
        G = build_generator(kind, manifest["init_kwargs"], manifest["rendering_kwargs"],
                            manifest["neural_rendering_resolution"])
    assert G.kind == kind
    assert G.neural_rendering_resolution == manifest["neural_rendering_resolution"]
    assert _state_entries(G) == _manifest_entries(manifest["state_dict"])


def test_build_generator_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown generator kind"):
        build_generator("stylegan3", {})


def test_conditional_mapping_has_embed_and_loads_strictly():
    G = _tiny(c_dim=5, mapping_kwargs={"num_layers": 2, "embed_features": 4, "layer_features": 6})
    assert G.mapping.embed.weight.shape == (4, 5)
    assert G.mapping.fc0.weight.shape == (6, 8 + 4)
    clone = _tiny(c_dim=5, mapping_kwargs={"num_layers": 2, "embed_features": 4, "layer_features": 6})
    clone.load_state_dict(G.state_dict(), strict=True)
    z, c = torch.randn(2, 8), torch.randn(2, 5)
    assert torch.equal(clone(z, c, noise_mode="const"), G(z, c, noise_mode="const"))
    assert not torch.allclose(G.mapping(z, c), G.mapping(z, torch.randn(2, 5)))


@pytest.mark.parametrize("architecture", ["orig", "skip", "resnet"])
def test_architectures_produce_images(architecture):
    G = _tiny(synthesis_kwargs={"channel_base": 64, "channel_max": 8, "architecture": architecture})
    img = G(torch.randn(2, 8), torch.zeros(2, 0), noise_mode="none")
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32 and torch.isfinite(img).all()
    assert hasattr(G.synthesis.b16, "skip") == (architecture == "resnet")


# ---------------------------------------------------------------------------------------------- numbers


def test_mapping_matches_reference(reference):
    _, G, io = reference
    with torch.no_grad():
        ws1 = G.mapping(io["z"], io["c"], truncation_psi=1)
        ws07 = G.mapping(io["z"], io["c"], truncation_psi=0.7, truncation_cutoff=8)
    assert torch.allclose(ws1, io["ws_psi1"], rtol=RTOL, atol=ATOL)
    assert torch.allclose(ws07, io["ws_psi0.7"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("key,ws_key,noise_mode", [("img_psi1_const", "ws_psi1", "const"),
                                                   ("img_psi0.7_const", "ws_psi0.7", "const"),
                                                   ("img_psi1_nonoise", "ws_psi1", "none")])
@pytest.mark.parametrize("fused_modconv", [None, False])
def test_synthesis_matches_reference(reference, key, ws_key, noise_mode, fused_modconv):
    _, G, io = reference
    with torch.no_grad():
        img = G.synthesis(io[ws_key], noise_mode=noise_mode, force_fp32=True, fused_modconv=fused_modconv)
    assert img.shape == io[key].shape
    assert torch.allclose(img, io[key], rtol=RTOL, atol=ATOL), (img - io[key]).abs().max()


def test_forward_equals_reference(reference):
    _, G, io = reference
    with torch.no_grad():
        img = G(io["z"], io["c"], truncation_psi=0.7, truncation_cutoff=8, noise_mode="const", force_fp32=True)
    assert torch.allclose(img, io["img_psi0.7_const"], rtol=RTOL, atol=ATOL)


def test_generator_from_config_builds_reference_model(reference):
    meta, G, _ = reference
    built = generator_from_config({"kind": "stylegan2", "init_kwargs": meta["init_kwargs"]})
    assert _state_entries(built) == _state_entries(G)


# ---------------------------------------------------------------------------------------------- behaviour


def test_truncation_and_cutoff(reference):
    _, G, io = reference
    with torch.no_grad():
        ws = G.mapping(io["z"], io["c"])
        ws0 = G.mapping(io["z"], io["c"], truncation_psi=0.0, truncation_cutoff=3)
        ws0_all = G.mapping(io["z"], io["c"], truncation_psi=0.0)
    w_avg = G.mapping.w_avg.expand(2, -1)
    for i in range(3):
        assert torch.allclose(ws0[:, i], w_avg)
    assert torch.equal(ws0[:, 3:], ws[:, 3:])
    assert torch.allclose(ws0_all, G.mapping.w_avg.expand_as(ws0_all))
    assert torch.equal(ws[:, 0], ws[:, -1])  # a single w broadcast to all layers


def test_w_avg_updates_only_when_asked():
    G = _tiny().train()
    before = G.mapping.w_avg.clone()
    G.mapping(torch.randn(4, 8), None)
    assert torch.equal(G.mapping.w_avg, before)
    G.mapping(torch.randn(4, 8), None, update_emas=True)
    assert not torch.equal(G.mapping.w_avg, before)


def test_noise_modes(reference):
    _, G, io = reference
    ws = io["ws_psi1"]
    with torch.no_grad():
        const_a = G.synthesis(ws, noise_mode="const")
        const_b = G.synthesis(ws, noise_mode="const")
        none = G.synthesis(ws, noise_mode="none")
        rand_a = G.synthesis(ws, noise_mode="random")
        rand_b = G.synthesis(ws, noise_mode="random")
    assert torch.equal(const_a, const_b)
    assert not torch.allclose(const_a, none, atol=1e-3)
    assert not torch.allclose(rand_a, rand_b, atol=1e-3)
    assert not torch.allclose(rand_a, const_a, atol=1e-3)
    with pytest.raises(AssertionError):
        G.synthesis(ws, noise_mode="sometimes")


def test_cpu_always_float32(reference):
    _, G, io = reference
    assert any(getattr(G.synthesis, f"b{r}").use_fp16 for r in G.synthesis.block_resolutions)
    with torch.no_grad():
        auto = G.synthesis(io["ws_psi1"], noise_mode="const")  # no force_fp32 on CPU
    assert auto.dtype == torch.float32
    assert torch.allclose(auto, io["img_psi1_const"], rtol=RTOL, atol=ATOL)
    assert block_dtype(True, False, torch.device("cpu")) == torch.float32
    assert block_dtype(True, False, torch.device("cuda")) == torch.float16
    assert block_dtype(True, True, torch.device("cuda")) == torch.float32
    assert block_dtype(False, False, torch.device("cuda")) == torch.float32


def test_block_fused_modconv_policies():
    block = SynthesisBlock(0, 4, w_dim=4, resolution=4, img_channels=3, is_last=True).eval()
    assert block.resolve_fused_modconv(torch.float32, 4) is True
    assert block.resolve_fused_modconv(torch.float16, 4) is False
    assert block.resolve_fused_modconv(torch.float16, 1) is True
    assert block.train().resolve_fused_modconv(torch.float32, 1) is False
    eg3d_style = SynthesisBlock(0, 4, w_dim=4, resolution=4, img_channels=3, is_last=True,
                                fused_modconv_default="inference_only").eval()
    assert eg3d_style.resolve_fused_modconv(torch.float16, 4) is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the float16 path")
def test_cuda_mixed_precision_close_to_float32(reference):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    meta, cpu_generator, io = reference
    G = Generator(**meta["init_kwargs"]).eval().cuda()
    G.load_state_dict(cpu_generator.state_dict())
    ws = io["ws_psi1"].cuda()
    with torch.no_grad():
        fp32 = G.synthesis(ws, noise_mode="const", force_fp32=True)
        mixed = G.synthesis(ws, noise_mode="const")
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    assert torch.allclose(fp32.cpu(), io["img_psi1_const"], rtol=RTOL, atol=ATOL)
    assert (mixed - fp32).abs().mean() < 0.05 * fp32.abs().mean()
