"""Model-card metrics of an AgileGAN3D style: stylized 3D portraits of held-out photos, through the style's encoder.

`training/agilegan3d.py` calls `evaluate_portraits` on every exported style (and on the exemplar-count study's
styles), on the run's held-out test-split crops with their archive camera labels. Each photo is encoded with its
camera; the latent is rendered by the generator at that camera and at yaws `EVAL_YAWS` (pitch 0):

* `photo_identity`: identity cosine (`core.identity`) of the render at the photo's camera to the photo (mean).
* `multiview_identity`: identity cosine of the renders at yaw -30, -15, 15, 30 to the frontal render (mean over
  photos and yaws): how well the stylized portrait keeps one identity while it turns.
* `identity_between_portraits`: mean identity cosine between the frontal renders of different photos, and
  `distinct_people_rate`: the fraction of neighbouring photos (i, i + 1) whose frontal renders are different people
  by dlib's descriptor distance (at least 0.6); `identity_between_photos` and `distinct_people_rate_photos` are the
  same for the photos themselves (with at least two photos). A style that maps everyone to one face scores a high
  cosine and a low rate.
* `style_strength` (with a reference generator, the base one): mean absolute difference between the stylized and
  the base generator's renders of the same latents over `EVAL_YAWS`, pixel values on a 0-1 scale. 0 means no visible
  change; it measures how far the style moves the portrait, not whether it moves it towards the exemplars.

The same numbers for the base generator with the base encoder give the reference row of the table.
"""

from __future__ import annotations

from typing import Any

import torch

from core.nets.camera import camera_label
from training.eval.metrics import distinct_neighbour_rate, mean_cross_cosine
from training.train_head3d_encoder import render

EVAL_YAWS = (-30.0, -15.0, 0.0, 15.0, 30.0)
BATCH = 8


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


@torch.no_grad()
def evaluate_portraits(generator: torch.nn.Module, encoder: torch.nn.Module, identity: torch.nn.Module,
                       images: torch.Tensor, cameras: torch.Tensor,
                       reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """The metrics above for uint8 crops [N, 3, S, S] with camera labels [N, 25] (all models frozen, one device);
    `style_strength` only with a `reference` generator."""
    device = next(generator.parameters()).device
    rendering = generator.rendering_kwargs
    views = torch.cat([camera_label(yaw, 0.0, radius=float(rendering.get("avg_camera_radius", 2.7)),
                                    lookat=tuple(rendering.get("avg_camera_pivot", (0.0, 0.0, 0.2))))
                       for yaw in EVAL_YAWS]).to(device)
    frontal = EVAL_YAWS.index(0.0)
    photo, multiview, strength, portraits, photos = [], [], [], [], []
    for start in range(0, len(images), BATCH):
        crops = images[start:start + BATCH].to(device).float() / 127.5 - 1
        batch_cameras = cameras[start:start + BATCH].to(device)
        ws = encoder(crops, batch_cameras)
        count = len(ws)
        photo.append(_cosine(identity.embed_aligned(render(generator, ws, batch_cameras)),
                             identity.embed_aligned(crops)))
        repeated = ws.repeat_interleave(len(EVAL_YAWS), dim=0)
        turned = render(generator, repeated, views.repeat(count, 1))
        embeddings = identity.embed_aligned(turned).view(count, len(EVAL_YAWS), -1)
        others = [index for index in range(len(EVAL_YAWS)) if index != frontal]
        multiview.append((embeddings[:, others] * embeddings[:, frontal:frontal + 1]).sum(dim=2).flatten())
        front = turned.view(count, len(EVAL_YAWS), *turned.shape[1:])[:, frontal]
        portraits.append((embeddings[:, frontal], descriptors(identity, front)))
        photos.append((identity.embed_aligned(crops), descriptors(identity, crops)))
        if reference is not None:
            original = render(reference, repeated, views.repeat(count, 1))
            strength.append(((turned.clamp(-1, 1) - original.clamp(-1, 1)).abs() / 2).mean(dim=(1, 2, 3)))
    metrics: dict[str, Any] = {"photos": len(images),
                               "photo_identity": round(float(torch.cat(photo).mean()), 4),
                               "multiview_identity": round(float(torch.cat(multiview).mean()), 4)}
    threshold = identity.config["same_person_distance"]
    for similarity_key, distinct_key, pairs in (("identity_between_portraits", "distinct_people_rate", portraits),
                                                ("identity_between_photos", "distinct_people_rate_photos", photos)):
        if len(images) < 2:  # no pairs of different photos
            break
        embeddings = torch.cat([embedding for embedding, _ in pairs]).double().cpu().numpy()
        descriptor_rows = torch.cat([descriptor for _, descriptor in pairs]).double().cpu().numpy()
        metrics[similarity_key] = round(mean_cross_cosine(embeddings), 4)
        metrics[distinct_key] = round(distinct_neighbour_rate(descriptor_rows, threshold), 4)
    if reference is not None:
        metrics["style_strength"] = round(float(torch.cat(strength).mean()), 4)
    return metrics


def descriptors(identity: torch.nn.Module, aligned: torch.Tensor) -> torch.Tensor:
    """dlib descriptors of aligned faces [N, 3, S, S] in [-1, 1]."""
    return identity.descriptor(identity.chip_from_aligned(aligned.clamp(-1, 1)))


def results_table(rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    """A Markdown table of (name, exemplars, metrics) rows."""
    lines = ["| portraits of | exemplars | identity to photo | multi-view identity (yaw -30..30) | style strength "
             "| different photos, different people (the photos) |",
             "|---|---|---|---|---|---|"]
    for name, exemplars, metrics in rows:
        strength = metrics.get("style_strength")
        distinct = metrics.get("distinct_people_rate")
        distinct = "-" if distinct is None else f"{distinct:.0%} ({metrics['distinct_people_rate_photos']:.0%})"
        lines.append(f"| {name} | {exemplars} | {metrics['photo_identity']:.3f} | {metrics['multiview_identity']:.3f}"
                     f" | {'-' if strength is None else f'{strength:.3f}'} | {distinct} |")
    return "\n".join(lines)
