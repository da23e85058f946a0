"""AgileGAN3D tab end to end: /agile3d_stylize turns a fixture photo into a stylized multi-view portrait and a GLB,
encoding the photo with the style's own encoder when the style ships one. Until the base 3D generator, its encoder
and a style are trained, tiny random ones are registered in a temporary registry."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
import torch
import trimesh
from gradio_client import Client, handle_file
from PIL import Image

from core import weights as W
from core.mesh import read_glb_asset_extras
from core.pipelines.head3d import MODEL_NAMES, Head3DPipeline, available_styles, preferred_model
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs import agilegan3d, available_tabs
from tabs.common import EXAMPLE_PHOTOS, MAX_UPLOAD_SIZE
from tests.tiny_weights import AGILE_PLAIN_STYLE as PLAIN_STYLE  # generator delta only
from tests.tiny_weights import AGILE_STYLE as STYLE  # ships its own encoder
from tests.tiny_weights import (add_agilegan3d_styles, add_head3d_encoder, add_head3d_generator, add_identity,
                                load_registry)



@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> W.Registry:
    folder = tmp_path_factory.mktemp("weights")
    base = add_head3d_generator(folder)
    add_identity(folder)
    add_head3d_encoder(folder)
    add_agilegan3d_styles(folder, base, STYLE, PLAIN_STYLE)
    return load_registry(folder)


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
    names = [name for required in agilegan3d.REQUIRED_MODELS
             for name in ((required,) if isinstance(required, str) else required) if name in registry.names]
    without_style = W.Registry([registry.entry(n) for n in names], registry.weights_dir)
    assert agilegan3d not in available_tabs(without_style)


def test_the_style_menu_shows_each_style_by_its_name_and_passes_the_registry_name(registry):
    with gr.Blocks() as demo:
        agilegan3d.create_tab(Runtime("cpu", registry=registry))
    menu = next(block for block in demo.blocks.values() if isinstance(block, gr.Dropdown))
    assert dict(menu.choices) == {f"test ({STYLE})": STYLE, f"plain ({PLAIN_STYLE})": PLAIN_STYLE}


def test_photo_becomes_a_stylized_3d_portrait(client):
    aligned, frontal, views, glb, info = client.predict(handle_file(EXAMPLE_PHOTOS[2]), STYLE, 3, 30, 0,
                                                        api_name="/agile3d_stylize")
    assert Image.open(aligned).size[0] == Image.open(aligned).size[1]
    assert [item["caption"] for item in views] == ["yaw -30°", "yaw +0°", "yaw +30°"]
    assert read_png_provenance(views[0]["image"])["parameters"]["style"] == STYLE
    mesh = trimesh.load(glb, force="mesh")
    assert 0 < len(mesh.faces) <= 100_000 and read_glb_asset_extras(glb)["parameters"]["style"] == STYLE
    assert "Identity similarity input vs 3D inversion" in info and "the style's own encoder" in info


def test_photos_go_through_the_style_encoder_when_the_style_ships_one(registry):
    pipeline = Head3DPipeline.from_pretrained(runtime=Runtime("cpu", registry=registry))
    base = pipeline.invert(EXAMPLE_PHOTOS[2])
    styled, plain = (pipeline.stylize(style, photo=EXAMPLE_PHOTOS[2], yaws=(0,), mesh=False)
                     for style in (STYLE, PLAIN_STYLE))
    assert styled.provenance.parameters["encoder"] == "style" and plain.provenance.parameters["encoder"] == "base"
    assert not torch.allclose(styled.inversion.ws, base.ws, atol=1e-3)
    torch.testing.assert_close(plain.inversion.ws, base.ws)
    assert pipeline.style_encoder(PLAIN_STYLE) is None
    assert pipeline.stylize(STYLE, seed=3, yaws=(0,), mesh=False).provenance.parameters["encoder"] is None


def test_portrait_metrics_compare_different_photos_only_when_there_are_two(registry):
    from core.face import prepare_face
    from training.eval_agilegan3d import evaluate_portraits

    pipeline = Head3DPipeline.from_pretrained(runtime=Runtime("cpu", registry=registry))
    size = pipeline.generator.img_resolution
    crops = torch.stack([torch.from_numpy(prepare_face(path, size=size).image).permute(2, 0, 1)
                         for path in EXAMPLE_PHOTOS[:2]])
    cameras = torch.cat([pipeline.camera(0, 0)] * 2)
    parts = pipeline.generator, pipeline.encoder, pipeline.identity
    two = evaluate_portraits(*parts, crops, cameras)
    assert two["distinct_people_rate_photos"] == 1.0  # two example photos, two people
    assert 0 <= two["distinct_people_rate"] <= 1 and -1 <= two["identity_between_portraits"] <= 1
    one = evaluate_portraits(*parts, crops[:1], cameras[:1])
    assert "distinct_people_rate" not in one and "identity_between_photos" not in one and one["photos"] == 1


def test_bad_input_gets_clear_messages(client, tmp_path):
    with pytest.raises(Exception, match="(?i)upload a photo"):
        client.predict(None, STYLE, 3, 30, 0, api_name="/agile3d_stylize")
    with pytest.raises(Exception, match="(?i)choices"):
        client.predict(handle_file(EXAMPLE_PHOTOS[2]), "watercolour", 3, 30, 0, api_name="/agile3d_stylize")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), "gray").save(blank)
    with pytest.raises(Exception, match="(?i)no face"):
        client.predict(handle_file(str(blank)), STYLE, 3, 30, 0, api_name="/agile3d_stylize")


def test_the_tab_runs_on_the_cpu_preview_generator_when_it_is_the_only_one(tmp_path_factory):
    """Only the 64-px preview generator, its encoder and a style of it: the tab is shown, says it runs on a
    preview, and stylizes a photo with the preview; a style of the 128-px generator alone does not show the tab."""
    folder = tmp_path_factory.mktemp("preview_weights")
    preview = MODEL_NAMES[-1]
    base = add_head3d_generator(folder, preview)
    add_identity(folder)
    add_head3d_encoder(folder, preview)
    registry = load_registry(folder)
    assert not agilegan3d.available(registry)
    add_agilegan3d_styles(folder, base, STYLE, None, base_name=preview)
    registry = load_registry(folder)
    assert agilegan3d in available_tabs(registry)
    with gr.Blocks() as demo:
        agilegan3d.create_tab(Runtime("cpu", registry=registry))
    demo.queue(max_size=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, max_file_size=MAX_UPLOAD_SIZE)
    try:
        notes = " ".join(c["props"].get("value") or "" for c in demo.config["components"]
                         if c.get("type") == "markdown")
        assert "Preview models" in notes and preview in notes
        client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("preview_downloads")))
        _, _, views, glb, info = client.predict(handle_file(EXAMPLE_PHOTOS[2]), STYLE, 2, 30, 0,
                                                api_name="/agile3d_stylize")
        assert len(views) == 2 and read_glb_asset_extras(glb)["parameters"]["style"] == STYLE
        assert read_png_provenance(views[0]["image"])["model"] == preview
        assert "the style's own encoder" in info
    finally:
        demo.close()


def test_bundled_style_turns_a_photo_into_a_stylized_3d_portrait(app_client):
    """The launched app on its bundled weights (the 64-px preview generator, its encoder and the preview styles):
    an example photo gives three different stylized views, each unlike the unstylized inversion, and a GLB that
    is a surface of the head (not the density fog filling the rendering box)."""
    registry = W.default_registry()
    styles = available_styles(registry, preferred_model(registry), "agilegan3d")
    assert len(styles) >= 2
    for style in styles:
        aligned, frontal, views, glb, info = app_client.predict(handle_file(EXAMPLE_PHOTOS[2]), style, 3, 30, 0,
                                                                api_name="/agile3d_stylize")
        images = [np.asarray(Image.open(item["image"]).convert("RGB"), np.float32) for item in views]
        assert min(np.abs(images[i] - images[j]).mean() for i, j in ((0, 1), (1, 2), (0, 2))) > 3
        inversion = np.asarray(Image.open(frontal).convert("RGB"), np.float32)
        assert np.abs(images[1] - inversion).mean() > 10, style  # the style shows
        mesh = trimesh.load(glb, force="mesh")
        assert 0 < len(mesh.faces) <= 100_000 and (mesh.extents < 0.6).all(), style
        assert read_glb_asset_extras(glb)["parameters"]["style"] == style
        assert "the style's own encoder" in info and preferred_model(registry) in info
