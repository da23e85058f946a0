"""Latents2Semantics tab end to end: the launched app serves /l2s_edit (on a tiny random L2SAE registered in a
temporary registry until trained weights are bundled), returns PNGs with provenance, and refuses bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app import build_demo
from core import weights as W
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs import available_tabs, latents2semantics
from tabs.common import EXAMPLE_PHOTOS, MAX_UPLOAD_SIZE
from tests.tiny_weights import add_l2sae, load_registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> W.Registry:
    weights_dir = tmp_path_factory.mktemp("weights")
    add_l2sae(weights_dir)
    return load_registry(weights_dir)


@pytest.fixture(scope="module")
def client(registry, tmp_path_factory):
    demo = build_demo(Runtime("cpu", registry=registry)).queue(max_size=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, max_file_size=MAX_UPLOAD_SIZE)
    yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    demo.close()


def test_tab_shows_only_when_its_model_resolves(registry):
    assert latents2semantics in available_tabs(registry)
    assert latents2semantics not in available_tabs(W.Registry([]))


def test_edit_returns_variants_mask_and_reconstruction_with_provenance(client):
    edited, overlay, reconstruction, info = client.predict(
        handle_file(EXAMPLE_PHOTOS[0]), "hair", "random style", 1.5, 7, 3, None, api_name="/l2s_edit")
    assert len(edited) == 3
    first = Path(edited[0]["image"])
    with Image.open(first) as image:
        assert image.size == (256, 256)
    record = read_png_provenance(first)
    assert record["method"] == "Latents2Semantics" and record["seed"] == 7
    assert record["parameters"]["region"] == "hair"
    assert Image.open(overlay).size == (256, 256) and Image.open(reconstruction).size == (32, 32)
    assert "hair" in info and " s** on cpu" in info


def test_reference_mode_needs_a_reference_and_bad_values_are_refused(client, tmp_path):
    photo = handle_file(EXAMPLE_PHOTOS[0])
    with pytest.raises(Exception, match="(?i)upload a reference photo"):
        client.predict(photo, "lips", "style from reference", 1.0, 0, 1, None, api_name="/l2s_edit")
    edited, *_ = client.predict(photo, "lips", "style from reference", 1.0, 0, 1, handle_file(EXAMPLE_PHOTOS[1]),
                                api_name="/l2s_edit")
    assert len(edited) == 1
    with pytest.raises(Exception, match="(?i)not in the list of choices|choices"):
        client.predict(photo, "ears", "random style", 1.0, 0, 1, None, api_name="/l2s_edit")
    with pytest.raises(Exception, match="(?i)greater than maximum|maximum"):
        client.predict(photo, "hair", "random style", 1.0, 0, 99, None, api_name="/l2s_edit")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), "white").save(blank)
    with pytest.raises(Exception, match="(?i)no face"):
        client.predict(handle_file(str(blank)), "hair", "random style", 1.0, 0, 1, None, api_name="/l2s_edit")
    edited, *_ = client.predict(photo, "skin", "random style", 1.0, 0, 1, None, api_name="/l2s_edit")
    assert len(edited) == 1  # still serving after the errors
