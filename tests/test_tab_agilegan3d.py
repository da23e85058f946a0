"""AgileGAN3D tab end to end: /agile3d_stylize turns a fixture photo into a stylized multi-view portrait and a GLB.
Until the base 3D generator, its encoder and a style are trained, tiny random ones are registered in a temporary
registry."""

from __future__ import annotations

import copy

import gradio as gr
import pytest
import torch
import trimesh
from gradio_client import Client, handle_file
from PIL import Image

from core import weights as W
from core.mesh import read_glb_asset_extras
from core.nets import load_generator
from core.nets.style_delta import make_style_delta, save_style_delta
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs import agilegan3d, available_tabs
from tabs.common import EXAMPLE_PHOTOS, MAX_UPLOAD_SIZE
from tests.test_head3d import TINY
from tests.test_head3d_encoder import TINY_ENCODER
from tests.test_tab_stylize3d import _copy_identity, _register
from training.train_head3d import Head3DTrainer
from training.train_head3d_encoder import Head3DEncoderConfig, Head3DEncoderTrainer

STYLE = "agilegan3d-test"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> W.Registry:
    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("weights")
    path = folder / "registry.json"
    trainer = Head3DTrainer(TINY, None)
    with torch.no_grad():  # a dense field, so that the official density level finds a surface
        trainer.G_ema.decoder.net[-1].bias[0] += 20
    trainer.export(folder / "head3d", None)
    _register(folder / "head3d", agilegan3d.MODEL_NAME, path)
    _copy_identity(folder / "identity")
    _register(folder / "identity", agilegan3d.IDENTITY_NAME, path)
    from core.beauty import load_identity_encoder

    encoder = Head3DEncoderTrainer(Head3DEncoderConfig(encoder_overrides=TINY_ENCODER),
                                   load_generator(folder / "head3d"), load_identity_encoder("identity-resnet"))
    encoder.export(folder / "encoder")
    _register(folder / "encoder", agilegan3d.ENCODER_NAME, path)
    tuned = copy.deepcopy(trainer.G_ema)
    with torch.no_grad():
        for parameter in tuned.superresolution.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    save_style_delta(make_style_delta(trainer.G_ema, tuned, agilegan3d.MODEL_NAME), folder / "style",
                     extra_config={"method": "agilegan3d", "style": "test"})
    _register(folder / "style", STYLE, path)
    return W.Registry.load(path)


@pytest.fixture(scope="module")
def client(registry, tmp_path_factory):
    with gr.Blocks() as demo:
        with gr.Tab("Few-shot 3D portraits"):
            agilegan3d.create_tab(Runtime("cpu", registry=registry))
    demo.queue(max_size=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, max_file_size=MAX_UPLOAD_SIZE)
    yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    demo.close()


def test_tab_needs_an_agilegan3d_style(registry, tmp_path):
    assert agilegan3d in available_tabs(registry)
    without_style = W.Registry([registry.entry(n) for n in agilegan3d.REQUIRED_MODELS], registry.weights_dir)
    assert agilegan3d not in available_tabs(without_style)


def test_photo_becomes_a_stylized_3d_portrait(client):
    aligned, frontal, views, glb, info = client.predict(handle_file(EXAMPLE_PHOTOS[2]), STYLE, 3, 30, 0,
                                                        api_name="/agile3d_stylize")
    assert Image.open(aligned).size[0] == Image.open(aligned).size[1]
    assert [item["caption"] for item in views] == ["yaw -30°", "yaw +0°", "yaw +30°"]
    assert read_png_provenance(views[0]["image"])["parameters"]["style"] == STYLE
    mesh = trimesh.load(glb, force="mesh")
    assert 0 < len(mesh.faces) <= 100_000 and read_glb_asset_extras(glb)["parameters"]["style"] == STYLE
    assert "Identity similarity input vs 3D inversion" in info


def test_bad_input_gets_clear_messages(client, tmp_path):
    with pytest.raises(Exception, match="(?i)upload a photo"):
        client.predict(None, STYLE, 3, 30, 0, api_name="/agile3d_stylize")
    with pytest.raises(Exception, match="(?i)choices"):
        client.predict(handle_file(EXAMPLE_PHOTOS[2]), "watercolour", 3, 30, 0, api_name="/agile3d_stylize")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), "gray").save(blank)
    with pytest.raises(Exception, match="(?i)no face"):
        client.predict(handle_file(str(blank)), STYLE, 3, 30, 0, api_name="/agile3d_stylize")
