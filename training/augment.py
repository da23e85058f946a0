"""Differentiable augmentation for small-data GAN training (in the spirit of DiffAugment, Zhao et al. 2020).

The same random transforms are applied to every image the discriminator sees, real or generated, and they are
differentiable so the generator is trained through them. Each operation is applied to each sample independently
with probability `p`; `p` can be adapted during training like ADA (Karras et al. 2020) from the overfitting
heuristic r_t = E[sign(D(real))] (`AdaptiveProbability`).

Operations (images in about [-1, 1], NCHW):
* brightness: add U(-0.5, 0.5);  saturation: scale the deviation from the pixel's channel mean by U(0, 2);
  contrast: scale the deviation from the image mean by U(0.5, 1.5);
* translation: integer shift by up to 1/8 of the size in x and y, zeros shifted in;
* cutout: zero a square of half the size at a random position (partly outside the image allowed).
"""

from __future__ import annotations

import torch

OPERATIONS = ("brightness", "saturation", "contrast", "translation", "cutout")
GROUPS = {"color": ("brightness", "saturation", "contrast")}
TRANSLATION_RATIO = 1 / 8
CUTOUT_RATIO = 1 / 2


def parse_operations(spec: str) -> tuple[str, ...]:
    """'color,translation,cutout' -> the operation names; 'color' expands to brightness, saturation, contrast."""
    names: list[str] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        for name in GROUPS.get(item, (item,)):
            if name not in OPERATIONS:
                raise ValueError(f"unknown augmentation {name!r}; expected {OPERATIONS} or {tuple(GROUPS)}")
            names.append(name)
    return tuple(names)


def _chosen(x: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample 0/1 mask [N, 1, 1, 1] (probability p) in x's dtype."""
    return (torch.rand([x.shape[0], 1, 1, 1], device=x.device) < p).to(x.dtype)


def _brightness(x, chosen):
    return x + (torch.rand([x.shape[0], 1, 1, 1], device=x.device, dtype=x.dtype) - 0.5) * chosen


def _saturation(x, chosen):
    mean = x.mean(dim=1, keepdim=True)
    factor = torch.rand([x.shape[0], 1, 1, 1], device=x.device, dtype=x.dtype) * 2
    return mean + (x - mean) * torch.lerp(torch.ones_like(factor), factor, chosen)


def _contrast(x, chosen):
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    factor = torch.rand([x.shape[0], 1, 1, 1], device=x.device, dtype=x.dtype) + 0.5
    return mean + (x - mean) * torch.lerp(torch.ones_like(factor), factor, chosen)


def _translation(x, chosen):
    n, _, h, w = x.shape
    max_dy, max_dx = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    keep = chosen.reshape(n, 1, 1).to(torch.int64)
    dy = torch.randint(-max_dy, max_dy + 1, [n, 1, 1], device=x.device) * keep
    dx = torch.randint(-max_dx, max_dx + 1, [n, 1, 1], device=x.device) * keep
    rows = torch.arange(h, device=x.device).reshape(1, h, 1) - dy + max_dy  # index into the padded image
    cols = torch.arange(w, device=x.device).reshape(1, 1, w) - dx + max_dx
    padded = torch.nn.functional.pad(x, [max_dx, max_dx, max_dy, max_dy])
    batch = torch.arange(n, device=x.device).reshape(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # [N, H, W, C] -> NCHW


def _cutout(x, chosen):
    n, _, h, w = x.shape
    size_y, size_x = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    top = torch.randint(-(size_y // 2), h - size_y // 2 + 1, [n, 1, 1], device=x.device)
    left = torch.randint(-(size_x // 2), w - size_x // 2 + 1, [n, 1, 1], device=x.device)
    rows = torch.arange(h, device=x.device).reshape(1, h, 1)
    cols = torch.arange(w, device=x.device).reshape(1, 1, w)
    inside = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)
    return x * (1 - inside.unsqueeze(1).to(x.dtype) * chosen)


_FUNCTIONS = {"brightness": _brightness, "saturation": _saturation, "contrast": _contrast,
              "translation": _translation, "cutout": _cutout}


DEFAULT_OPERATIONS = parse_operations("color,translation,cutout")


def augment(images: torch.Tensor, p: float, operations: tuple[str, ...] = DEFAULT_OPERATIONS) -> torch.Tensor:
    """Apply each of `operations` (in order) to each image independently with probability `p`; differentiable.

    p <= 0 returns `images` unchanged (no random numbers are drawn).
    """
    if p <= 0 or not operations:
        return images
    x = images
    for name in operations:
        x = _FUNCTIONS[name](x, _chosen(x, p))
    return x


class AdaptiveProbability:
    """ADA's controller for the augmentation probability p.

    `observe(real_logits)` accumulates sign(D(real)); `update(batch_images)` (call every `interval` steps) moves p by
    sign(r_t - target) * images_since_last_update / (adjust_kimg * 1000), clamped to [0, 1], and returns r_t.
    A `target` of None keeps p fixed.
    """

    def __init__(self, p: float = 0.0, target: float | None = 0.6, adjust_kimg: float = 100.0):
        self.p = float(p)
        self.target = target
        self.adjust_kimg = adjust_kimg
        self._sign_sum: torch.Tensor | float = 0.0
        self._count = 0

    def observe(self, real_logits: torch.Tensor) -> None:
        """Accumulate sign(D(real)) (stays on the logits' device until `update`)."""
        self._sign_sum = self._sign_sum + real_logits.detach().float().sign().sum()
        self._count += real_logits.numel()

    def update(self, images_seen: int) -> float | None:
        """Adjust p from the signs observed since the last update; returns r_t (None when nothing was observed)."""
        if self._count == 0:
            return None
        r_t = float(self._sign_sum) / self._count
        self._sign_sum, self._count = 0.0, 0
        if self.target is not None:
            step = (1.0 if r_t > self.target else -1.0) * images_seen / (self.adjust_kimg * 1000)
            self.p = min(max(self.p + step, 0.0), 1.0)
        return r_t

    def state(self) -> dict[str, float]:
        """p and the signs observed since the last update, for a checkpoint's `extra`."""
        return {"augment_p": self.p, "ada_sign_sum": float(self._sign_sum), "ada_count": self._count}

    def load_state(self, state: dict) -> None:
        """Restore what `state()` returned."""
        self.p, self._sign_sum, self._count = state["augment_p"], state["ada_sign_sum"], state["ada_count"]
