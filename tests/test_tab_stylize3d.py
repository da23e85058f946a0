"""'3D head stylization' tab end to end: /stylize_head gives the original and stylized views with yaw captions, the
per-view identity similarity and a GLB (+Y up). A tiny random head3d export, a tiny random photo encoder and a style
delta of a perturbed copy are registered in a temporary registry (the real identity network is copied in). Two tests
run the launched app on its bundled 3D head generator (from a seed, from a photo)."""

from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest
import trimesh
from gradio_client import Client, handle_file
from PIL import Image

from core import weights as W
from core.face import detect_faces

from core.mesh import read_glb_asset_extras
from core.official import PANOHEAD
from core.pipelines.head3d import ENCODER_NAME, available_styles, preferred_model
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs import stylize3d
from tabs.common import EXAMPLE_PHOTOS, MAX_UPLOAD_SIZE
from tests.tiny_weights import (STYLIZE3D_STYLE as STYLE, add_head3d_encoder, add_head3d_generator, add_identity,
                                add_stylize3d_style, load_registry)
from tests.tiny_weights import copy_identity as _copy_identity  # noqa: F401 (test_official_variants imports it here)

def _launch(runtime: Runtime, tmp_path_factory):
    with gr.Blocks() as demo:
        with gr.Tab("3D head stylization"):
            stylize3d.create_tab(runtime)
    demo.queue(max_size=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, max_file_size=MAX_UPLOAD_SIZE)
    return demo, Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    base = add_head3d_generator(folder)
    add_identity(folder)
    add_stylize3d_style(folder, base)
    return folder


@pytest.fixture(scope="module")
def client(weights_dir, tmp_path_factory):
    add_head3d_encoder(weights_dir)
    demo, client = _launch(Runtime("cpu", registry=load_registry(weights_dir)), tmp_path_factory)
    yield client
    demo.close()


def _check_glb(path: str) -> None:
    mesh = trimesh.load(path, force="mesh")
    assert 0 < len(mesh.faces) <= 100_000
    extent = mesh.bounds[1] - mesh.bounds[0]
    assert extent[1] > 0 and read_glb_asset_extras(path)["method"] == "stylize3d"
    scene = trimesh.load(path)  # glTF is +Y up: the head's up axis stays Y after loading
    assert scene.bounds[1][1] > scene.bounds[0][1]


def test_seed_with_style_gives_views_similarities_and_glb(client):
    original, stylized, glb, table, info = client.predict("seed", 4, None, 0, STYLE, 3, 30, 5,
                                                          api_name="/stylize_head")
    assert [item["caption"] for item in original] == ["yaw -30°", "yaw +0°", "yaw +30°"]
    assert [item["caption"] for item in stylized] == ["yaw -30°", "yaw +0°", "yaw +30°"]
    record = read_png_provenance(stylized[0]["image"])
    assert record["seed"] == 4 and record["parameters"]["style"] == STYLE
    rows = table["data"]
    assert [row[0] for row in rows] == [-30, 0, 30]
    assert all(-1 <= row[1] <= 1 for row in rows) and any(row[1] < 0.9999 for row in rows)  # the style changes it
    _check_glb(glb)
    assert STYLE in info and "total" in info


def test_original_compares_with_itself_and_photo_source(client):
    _, _, glb, table, info = client.predict("seed", 4, None, 0, "original", 1, 30, 0, api_name="/stylize_head")
    assert [row[0] for row in table["data"]] == [0] and table["data"][0][1] == pytest.approx(1, abs=1e-3)
    assert "itself" in info
    _, stylized, glb, table, info = client.predict("photo", 0, handle_file(EXAMPLE_PHOTOS[0]), 1, STYLE, 2, 20, 0,
                                                   api_name="/stylize_head")
    assert len(stylized) == 2 and len(table["data"]) == 2 and "Photo pose" in info
    _check_glb(glb)


def test_bad_input_gets_clear_messages(client):
    with pytest.raises(Exception, match="(?i)upload"):
        client.predict("photo", 0, None, 0, STYLE, 3, 30, 0, api_name="/stylize_head")
    with pytest.raises(Exception, match="(?i)choices"):
        client.predict("seed", 0, None, 0, "cartoon", 3, 30, 0, api_name="/stylize_head")
    with pytest.raises(Exception, match="(?i)greater than maximum value 1"):  # the truncation slider's range
        client.predict("seed", 0, None, 0, STYLE, 1, 0, 0, stylize3d.MODEL_NAME, True, 1.5, api_name="/stylize_head")


def test_truncation_changes_a_seeds_head_and_is_reported(client):
    """The same seed at psi 0.3 and 1.0 gives different heads; the default (argument left out) is 0.7."""
    def frontal(*truncation):
        original, _, _, _, info = client.predict("seed", 5, None, 0, "original", 1, 0, 0, stylize3d.MODEL_NAME, True,
                                                 *truncation, api_name="/stylize_head")
        return np.asarray(Image.open(original[0]["image"]).convert("RGB"), np.float32), info

    typical, info = frontal(0.3)
    varied, _ = frontal(1.0)
    default, default_info = frontal()
    assert np.abs(typical - varied).mean() > 1 and "ψ 0.3" in info and "ψ 0.7" in default_info
    np.testing.assert_array_equal(default, frontal(0.7)[0])


def test_official_panohead_is_listed_with_instructions_until_registered(client):
    with pytest.raises(Exception, match="needs a download") as error:
        client.predict("seed", 0, None, 0, "original", 1, 0, 0, PANOHEAD.name, True, api_name="/stylize_head")
    assert PANOHEAD.download in str(error.value) and PANOHEAD.register_command in str(error.value)
    _, _, _, table, info = client.predict("seed", 0, None, 0, "original", 1, 0, 0, stylize3d.MODEL_NAME, True,
                                          api_name="/stylize_head")
    assert len(table["data"]) == 1 and stylize3d.MODEL_NAME in info


def test_without_styles_only_original_with_a_note(weights_dir, tmp_path_factory):
    registry = load_registry(weights_dir)
    registry._entries.pop(STYLE)
    registry._entries.pop(ENCODER_NAME, None)
    assert stylize3d.available_styles(registry) == []
    demo, client = _launch(Runtime("cpu", registry=registry), tmp_path_factory)
    try:
        _, stylized, _, table, _ = client.predict("seed", 1, None, 0, "original", 2, 30, 0, api_name="/stylize_head")
        assert len(stylized) == 2 and all(row[1] == pytest.approx(1, abs=1e-3) for row in table["data"])
        with pytest.raises(Exception, match="(?i)choices"):
            client.predict("seed", 0, None, 0, STYLE, 3, 30, 0, api_name="/stylize_head")
        with pytest.raises(Exception, match="(?i)encoder"):
            client.predict("photo", 0, handle_file(EXAMPLE_PHOTOS[0]), 0, "original", 1, 0, 0,
                           api_name="/stylize_head")
    finally:
        demo.close()


def test_the_cpu_preview_generator_is_used_and_named_when_it_is_the_only_one(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preview_weights")
    preview = stylize3d.MODEL_NAMES[-1]
    add_head3d_generator(folder, preview)
    add_identity(folder)
    registry = load_registry(folder)
    assert stylize3d.available(registry) and preferred_model(registry) == preview
    demo, client = _launch(Runtime("cpu", registry=registry), tmp_path_factory)
    try:
        notes = " ".join(c["props"].get("value") or "" for c in demo.config["components"]
                         if c.get("type") == "markdown")
        assert "Preview models" in notes and preview in notes
        _, stylized, glb, table, info = client.predict("seed", 2, None, 0, "original", 2, 30, 0, preview, True,
                                                       api_name="/stylize_head")
        assert len(stylized) == 2 and preview in info
        _check_glb(glb)
        with pytest.raises(Exception, match=f"(?i)encoder.*{preview}|{preview}.*encoder"):
            client.predict("photo", 0, handle_file(EXAMPLE_PHOTOS[0]), 0, "original", 1, 0, 0, preview, True,
                           api_name="/stylize_head")
    finally:
        demo.close()


def test_bundled_head_turns_with_the_yaw_and_its_glb_bulges_toward_the_viewer(app_client):
    """The launched app on its bundled weights ('original' style): the views at yaw -30, 0
    and +30 are different images, the frontal one of a face; the GLB (+Y up, the head looking along +Z as in the
    generator's world frame) is a surface of the head, not the density fog that fills the rendering box, and its
    largest piece bulges toward the viewer: its front (largest z) across the middle is ahead of its two sides."""
    original, stylized, glb, table, info = app_client.predict("seed", 0, None, 0, "original", 3, 30, 0,
                                                              api_name="/stylize_head")
    views = [np.asarray(Image.open(item["image"]).convert("RGB"), np.float32) for item in original]
    assert len(views) == 3 and len(stylized) == 3
    assert min(np.abs(views[i] - views[j]).mean() for i, j in ((0, 1), (1, 2), (0, 2))) > 3
    assert detect_faces(np.asarray(Image.fromarray(views[1].astype(np.uint8)).resize((128, 128))))
    _check_glb(glb)
    mesh = trimesh.load(glb, force="mesh")
    assert (mesh.extents < 0.6).all()  # the box is 1 unit wide; fog at a low level fills it
    piece = max(mesh.split(only_watertight=False), key=lambda part: len(part.faces))
    x, z = piece.vertices[:, 0], piece.vertices[:, 2]
    bins = np.clip(((x - x.min()) / np.ptp(x) * 5).astype(int), 0, 4)
    front = [z[bins == index].max() for index in range(5)]
    assert front[2] > front[0] and front[2] > front[4], f"front z across the head: {np.round(front, 3)}"
    assert preferred_model(W.default_registry()) in info


def test_bundled_photo_input_renders_the_photos_head(app_client):
    """The bundled preview generator with its photo encoder: an example photo gives three different views of a face
    and a GLB, and refinement steps bring the frontal render closer to the photo (the note reports the cosine)."""
    def similarity(info):
        return float(re.search(r"identity similarity input vs frontal render: (-?[0-9]+\.[0-9]+)", info).group(1))

    original, _, glb, _, info = app_client.predict("photo", 0, handle_file(EXAMPLE_PHOTOS[2]), 0, "original", 3, 30,
                                                   0, api_name="/stylize_head")
    views = [np.asarray(Image.open(item["image"]).convert("RGB")) for item in original]
    assert min(np.abs(views[i].astype(np.float32) - views[j]).mean() for i, j in ((0, 1), (1, 2), (0, 2))) > 3
    assert detect_faces(np.asarray(Image.fromarray(views[1]).resize((128, 128))))
    _check_glb(glb)
    *_, refined_info = app_client.predict("photo", 0, handle_file(EXAMPLE_PHOTOS[2]), 10, "original", 1, 0, 0,
                                          api_name="/stylize_head")
    assert similarity(refined_info) > similarity(info) + 0.01, (info, refined_info)


def test_bundled_styles_restyle_the_head_and_report_identity_per_view(app_client):
    """Every bundled style of the preview generator (at least two) visibly changes all three views of a seed's head,
    gives a GLB, and fills the table with one identity similarity per view; different styles give different heads."""
    registry = W.default_registry()
    styles = available_styles(registry, preferred_model(registry), method="stylize3d")
    assert len(styles) >= 2, styles
    stylized_views = {}
    for style in styles:
        original, stylized, glb, table, info = app_client.predict("seed", 3, None, 0, style, 3, 30, 0,
                                                                  api_name="/stylize_head")
        before = np.stack([np.asarray(Image.open(item["image"]).convert("RGB"), np.float32) for item in original])
        after = np.stack([np.asarray(Image.open(item["image"]).convert("RGB"), np.float32) for item in stylized])
        change = np.abs(after - before).mean(axis=(1, 2, 3))
        assert (change > 10).all(), f"{style}: mean |change| per view {np.round(change, 1)}"
        similarities = [row[1] for row in table["data"]]
        assert len(similarities) == 3 and all(-1 <= float(value) <= 1 for value in similarities)
        _check_glb(glb)
        assert style in info
        stylized_views[style] = after
    first, second = styles[:2]
    assert np.abs(stylized_views[first] - stylized_views[second]).mean() > 5


def test_bundled_styles_are_labelled_by_their_style_name():
    registry = W.default_registry()
    choices = dict((value, label) for label, value in stylize3d._style_choices(registry, preferred_model(registry)))
    assert choices["original"] == "original"
    assert choices["head3d-style-toon-faces64"] == "toon (head3d-style-toon-faces64)"
