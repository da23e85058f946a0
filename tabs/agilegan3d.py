"""AgileGAN3D tab: a stylized 3D portrait of a photo, in a style learned from about twenty 2D exemplars."""

from __future__ import annotations

import gradio as gr

from core.face import FaceInputError
from core.pipelines.head3d import (DEFAULT_YAW_RANGE, ENCODER_NAMES, IDENTITY_NAME, MODEL_NAME, MODEL_NAMES,
                                   YAW_RANGE_INFO, Head3DPipeline, available_styles, preferred_model, view_yaws)
from core.runtime import Runtime, gpu
from core.weights import Registry, WeightsError
from tabs.common import (example_photos, photo_input, preview_note, raise_user_error, require_photo, save_pngs,
                         style_label)

KEY = "agilegan3d"
METHOD = "agilegan3d"
REQUIRED_MODELS = (MODEL_NAMES, tuple(ENCODER_NAMES[name] for name in MODEL_NAMES), IDENTITY_NAME)
INTRO = (
    "Upload a portrait and get a stylized 3D portrait you can turn around, in a style the 3D generator learned from "
    "about twenty 2D exemplars ([AgileGAN3D](https://arxiv.org/abs/2303.14297): a 2D style prior, an augmented set "
    "of stylized multi-view renders, transfer learning of the 3D generator, and a photo encoder tuned to the style)."
)
TRAINING_HELP = """\
A style is trained from a folder of ~20 exemplar images (portraits in the target style) on a GPU, in resumable
chunks of at most ~9.5 minutes. The run passes through the three stages of the paper, the first in two steps:

1. **Style prior and augmented set.** A 2D StyleGAN2 is fine-tuned on the exemplars (`prior`); then the 3D
   generator's renders at known cameras are pushed through it, giving a large set of stylized images with camera
   labels (`augment`).
2. **Guided transfer learning.** The 3D generator is fine-tuned on that set, cameras kept (`transfer`).
3. **3D inversion encoder.** The photo encoder is fine-tuned against the stylized 3D generator on real photos and
   synthetic heads: the stylized render must keep the photo's identity, and so must the stylized renders from
   other angles (the multi-view consistency loss) (`encoder`).

```bash
# start on the CPU: copies real and held-out photos with their cameras from the face archive
python -m training.agilegan3d --exemplars my_exemplars/ --name mystyle --data datasets/faces/faces128.npz \\
    --run runs/agile_mystyle --minutes 0
# repeat on the GPU until the run folder's agilegan3d.json lists prior, augment, transfer and encoder
python -m training.agilegan3d --run runs/agile_mystyle --minutes 9
python -m training.agilegan3d --run runs/agile_mystyle --minutes 0 --export weights/agilegan3d_mystyle
python -m core.weights register weights/agilegan3d_mystyle --name agilegan3d-mystyle --licence "<your exemplars' licence>"
```

The export is a compact delta over the bundled 3D generator plus one over the photo encoder (about 0.5 MiB together),
with a model card that reports, on held-out photos, the identity of the stylized portrait to the photo, its identity
consistency from yaw -30° to 30° and the style strength. Restart the app and the style shows up here; photos are
then encoded with the style's own encoder.

**The bundled styles are CPU previews**, trained with `--recipe cpu-preview` over the 32-px 2D and 64-px 3D preview
generators (`--base2d weights/stylegan2_faces32 --base3d weights/head3d_faces64 --base3d-name head3d-faces64
--base-encoder weights/head3d_encoder_faces64 --base-encoder-name head3d-encoder-faces64`), about 1.5 hours
per style on one core of a 2-core CPU; their model cards have the commands and what they measured.

**How many exemplars?** Add `--exemplar-counts 5,10,20` (with `--run` naming a study folder) to train the style on
nested random subsets of 5, 10 and 20 exemplars and evaluate each the same way; the table goes into the model card of
the 20-exemplar style, which `--export` writes. `training/README.md` ("AgileGAN3D styles") has the details and the
exact GPU-machine commands.
"""


def available(registry: Registry) -> bool:
    """Shown when the bundled 3D generator in use (`preferred_model`) has its photo encoder here and at least one
    AgileGAN3D style."""
    generator = preferred_model(registry)
    return registry.is_available(ENCODER_NAMES[generator]) and bool(available_styles(registry, generator, METHOD))


def create_tab(runtime: Runtime) -> None:
    """Components and events of the tab, inside the current `gr.Tab`."""
    generator = preferred_model(runtime.registry)
    styles = available_styles(runtime.registry, generator, METHOD)
    gr.Markdown(INTRO)
    note = preview_note(runtime.registry, {MODEL_NAME: generator})
    if note:
        gr.Markdown(note)
    with gr.Row():
        with gr.Column():
            photo = photo_input("Portrait")
            example_photos(photo)
            style = gr.Dropdown([(style_label(runtime.registry, name), name) for name in styles], value=styles[0],
                                label="Style")
            with gr.Group():
                views = gr.Slider(1, 9, value=5, step=1, label="Number of views")
                yaw_range = gr.Slider(0, 60, value=DEFAULT_YAW_RANGE, step=5, label="Yaw range (± degrees)",
                                      info=YAW_RANGE_INFO)
                refine_steps = gr.Slider(0, 50, value=10, step=1, label="Refinement steps (slower, closer)")
            run = gr.Button("Stylize", variant="primary")
            with gr.Accordion("Train a new style", open=False):
                gr.Markdown(TRAINING_HELP)
        with gr.Column():
            with gr.Row():  # "fit-image": app.CSS scales images smaller than the box (the 64-px preview's) up
                aligned = gr.Image(label="Input (aligned)", format="png", height=200, elem_classes=["fit-image"])
                frontal = gr.Image(label="3D inversion (frontal)", format="png", height=200, elem_classes=["fit-image"])
            stylized = gr.Gallery(label="Stylized portrait", columns=5, format="png", elem_classes=["view-strip"])
            mesh = gr.Model3D(label="Stylized head (GLB)", clear_color=(0.95, 0.95, 0.95, 1.0), height=300)
            info = gr.Markdown()

    def stylize(photo_path, style_value, view_count, yaw_value, refine_value):
        require_photo(photo_path)
        return stylize_on_gpu(photo_path, style_value, view_count, yaw_value, refine_value)

    @gpu(duration=60)
    def stylize_on_gpu(photo_path, style_value, view_count, yaw_value, refine_value):
        try:
            pipeline = Head3DPipeline.from_pretrained(generator, runtime)
            result = pipeline.stylize(style_value, photo=photo_path, refine_steps=int(refine_value),
                                      yaws=view_yaws(int(view_count), yaw_value))
        except (FaceInputError, WeightsError, ValueError) as error:
            raise_user_error(error)
        for warning in result.warnings:
            gr.Warning(warning)
        inversion = result.inversion
        captions = [f"yaw {yaw:+.0f}°" for yaw, _ in result.views]
        views_png = save_pngs(list(result.stylized), result.provenance, style_value)
        aligned_png, frontal_png = save_pngs([inversion.aligned, inversion.frontal], result.provenance, "input")
        similarity = ", ".join(f"{yaw:+.0f}°: {value:.2f}" for (yaw, _), value in
                               zip(result.views, result.identity_similarity))
        timing = ", ".join(f"{name[:-2]} {seconds:.2f} s" for name, seconds in result.timings.items())
        encoder = ("the style's own encoder" if result.provenance.parameters["encoder"] == "style"
                   else "the base encoder")
        notes = (f"Style **{style_value}** of {generator}; photo encoded with {encoder}. Identity similarity input "
                 "vs 3D inversion (frontal): "
                 f"**{inversion.identity_similarity:.3f}**; inversion vs stylized per view: {similarity}.\n\n"
                 f"{timing} on {runtime.device.type}.")
        return (aligned_png, frontal_png, list(zip(views_png, captions)),
                str(result.glb_path) if result.glb_path else None, notes)

    run.click(
        stylize,
        [photo, style, views, yaw_range, refine_steps],
        [aligned, frontal, stylized, mesh, info],
        api_name="agile3d_stylize",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
