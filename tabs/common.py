"""UI pieces shared by the method tabs: safe photo upload and its checks, user-facing errors, PNG outputs, seeds."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Sequence

import gradio as gr
import numpy as np

from core.face import DEFAULT_MAX_BYTES, FaceInputError, check_upload
from core.outputs import new_output_dir
from core.provenance import Provenance, save_png

MAX_SEED = int(np.iinfo(np.int32).max)
MAX_UPLOAD_SIZE = f"{DEFAULT_MAX_BYTES // 2**20}mb"  # for launch(max_file_size=...)
# Example photos: MEBeauty originals of Unsplash origin (see the README there), shared with the tests.
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "faces"
EXAMPLE_PHOTOS = sorted(str(path) for path in EXAMPLES_DIR.glob("*.jpg"))


def photo_input(label: str = "Face photo", visible: bool = True) -> gr.File:
    """An upload field for a face photo.

    A `gr.File`, not a `gr.Image`: `gr.Image` decodes the upload with Pillow before any check of ours runs, so a
    decompression bomb or a non-image reaches users as a bare "400 Bad Request". The file path goes to
    `require_photo` (header-only checks) and then to `core.face.prepare_face`.
    """
    return gr.File(label=label, file_types=["image"], type="filepath", file_count="single", visible=visible)


def example_photos(target: gr.File, label: str = "Example photos (Unsplash, via MEBeauty): click one") -> gr.Gallery:
    """Thumbnails of the example photos; clicking one puts it into `target`."""
    gallery = gr.Gallery(EXAMPLE_PHOTOS, label=label, columns=len(EXAMPLE_PHOTOS), rows=1, height=130,
                         allow_preview=False, buttons=[], elem_classes=["example-strip"])  # app.CSS lays it out

    def pick(event: gr.SelectData) -> str:
        return EXAMPLE_PHOTOS[event.index]

    gallery.select(pick, None, target, queue=False, api_visibility="private")
    return gallery


def require_photo(path: str | None, what: str = "photo") -> None:
    """Cheap header-only checks of an uploaded photo (no decoding); raises a user-facing `gr.Error`.

    Called at the start of an event, before the GPU-decorated work. Not a Gradio `validator=`: in gradio 6.31 an
    event with a validator answers its inputs' own preprocessing errors (a slider value out of range, an unknown
    dropdown choice sent through the API) with a bare "400 Bad Request" instead of their messages.
    """
    message = "Please upload a " + what + "." if path is None else check_upload(path)
    if message:
        raise gr.Error(message, print_exception=False)


def raise_user_error(error: Exception) -> NoReturn:
    """Show `error`'s message to the user (no traceback in the page); the server keeps serving."""
    raise gr.Error(str(error), print_exception=False) from error


def save_pngs(images: Sequence[np.ndarray], provenance: Provenance | None, stem: str) -> list[str]:
    """Write uint8 images as PNGs carrying `provenance` into a fresh temporary folder; returns their paths."""
    folder = new_output_dir("face-suite-")
    provenance = provenance or Provenance("unknown", "unknown")
    return [str(save_png(image, folder / f"{stem}-{index}.png", provenance)) for index, image in enumerate(images)]


def preview_note(registry, chosen: dict[str, str]) -> str | None:
    """A note for the tab when some of its models are CPU-trained previews: `chosen` maps the preferred registry
    name of each model to the one in use (`Registry.first_available`), and each preview's registry `limitations`
    follow. None when all are the preferred ones."""
    previews = {preferred: name for preferred, name in chosen.items() if name != preferred}
    if not previews:
        return None

    def resolution(name: str) -> str:
        config = registry.load_config(name)
        size = config.get("init_kwargs", {}).get("img_resolution") or config.get("config", {}).get("resolution")
        return f"{name} ({size} px)" if size else name

    note = ("**Preview models.** This tab runs on small models trained on a CPU, not yet on the GPU-trained ones "
            f"it is built for: {', '.join(resolution(name) for name in previews.values())}, instead of "
            f"{', '.join(previews)}. Expect small, soft images; the controls work the same way.")
    known = [(name, registry.entry(name).limitations) for name in previews.values()]
    return note + "".join(f" Known limits of {name}: {text}" for name, text in known if text)


def style_label(registry, name: str) -> str:
    """Dropdown label of a registry style delta: "toon (head3d-style-toon-faces64)", the name alone without a style."""
    style = registry.load_config(name).get("style")
    return f"{style} ({name})" if style else name


def randomize_seed(seed: int, randomize: bool) -> int:
    """A fresh random seed when `randomize` is ticked, else `seed` clamped to the valid range."""
    if randomize:
        return int(np.random.default_rng().integers(0, MAX_SEED))
    return int(np.clip(seed, 0, MAX_SEED))


__all__ = ["EXAMPLE_PHOTOS", "EXAMPLES_DIR", "FaceInputError", "example_photos", "MAX_SEED", "MAX_UPLOAD_SIZE", "photo_input",
           "preview_note", "raise_user_error", "randomize_seed", "require_photo", "save_pngs"]
