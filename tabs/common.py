"""UI pieces shared by the method tabs: safe photo upload, its validator, user-facing errors, seeds."""

from __future__ import annotations

from typing import NoReturn

import gradio as gr
import numpy as np

from core.face import DEFAULT_MAX_BYTES, FaceInputError, check_upload

MAX_SEED = int(np.iinfo(np.int32).max)
MAX_UPLOAD_SIZE = f"{DEFAULT_MAX_BYTES // 2**20}mb"  # for launch(max_file_size=...)


def photo_input(label: str = "Face photo") -> gr.File:
    """An upload field for a face photo.

    A `gr.File`, not a `gr.Image`: `gr.Image` decodes the upload with Pillow before any check of ours runs, so a
    decompression bomb or a non-image reaches users as a bare "400 Bad Request". The file path goes to
    `photo_validator` (header-only checks) and then to `core.face.prepare_face`.
    """
    return gr.File(label=label, file_types=["image"], type="filepath", file_count="single")


def photo_validator(path: str | None, required: bool = True) -> dict:
    """Gradio 6 `validator=` entry for a photo input: header-only checks, no decoding, no GPU slot."""
    if path is None and not required:
        return gr.validate(True, "")
    message = check_upload(path)
    return gr.validate(message is None, message or "")


def raise_user_error(error: Exception) -> NoReturn:
    """Show `error`'s message to the user (no traceback in the page); the server keeps serving."""
    raise gr.Error(str(error), print_exception=False) from error


def randomize_seed(seed: int, randomize: bool) -> int:
    """A fresh random seed when `randomize` is ticked, else `seed` clamped to the valid range."""
    if randomize:
        return int(np.random.default_rng().integers(0, MAX_SEED))
    return int(np.clip(seed, 0, MAX_SEED))


__all__ = ["FaceInputError", "MAX_SEED", "MAX_UPLOAD_SIZE", "photo_input", "photo_validator", "raise_user_error",
           "randomize_seed"]
