"""Beauty tab end to end on the bundled weights (its own module: `tests/test_tab_beauty.py` patches
`BeautyOptimizer.from_pretrained` with a tiny pipeline for its whole module)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from core.pipelines.beauty import BeautyOptimizer, to_tensor
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs.common import EXAMPLES_DIR
def test_bundled_models_optimize_a_fixture_face(app_client):
    """The launched app on its bundled weights: /beauty_optimize on a fixture face returns the aligned input, the
    reconstruction and the optimised face at the generator's size with provenance, and the scores in the table are
    the bundled scorer's scores of the returned images."""
    photo = sorted(EXAMPLES_DIR.glob("*.jpg"))[2]
    input_png, reconstruction_png, optimized_png, scores, plot = app_client.predict(
        "photo", handle_file(str(photo)), 0, 3, 6, 2.0, 1.0, api_name="/beauty_optimize")
    pipeline = BeautyOptimizer.from_pretrained(runtime=Runtime("cpu"))
    size = pipeline.generator.img_resolution
    assert Image.open(input_png).size == (256, 256)
    assert Image.open(reconstruction_png).size == Image.open(optimized_png).size == (size, size)
    record = read_png_provenance(optimized_png)
    assert record["model"] == pipeline.model_names["generator"] and record["parameters"]["budget"] == 3
    before, after = (float(v) for v in re.search(r"optimized scorer, 1-10\) \| ([\d.]+) \| \*\*([\d.]+)\*\*",
                                                  scores).groups())
    for path, shown in ((reconstruction_png, before), (optimized_png, after)):
        image = to_tensor(np.array(Image.open(path).convert("RGB")), pipeline.device)
        assert float(pipeline.scorer(image)[0]) == pytest.approx(shown, abs=0.03)  # 8-bit PNG, 2 decimals
