"""Latents2Semantics tab end to end: the launched app serves /l2s_edit (on a tiny random L2SAE registered in a
temporary registry), returns PNGs with provenance, and refuses bad input; on the bundled L2SAE, an edit changes the
predicted region and leaves the photo's pixels far from it as they were."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradio_client import Client, handle_file
from PIL import Image

from app import build_demo
from core import weights as W
from core.face import prepare_face
from core.pipelines.latents2semantics import CROP_SIZE, FEATHER_FRACTION, MODEL_NAMES, Latents2SemanticsPipeline
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs import available_tabs, latents2semantics
from tabs.common import EXAMPLE_PHOTOS, MAX_UPLOAD_SIZE, preview_note
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


def test_pipeline_falls_back_to_the_preview_and_the_tab_says_so(tmp_path):
    add_l2sae(tmp_path, MODEL_NAMES[-1])
    registry = load_registry(tmp_path)
    assert latents2semantics in available_tabs(registry)
    pipeline = Latents2SemanticsPipeline.from_pretrained(runtime=Runtime("cpu", registry=registry))
    assert pipeline.model_name == MODEL_NAMES[-1]
    note = preview_note(registry, {MODEL_NAMES[0]: MODEL_NAMES[-1]})
    assert "Preview models" in note and f"{MODEL_NAMES[-1]} (32 px)" in note and "Known limits" not in note
    entry = registry.entry(MODEL_NAMES[-1])
    registry.add(dataclasses.replace(entry, extra={**entry.extra, "limitations": "Coarse lip masks."}))
    note = preview_note(registry, {MODEL_NAMES[0]: MODEL_NAMES[-1]})
    assert note.endswith(f"Known limits of {MODEL_NAMES[-1]}: Coarse lip masks.")


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
    assert record["parameters"]["keep_detail"] is True  # the checkbox's default when a client leaves it out
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


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(tensor, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy() > 0


@pytest.mark.parametrize("region, keep_detail", [("hair", True), ("lips", False)])
def test_bundled_model_changes_the_region_and_nothing_far_from_it(app_client, region, keep_detail):
    """The launched app on its bundled weights: /l2s_edit on a fixture face. The overlay tints where the blend mask
    M > 0; M is 1 on the predicted region and 0 beyond twice the feather radius. Far outside that, every edited pixel
    is the aligned input's own; on the region (the tint's eroded core) the edit visibly changes the pixels."""
    photo = EXAMPLE_PHOTOS[0]
    crop = prepare_face(photo, size=CROP_SIZE).image.astype(np.int16)
    edited, overlay, _, info = app_client.predict(handle_file(photo), region, "random style", 1.5, 3, 2, None,
                                                  keep_detail, api_name="/l2s_edit")
    tinted = np.abs(np.asarray(Image.open(overlay).convert("RGB"), np.int16) - crop).max(axis=-1) > 0
    assert 0.002 < tinted.mean() < 0.6, f"{region}: predicted region covers {tinted.mean():.1%} of the crop"
    feather = max(round(FEATHER_FRACTION * CROP_SIZE), 1)
    far = ~_dilate(tinted, 2 * feather + 1)
    core = ~_dilate(~tinted, feather)
    assert far.mean() > 0.3 and core.sum() > 50
    assert f"**{region}**" in info and len(edited) == 2
    for item in edited:
        pixels = np.asarray(Image.open(item["image"]).convert("RGB"), np.int16)
        assert np.array_equal(pixels[far], crop[far])
        assert np.abs(pixels[core] - crop[core]).mean() > 2.0
