"""'3D head stylization' tab: a generated or inverted 3D head, original vs stylized, from several views."""

from __future__ import annotations

import gradio as gr

from core.face import FaceInputError
from core.pipelines.head3d import (ENCODER_NAME, IDENTITY_NAME, MODEL_NAME, Head3DPipeline, available_styles,
                                   view_yaws)
from core.runtime import Runtime, gpu
from core.weights import WeightsError
from tabs.common import (MAX_SEED, example_photos, photo_input, raise_user_error, randomize_seed, require_photo,
                         save_pngs)

KEY = "stylize3d"
REQUIRED_MODELS = (MODEL_NAME, IDENTITY_NAME)
ORIGINAL = "original"
SOURCES = ("seed", "photo")
INTRO = (
    "A 3D head from the bundled PanoHead-style generator (from a seed, or inverted from a photo), rendered from "
    "several views by the original generator and by a stylized copy (identity-preserving 3D head stylization, "
    "Bilecen et al., ICCV 2025). The table compares the identity of the original and the "
    "stylized head per view."
)
NO_STYLES_NOTE = ("**Note:** no style has been trained for this generator yet, so only **original** is available "
                  "(the 'stylized' side shows the original head).")


def create_tab(runtime: Runtime) -> None:
    """Components and events of the tab, inside the current `gr.Tab`."""
    registry = runtime.registry
    styles = available_styles(registry, method="stylize3d")
    photo_ready = ENCODER_NAME in registry.names and registry.locate(ENCODER_NAME)[0] != "missing"
    gr.Markdown(INTRO)
    if not styles:
        gr.Markdown(NO_STYLES_NOTE)
    with gr.Row():
        with gr.Column():
            source = gr.Radio(list(SOURCES), value="seed", label="Source")
            with gr.Row():
                seed = gr.Slider(0, MAX_SEED, value=0, step=1, label="Seed")
                randomize = gr.Checkbox(value=False, label="Randomize seed")
            with gr.Accordion("Photo", open=False):
                if not photo_ready:
                    gr.Markdown("The photo encoder is not trained yet; photo input reports that when used.")
                photo = photo_input("Face photo")
                example_photos(photo)
                refine_steps = gr.Slider(0, 50, value=0, step=1, label="Refinement steps (slower, closer)")
            style = gr.Dropdown([ORIGINAL, *styles], value=styles[0] if styles else ORIGINAL, label="Style")
            with gr.Group():
                views = gr.Slider(1, 9, value=5, step=1, label="Number of views")
                yaw_range = gr.Slider(0, 60, value=40, step=5, label="Yaw range (± degrees)")
                pitch = gr.Slider(-25, 25, value=0, step=1, label="Pitch (degrees, + looks from below)")
            run = gr.Button("Generate", variant="primary")
        with gr.Column():
            original = gr.Gallery(label="Original", columns=5, format="png", height=200)
            stylized = gr.Gallery(label="Stylized", columns=5, format="png", height=200)
            mesh = gr.Model3D(label="Stylized head (GLB)", clear_color=(0.95, 0.95, 0.95, 1.0), height=300)
            similarity = gr.Dataframe(headers=["yaw (°)", "identity similarity"], label="Original vs stylized",
                                      interactive=False)
            info = gr.Markdown()

    @gpu(duration=60)
    def stylize(source_value, seed_value, photo_path, refine_value, style_value, view_count, yaw_value, pitch_value):
        if source_value == "photo":
            require_photo(photo_path)
        try:
            pipeline = Head3DPipeline.from_pretrained(runtime=runtime)
            result = pipeline.stylize(None if style_value == ORIGINAL else style_value, seed=int(seed_value),
                                      photo=photo_path if source_value == "photo" else None,
                                      refine_steps=int(refine_value), yaws=view_yaws(int(view_count), yaw_value),
                                      pitch=float(pitch_value))
        except (FaceInputError, WeightsError, ValueError) as error:
            raise_user_error(error)
        for warning in result.warnings:
            gr.Warning(warning)
        captions = [f"yaw {yaw:+.0f}°" for yaw, _ in result.views]
        originals = save_pngs(list(result.original), result.provenance, "original")
        styled = save_pngs(list(result.stylized), result.provenance, style_value)
        rows = [[round(yaw, 1), value] for (yaw, _), value in zip(result.views, result.identity_similarity)]
        timing = ", ".join(f"{name[:-2]} {seconds:.2f} s" for name, seconds in result.timings.items())
        notes = [f"Style **{style_value}**, {'photo' if result.inversion else f'seed {int(seed_value)}'} on "
                 f"{runtime.device.type}: {timing}."]
        if result.inversion:
            notes.append(f"Photo pose: yaw {result.inversion.yaw:+.0f}°, pitch {result.inversion.pitch:+.0f}°; "
                         f"identity similarity input vs frontal render: {result.inversion.identity_similarity:.3f}.")
        if result.style is None:
            notes.append("'original' compares the head with itself (similarity 1).")
        return (list(zip(originals, captions)), list(zip(styled, captions)),
                str(result.glb_path) if result.glb_path else None, rows, "\n\n".join(notes))

    run.click(randomize_seed, [seed, randomize], seed, queue=False, api_visibility="private").then(
        stylize,
        [source, seed, photo, refine_steps, style, views, yaw_range, pitch],
        [original, stylized, mesh, similarity, info],
        api_name="stylize_head",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
