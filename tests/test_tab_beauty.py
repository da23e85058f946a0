"""Beauty tab end to end: the launched app serves /beauty_optimize with progress, images with provenance, scores and
the per-generation plot. Until the base generator and encoder are trained, the pipeline runs on tiny random modules
(the registry holds placeholder entries so that the tab shows)."""

from __future__ import annotations

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app import build_demo
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs import beauty
from tabs.common import EXAMPLE_PHOTOS, MAX_UPLOAD_SIZE
from tests.tiny_weights import add_beauty_placeholders, load_registry, patch_beauty


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("weights")
    add_beauty_placeholders(weights_dir)
    runtime = Runtime("cpu", registry=load_registry(weights_dir))
    with pytest.MonkeyPatch.context() as patch:
        patch_beauty(patch)
        demo = build_demo(runtime).queue(max_size=4)
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, max_file_size=MAX_UPLOAD_SIZE)
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
        demo.close()


def test_photo_optimization_returns_images_scores_and_history(client):
    job = client.submit("photo", handle_file(EXAMPLE_PHOTOS[1]), 3, 4, 6, 2.0, 1.0, api_name="/beauty_optimize")
    input_png, reconstruction_png, optimized_png, scores, plot = job.result(timeout=120)
    assert Image.open(input_png).size == (256, 256)
    record = read_png_provenance(optimized_png)
    assert record["method"].startswith("Regression-guided") and record["seed"] == 3
    assert record["parameters"]["budget"] == 4 and record["parameters"]["photo"] is True
    assert "independent evaluator" in scores and "identity similarity" in scores
    table = plot["value"] if isinstance(plot, dict) and "value" in plot else plot
    rows = table["data"]
    assert len(rows) == 2 * 4  # best and mean for each of the 4 generations
    series = [row[table["columns"].index("series")] for row in rows]
    assert sorted(set(series)) == sorted({beauty.BEST_SERIES, beauty.MEAN_SERIES})


def test_seed_source_needs_no_photo_and_bad_values_are_refused(client):
    *_, scores, _ = client.predict("random face (seed)", None, 11, 2, 4, 1.0, 1.0, api_name="/beauty_optimize")
    assert "beauty score" in scores
    with pytest.raises(Exception, match="(?i)upload a photo"):
        client.predict("photo", None, 0, 2, 4, 1.0, 1.0, api_name="/beauty_optimize")
    with pytest.raises(Exception, match="(?i)maximum"):
        client.predict("random face (seed)", None, 0, 500, 4, 1.0, 1.0, api_name="/beauty_optimize")
    with pytest.raises(Exception, match="(?i)choices"):
        client.predict("webcam", None, 0, 2, 4, 1.0, 1.0, api_name="/beauty_optimize")


