"""Provenance: every PNG carries method, model, revision, seed, parameters and a synthetic statement."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.provenance import Provenance, read_png_provenance, save_png


def test_png_round_trips_provenance(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    provenance = Provenance("beauty", "stylegan2-faces128", "b" * 40, seed=42,
                            parameters={"budget": 8, "weight": np.float32(0.5)})
    path = save_png(image, tmp_path / "out.png", provenance)
    record = read_png_provenance(path)
    assert record["method"] == "beauty" and record["seed"] == 42 and record["revision"] == "b" * 40
    assert record["parameters"] == {"budget": 8, "weight": 0.5}
    assert "synthetic" in record["statement"].lower()
    with Image.open(path) as reloaded:
        assert np.array_equal(np.asarray(reloaded), image)
        assert reloaded.text["model"] == "stylegan2-faces128"


def test_non_uint8_images_are_refused(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        save_png(np.zeros((4, 4, 3), np.float32), tmp_path / "x.png", Provenance("m", "n"))
