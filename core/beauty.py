"""Facial-beauty scorers for the beauty-optimisation tab (arXiv 2501.00811, see docs/methods.md §4).

Two models predict the MEBeauty mean attractiveness rating (1-10) of an FFHQ-aligned crop (`core.face`) in [-1, 1]:

* `BeautyScorer` (registry `beauty-regressor`), the optimiser's objective: a small head (ridge or a 2-layer MLP) on
  the raw 128-d descriptor of the identity network (`core.identity`, registry `identity-resnet`). Differentiable end
  to end: image -> dlib chip -> identity ResNet -> head. The identity network is not in this model's weights file:
  the config names the registry model it builds on and `build_beauty_scorer` loads it (or takes one passed in).
* `BeautyEvaluator` (registry `beauty-evaluator`), used only to check that a gain is real: a small CNN on the whole
  crop at 64 px, trained on the other half of the MEBeauty train split. Different inputs, architecture and
  training photos, so an optimiser exploiting the scorer's features does not fool it for free.

Both return scores clamped to the rating scale. Attractiveness models encode the taste of their raters and the
make-up of their data; see the model cards in `weights/beauty_regressor/` and `weights/beauty_evaluator/`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.identity import IdentityEncoder

SCORE_RANGE = (1.0, 10.0)


class BeautyHead(nn.Module):
    """Standardised features -> score: linear (ridge) when `hidden` is 0, else Linear-ReLU-Linear."""

    def __init__(self, feature_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(feature_dim))
        self.hidden = nn.Linear(feature_dim, hidden) if hidden else None
        self.out = nn.Linear(hidden or feature_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """B x D features -> B unclamped scores."""
        x = (features - self.feature_mean) / self.feature_scale
        if self.hidden is not None:
            x = F.relu(self.hidden(x))
        return self.out(x)[:, 0]


def clamp_score(scores: torch.Tensor, score_range: tuple[float, float] = SCORE_RANGE) -> torch.Tensor:
    """Clamp to the rating scale (the gradient is zero only where a score leaves it)."""
    return scores.clamp(*score_range)


class BeautyScorer(nn.Module):
    """Primary beauty scorer: FFHQ-aligned crops (B x 3 x S x S in [-1, 1]) -> B scores on the 1-10 scale.

    `identity` is the encoder whose raw descriptor feeds the head; it is a submodule (it follows `.to()`), but
    `load_head` and the bundled weights file cover the head alone.
    """

    def __init__(self, config: dict[str, Any], identity: IdentityEncoder) -> None:
        super().__init__()
        self.config = config
        self.identity = identity
        self.head = BeautyHead(config["feature_dim"], config.get("hidden", 0))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The identity network's raw 128-d descriptor of the dlib chip inside each aligned crop."""
        return self.identity.descriptor(self.identity.chip_from_aligned(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return clamp_score(self.head(self.features(images)), tuple(self.config.get("score_range", SCORE_RANGE)))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class BeautyEvaluator(nn.Module):
    """Independent evaluator: aligned crops of any size (B x 3 x S x S in [-1, 1]) are resized to `input_size`
    and scored by a small CNN; B scores on the 1-10 scale."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        channels = [3, *config["channels"]]
        self.features = nn.Sequential(*(_conv_block(a, b) for a, b in zip(channels[:-1], channels[1:])))
        self.dropout = nn.Dropout(config.get("dropout", 0.0))
        self.out = nn.Linear(channels[-1], 1)
        self.register_buffer("score_mean", torch.tensor(float(config.get("score_mean", 5.5))))
        self.register_buffer("score_std", torch.tensor(float(config.get("score_std", 1.0))))

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """Unclamped scores (used for training)."""
        size = self.config["input_size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = self.features(images).mean(dim=(2, 3))
        return self.score_mean + self.score_std * self.out(self.dropout(x))[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return clamp_score(self.raw(images), tuple(self.config.get("score_range", SCORE_RANGE)))


def load_identity_encoder(name: str) -> IdentityEncoder:
    """The registry's identity network `name` (float32, CPU, eval mode)."""
    from core.weights import default_registry

    registry = default_registry()
    encoder = IdentityEncoder(registry.load_config(name))
    encoder.load_state_dict(registry.load_state_dict(name))
    return encoder.float().eval()


def build_beauty_scorer(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor], identity: IdentityEncoder | None = None
) -> BeautyScorer:
    """`Runtime.get_model` builder for `beauty-regressor`; loads `config["identity_model"]` from the registry unless
    an identity encoder is passed in."""
    identity = identity if identity is not None else load_identity_encoder(config["identity_model"])
    scorer = BeautyScorer(config, identity)
    scorer.head.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return scorer.eval()


def build_beauty_evaluator(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> BeautyEvaluator:
    """`Runtime.get_model` builder for `beauty-evaluator`."""
    evaluator = BeautyEvaluator(config)
    evaluator.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return evaluator.eval()
