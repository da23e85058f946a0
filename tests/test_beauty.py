"""core.beauty: the bundled beauty scorers through the registry, their gradients and training subsets, and the fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.beauty import BeautyScorer, build_beauty_evaluator, build_beauty_scorer
from core.identity import IdentityEncoder, image_to_tensor
from core.runtime import Runtime
from training.train_beauty import fit_mlp, fit_ridge, head_predict, split_halves

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
FACES = sorted((REPO / "tests" / "fixtures" / "faces").glob("*.jpg"))
TINY_IDENTITY = {"stem_channels": 4, "stages": [[4, 1, False], [8, 1, True]], "embedding_dim": 16}


@pytest.fixture(scope="module")
def runtime():
    return Runtime("cpu")


@pytest.fixture(scope="module")
def aligned_faces():
    from core.face import prepare_face

    return torch.cat([image_to_tensor(prepare_face(path).image) for path in FACES])


@pytest.fixture(scope="module")
def regressor(runtime):
    return runtime.get_model("beauty-regressor", build_beauty_scorer)


@pytest.fixture(scope="module")
def evaluator(runtime):
    return runtime.get_model("beauty-evaluator", build_beauty_evaluator)


def test_bundled_scorers_give_finite_varied_scores_on_the_rating_scale(regressor, evaluator, aligned_faces):
    assert len(aligned_faces) == 6
    with torch.no_grad():
        for model in (regressor, evaluator):
            scores = model(aligned_faces)
            assert scores.shape == (6,)
            assert torch.isfinite(scores).all()
            assert (scores >= 1).all() and (scores <= 10).all()
            assert scores.std() > 0.01  # different faces get different scores
            # any crop size: the 128-px crop of the same faces scores close to the 256-px one
            small = torch.nn.functional.interpolate(aligned_faces, size=128, mode="bilinear", antialias=True)
            assert (model(small) - scores).abs().max() < 1.0


def test_regressor_keeps_the_identity_network_out_of_its_weights_file(runtime):
    config = runtime.registry.load_config("beauty-regressor")
    state = runtime.registry.load_state_dict("beauty-regressor")
    assert config["identity_model"] == "identity-resnet"
    assert all(not key.startswith("identity") for key in state)
    assert all(tensor.dtype == torch.float16 for tensor in state.values())
    assert sum(t.numel() for t in state.values()) < 100_000


def test_gradient_flows_from_the_score_to_the_input_pixels(regressor, evaluator, aligned_faces):
    for model in (regressor, evaluator):
        images = aligned_faces[:2].clone().requires_grad_(True)
        model(images).sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all()
        assert images.grad.abs().sum() > 0


def test_evaluator_and_regressor_were_trained_on_disjoint_photos(runtime):
    regressor_subset = runtime.registry.load_config("beauty-regressor")["training_subset"]
    evaluator_subset = runtime.registry.load_config("beauty-evaluator")["training_subset"]
    regressor_names = set(regressor_subset["names_sha256_12"])
    evaluator_names = set(evaluator_subset["names_sha256_12"])
    assert len(regressor_names) == regressor_subset["count"] > 500
    assert len(evaluator_names) == evaluator_subset["count"] > 500
    assert regressor_names.isdisjoint(evaluator_names)
    assert regressor_subset["split"] == evaluator_subset["split"] == "train"
    assert regressor_subset["half"] != evaluator_subset["half"]


def test_training_halves_are_disjoint_deterministic_and_balanced_per_group():
    names = [f"photo_{i}.jpg" for i in range(101)]
    groups = np.array(["a"] * 60 + ["b"] * 41)
    halves = split_halves(names, groups)
    np.testing.assert_array_equal(halves, split_halves(names, groups))
    assert set(np.unique(halves)) == {0, 1}
    for group in ("a", "b"):
        counts = np.bincount(halves[groups == group], minlength=2)
        assert abs(counts[0] - counts[1]) <= 1
    # a sample's half depends on the names in its group, not on their order
    order = np.random.default_rng(0).permutation(101)
    np.testing.assert_array_equal(split_halves([names[i] for i in order], groups[order]), halves[order])


def test_ridge_and_mlp_fits_recover_a_known_linear_relation():
    rng = np.random.default_rng(0)
    features = rng.normal(2.0, 3.0, size=(400, 8))
    weights = rng.normal(size=8)
    targets = features @ weights * 0.1 + 5.0
    for state in (fit_ridge(features, targets, alpha=1e-3), fit_mlp(features, targets, hidden=32, weight_decay=0.0)):
        predicted = head_predict(state, features)
        assert np.abs(predicted - targets).max() < 0.1 * targets.std() * (4 if "hidden.weight" in state else 0.1)
    # a wrong relation is not recovered: shuffled targets leave a large error
    shuffled = head_predict(fit_ridge(features, rng.permutation(targets), alpha=1e-3), features)
    assert np.abs(shuffled - targets).mean() > 0.5 * targets.std()


def test_scorer_is_the_head_on_the_identity_descriptor_clamped_to_the_scale():
    torch.manual_seed(0)
    identity = IdentityEncoder(TINY_IDENTITY).eval()
    config = {"identity_model": "unused", "feature_dim": 16, "hidden": 0, "score_range": [1.0, 10.0]}
    state = {"feature_mean": torch.zeros(16), "feature_scale": torch.ones(16),
             "out.weight": torch.randn(1, 16), "out.bias": torch.tensor([5.0])}
    scorer = build_beauty_scorer(config, state, identity=identity)
    assert isinstance(scorer, BeautyScorer)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        descriptor = identity.descriptor(identity.chip_from_aligned(images))
        expected = (descriptor @ state["out.weight"].T)[:, 0] + 5.0
        torch.testing.assert_close(scorer(images), expected.clamp(1, 10))
    state["out.bias"] = torch.tensor([50.0])
    with torch.no_grad():
        assert (build_beauty_scorer(config, state, identity=identity)(images) == 10.0).all()


def test_bundled_configs_report_test_metrics():
    for folder in ("beauty_regressor", "beauty_evaluator"):
        config = json.loads((REPO / "weights" / folder / "config.json").read_text())
        test = config["metrics"]["test"]
        assert {"pearson_r", "spearman_rho", "mae"} <= set(test)
        assert test["pearson_r"] > 0.2 and test["mae"] < 1.5
        assert "Bias" in (REPO / "weights" / folder / "README.md").read_text()
