"""Latents2Semantics region style editing (docs/methods.md §2) on one face: `Latents2SemanticsPipeline`.

One call: align the face (`core.face.prepare_face`, or take an aligned crop), encode it with the L2SAE
(`core.nets.l2sae`) into structure S and style s, predict the region masks from S's slices, edit the style
(random: `s + strength * noise` through the Style Manipulation Network, one variant per seed; reference:
`s + strength * (s_ref - s)`, strength 1 = swap), decode `x_g = G(S, s')` and blend it into the input crop:
`y = x + M * (x_g - x)`. With `keep_detail`, the decoded change is added to the photo instead, `y = x + M * (x_g -
G(S, s))`: the photo keeps its own fine detail (hair strands, skin texture) where a low-resolution decoder would
paste a soft region.

Locality by construction: M is the predicted region (argmax of the mask logits == region) dilated by `feather`
pixels and then box-blurred with the same radius, so M is 1 on the region and exactly 0 farther than
2 * `feather` pixels from it, where the output pixels are the input's own uint8 values. The edit-locality target
(mean change outside the dilated mask <= 1/255) therefore holds for any dilation of at least 2 * `feather`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.face import PreparedFace, prepare_face
from core.nets.l2sae import L2SAE, build_l2sae, load_l2sae
from core.provenance import Provenance
from core.runtime import Runtime

METHOD = "Latents2Semantics"
# Registry models, preferred first: the 128-px L2SAE of the training plan, then the 64-px preview trained on a CPU
# (weights/l2sae_faces64).
MODEL_NAMES = ("l2sae-faces128", "l2sae-faces64")
MODES = ("random style", "style from reference")
CROP_SIZE = 256
FEATHER_FRACTION = 1 / 64  # feather radius as a fraction of the crop side (4 px at 256, 2 px at 128)
MAX_VARIANTS = 8
OVERLAY_COLOUR = np.array([255.0, 40.0, 40.0])


@dataclass
class L2SEditResult:
    """Edited crops (uint8, crop size), the region mask overlaid on the input, the L2SAE reconstruction (uint8, model
    resolution), the blend mask M (float32, crop size, exactly 0 where pixels are the input's), and timing."""

    edited: list[np.ndarray]
    mask_overlay: np.ndarray
    reconstruction: np.ndarray
    input_crop: np.ndarray
    blend_mask: np.ndarray
    region: str
    mode: str
    seeds: list[int]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    provenance: Provenance | None = None


def feathered_region_mask(region_mask: torch.Tensor, feather: int) -> torch.Tensor:
    """[N, 1, H, W] 0/1 mask -> blend weights: 1 on the region, a ramp over `feather` px, exactly 0 beyond 2*feather."""
    if feather <= 0:
        return region_mask
    kernel = 2 * feather + 1
    dilated = F.max_pool2d(region_mask, kernel, stride=1, padding=feather)
    blurred = F.avg_pool2d(dilated, kernel, stride=1, padding=feather, count_include_pad=False)
    return torch.where(dilated > 0, blurred, torch.zeros_like(blurred)).clamp(0, 1)


def blend_by_mask(crop: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 `crop` + mask * (float `generated` [0, 255] - crop); pixels with mask 0 are the crop's exactly."""
    base = crop.astype(np.float32)
    mixed = np.clip(np.rint(base + mask[..., None] * (generated - base)), 0, 255).astype(np.uint8)
    return np.where(mask[..., None] > 0, mixed, crop)


def mask_overlay(crop: np.ndarray, mask: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """The crop with `mask` (float [0, 1]) tinted red."""
    alpha = opacity * mask[..., None]
    return np.rint(crop * (1 - alpha) + OVERLAY_COLOUR * alpha).astype(np.uint8)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Latents2SemanticsPipeline:
    """Region style edits with an L2SAE; build with `from_pretrained` or pass a model (e.g. a tiny random one)."""

    def __init__(self, model: L2SAE, runtime: Runtime | None = None, model_name: str = MODEL_NAMES[0],
                 revision: str | None = None, crop_size: int = CROP_SIZE):
        self.runtime = runtime or Runtime("cpu")
        self.model = model.to(self.runtime.device).eval().requires_grad_(False)
        self._model_float32: L2SAE | None = None
        self.model_name = model_name
        self.revision = revision
        self.crop_size = crop_size

    @classmethod
    def from_pretrained(cls, name: str | None = None, runtime: Runtime | None = None) -> "Latents2SemanticsPipeline":
        """The registry model `name` (default: the first of MODEL_NAMES that is available) through the runtime's model
        cache (raises `core.weights.WeightsError` when its weights are unavailable)."""
        runtime = runtime or Runtime()
        name = name or runtime.registry.first_available(MODEL_NAMES)
        model = runtime.get_model(name, build_l2sae)
        return cls(model, runtime, name, runtime.registry.entry(name).revision)

    @property
    def regions(self) -> tuple[str, ...]:
        return self.model.regions

    def prepare(self, source: Any) -> tuple[np.ndarray, list[str]]:
        """(aligned uint8 crop, warnings): a square uint8 array is taken as an aligned crop as it is, a
        `PreparedFace` gives its crop, anything else (path, bytes, PIL image) goes through `prepare_face`."""
        if isinstance(source, np.ndarray):
            if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3 or source.shape[0] != source.shape[1]:
                raise ValueError("an aligned crop must be a square H x W x 3 uint8 array")
            return source, []
        face = source if isinstance(source, PreparedFace) else prepare_face(source, size=self.crop_size)
        return face.image, list(face.warnings)

    def _model_in(self, dtype: torch.dtype) -> L2SAE:
        """The model in `dtype`: the loaded one, or a float32 copy for the runtime's float32 retry."""
        if next(self.model.parameters()).dtype == dtype:
            return self.model
        if self._model_float32 is None:
            self._model_float32 = copy.deepcopy(self.model).float()
        return self._model_float32

    def _model_input(self, crop: np.ndarray, model: L2SAE) -> torch.Tensor:
        parameter = next(model.parameters())
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 127.5 - 1
        size = model.config.resolution
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x.to(device=parameter.device, dtype=parameter.dtype)

    def __call__(self, image: Any, region: str, mode: str = MODES[0], strength: float = 1.0, seed: int = 0,
                 n_variants: int = 1, reference: Any = None, keep_detail: bool = False) -> L2SEditResult:
        """Edit `region` of the face in `image` (see `prepare` for accepted inputs); `mode` is one of MODES.

        random style: `n_variants` edits with seeds seed, seed + 1, ...; style from reference: one edit towards the
        style of `reference` (strength 1 = the reference's style). `keep_detail`: blend the decoded change into
        the photo rather than the decoded image (module docstring). `seconds` times the model and the blend (face
        detection and alignment excluded).
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        region_index = self.model.region_index(region)
        if not 1 <= n_variants <= MAX_VARIANTS:
            raise ValueError(f"n_variants must be between 1 and {MAX_VARIANTS}")
        if mode == MODES[1] and reference is None:
            raise ValueError("'style from reference' needs a reference photo")
        crop, warnings = self.prepare(image)
        reference_crop = None
        if mode == MODES[1]:
            reference_crop, reference_warnings = self.prepare(reference)
            warnings += [f"Reference: {note}" for note in reference_warnings]
            n_variants = 1
        seeds = [int(seed) + i for i in range(n_variants)] if mode == MODES[0] else []

        def compute(dtype: torch.dtype) -> dict[str, torch.Tensor]:
            model = self._model_in(dtype)
            structure, style = model.encode(self._model_input(crop, model))
            if reference_crop is not None:
                _, reference_style = model.encode(self._model_input(reference_crop, model))
                directions = reference_style - style
            else:
                directions = torch.stack([torch.randn(style.shape[1], generator=torch.Generator().manual_seed(s))
                                          for s in seeds]).to(style)
            count = directions.shape[0]
            edited_styles = model.edit_style(style.expand(count, -1), directions, region_index, strength)
            batch_structure = structure.expand(count, -1, -1, -1)
            generated = model.decode(torch.cat([structure, batch_structure]), torch.cat([style, edited_styles]))
            logits = F.interpolate(model.mask_logits(structure).float(), size=crop.shape[:2], mode="bilinear",
                                   align_corners=False)
            region_mask = (logits.argmax(dim=1, keepdim=True) == region_index).float()
            feather = max(int(round(FEATHER_FRACTION * crop.shape[0])), 1)
            generated = generated.float()
            edits = F.interpolate(generated[1:], size=crop.shape[:2], mode="bilinear", align_corners=False)
            if keep_detail:
                photo = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].to(edits) / 127.5 - 1
                edits = photo + edits - F.interpolate(generated[:1], size=crop.shape[:2], mode="bilinear",
                                                      align_corners=False)
            return {"reconstruction": generated[:1], "edits": edits,
                    "mask": feathered_region_mask(region_mask, feather)[0, 0]}

        start = time.perf_counter()
        outputs = self.runtime.run(compute, what="The L2SAE")
        mask = outputs["mask"].cpu().numpy().astype(np.float32)
        generated = (outputs["edits"].clamp(-1, 1) * 127.5 + 127.5).permute(0, 2, 3, 1).cpu().numpy()
        edited = [blend_by_mask(crop, image_edit, mask) for image_edit in generated]
        seconds = time.perf_counter() - start
        parameters = {"region": region, "mode": mode, "strength": float(strength), "n_variants": n_variants,
                      "keep_detail": bool(keep_detail)}
        return L2SEditResult(
            edited=edited, mask_overlay=mask_overlay(crop, mask), reconstruction=_to_uint8(outputs["reconstruction"])[0],
            input_crop=crop, blend_mask=mask, region=region, mode=mode, seeds=seeds, seconds=seconds,
            warnings=warnings,
            provenance=Provenance(METHOD, self.model_name, self.revision, seeds[0] if seeds else None, parameters),
        )


def load_pipeline(directory: str | Path, runtime: Runtime | None = None) -> Latents2SemanticsPipeline:
    """A pipeline on an exported L2SAE folder that is not (yet) in the registry, e.g. a fresh training export."""
    directory = Path(directory)
    return Latents2SemanticsPipeline(load_l2sae(directory), runtime, model_name=directory.name)
