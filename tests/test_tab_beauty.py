"""Beauty tab end to end: the launched app serves /beauty_optimize with progress, images with provenance, scores and
the per-generation plot. Until the base generator and encoder are trained, the pipeline runs on tiny random modules
(the registry holds placeholder entries so that the tab shows)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from gradio_client import Client, handle_file
from PIL import Image

from app import build_demo
from core import weights as W
from core.nets.encoders import StyleEncoder, style_encoder_config
from core.nets.stylegan2 import Generator
from core.pipelines.beauty import BeautyOptimizer, OptimizerSettings
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs import beauty
from tabs.common import EXAMPLE_PHOTOS, MAX_UPLOAD_SIZE


class MeanBrightness(torch.nn.Module):
    """Stand-in scorer: mean pixel value mapped to the 1-10 scale."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 5.5 + 4.5 * images.mean(dim=(1, 2, 3))


class PooledIdentity(torch.nn.Module):
    def embed_aligned(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.adaptive_avg_pool2d(images, 4).flatten(1), dim=1)


def tiny_pipeline(runtime: Runtime) -> BeautyOptimizer:
    torch.manual_seed(0)
    generator = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3,
                          mapping_kwargs={"num_layers": 2}, synthesis_kwargs={"channel_base": 128, "channel_max": 8})
    encoder = StyleEncoder(style_encoder_config(generator.num_ws, generator.w_dim, 16, channels=[8, 8, 8],
                                                pyramid_channels=8, head_channels=4, head_grid=2, head_hidden=8))
    return BeautyOptimizer(generator.eval(), encoder.eval(), MeanBrightness(), MeanBrightness(), PooledIdentity(),
                           runtime=runtime, settings=OptimizerSettings(directions=3, batch_size=8),
                           model_names={"generator": "tiny-generator"})


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("weights")
    for name in beauty.REQUIRED_MODELS:
        folder = weights_dir / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"placeholder": name}))
        W.main(["register", str(folder), "--name", name, "--licence", "test",
                "--registry", str(weights_dir / "registry.json")])
    runtime = Runtime("cpu", registry=W.Registry.load(weights_dir / "registry.json"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BeautyOptimizer, "from_pretrained", classmethod(lambda cls, runtime=None, **_: tiny_pipeline(runtime)))
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
    rows = plot["value"]["data"] if isinstance(plot, dict) and "value" in plot else plot["data"]
    assert len(rows) == 2 * 4  # best and mean for each of the 4 generations


def test_seed_source_needs_no_photo_and_bad_values_are_refused(client):
    *_, scores, _ = client.predict("random face (seed)", None, 11, 2, 4, 1.0, 1.0, api_name="/beauty_optimize")
    assert "beauty score" in scores
    with pytest.raises(Exception, match="(?i)upload a photo"):
        client.predict("photo", None, 0, 2, 4, 1.0, 1.0, api_name="/beauty_optimize")
    with pytest.raises(Exception, match="(?i)maximum"):
        client.predict("random face (seed)", None, 0, 500, 4, 1.0, 1.0, api_name="/beauty_optimize")
    with pytest.raises(Exception, match="(?i)choices"):
        client.predict("webcam", None, 0, 2, 4, 1.0, 1.0, api_name="/beauty_optimize")
