"""'Tax-free' tab: set expression, pose, light and identity of a generated face through 3DMM parameters."""

from __future__ import annotations

import gradio as gr

from core.face3dmm import EXPRESSION_NAMES
from core.outputs import new_output_dir
from core.pipelines.taxfree import CURATED_EXPRESSIONS, VARIANTS, FaceControls, TaxFreePipeline, average_controls
from core.runtime import Runtime, gpu
from core.weights import WeightsError
from tabs.common import (FaceInputError, MAX_SEED, example_photos, photo_input, preview_note, raise_user_error,
                         randomize_seed, require_photo, save_pngs)

KEY = "taxfree"
REQUIRED_MODELS = tuple(VARIANTS.values())
BOTH = "both side by side"
INTRO = (
    "Control a generated face through the parameters of a 3D morphable face model (ICT-FaceKit): head pose, "
    "expression, light and identity. The **tax-free** generator was trained with only two objectives (realism + "
    "consistency of the controlled parameters, [arXiv 2305.13460](https://arxiv.org/abs/2305.13460)); the "
    "**over-constrained** baseline adds the constraints of earlier work and pays for them in image quality — compare "
    "them side by side."
)


def create_tab(runtime: Runtime) -> None:
    """Components and events of the tab, inside the current `gr.Tab`."""
    gr.Markdown(INTRO)
    note = preview_note(runtime.registry, {names[0]: runtime.registry.first_available(names) for names in VARIANTS.values()})
    if note:
        gr.Markdown(note)
    # The sliders start at the training faces' average, which the generators know best (core.pipelines.taxfree).
    average = average_controls(runtime.registry.load_config(runtime.registry.first_available(VARIANTS["tax-free"]))
                               ["conditioning"])
    identity = gr.State(None)  # identity coefficients copied from a photo, or None
    with gr.Row():
        with gr.Column():
            variant = gr.Radio([*VARIANTS, BOTH], value=BOTH, label="Generator")
            with gr.Row():
                seed = gr.Slider(0, MAX_SEED, value=0, step=1, label="Seed")
                randomize = gr.Checkbox(value=False, label="Randomize seed")
                random_identity = gr.Checkbox(value=True, label="Random identity (from the seed)")
            with gr.Group():
                yaw = gr.Slider(-40, 40, value=0, step=1, label="Yaw (°, + turns the nose to the image's right)")
                pitch = gr.Slider(-25, 25, value=0, step=1, label="Pitch (°, + nods down)")
                roll = gr.Slider(-20, 20, value=0, step=1, label="Roll (°)")
            gr.Markdown("Every control starts at the training faces' average. A named expression adds its value "
                        "to its blendshapes (at most 1).")
            with gr.Group():
                curated = [gr.Slider(0, 1, value=0, step=0.05, label=label) for label in CURATED_EXPRESSIONS]
            with gr.Accordion("All 53 expressions (ICT-FaceKit / ARKit names; they start at the training faces' "
                              "average, which is not all zeros)", open=False):
                detailed = [gr.Slider(0, 1, value=average.expression[name], step=0.05, label=name)
                            for name in EXPRESSION_NAMES]
            with gr.Group():
                azimuth = gr.Slider(-90, 90, value=average.light_azimuth, step=1,
                                    label="Light from (°, + from the image's right)")
                elevation = gr.Slider(-60, 60, value=average.light_elevation, step=1,
                                      label="Light elevation (°, + from above)")
                intensity = gr.Slider(0, 2, value=average.light_intensity, step=0.05,
                                      label="Light intensity (× ambient)")
            with gr.Accordion("Copy from a photo", open=False):
                photo = photo_input("Face photo")
                example_photos(photo)
                copy = gr.Button("Copy pose, expression, light and identity")
            with gr.Row():
                reset = gr.Button("Reset to the average face")
                run = gr.Button("Generate", variant="primary")
        with gr.Column():
            faces = gr.Gallery(label="Generated (left: tax-free, right: over-constrained)", columns=2, format="png",
                               height=340)
            with gr.Row():
                condition = gr.Image(label="3DMM condition (what the parameters ask for)", format="png", height=260)
                mesh = gr.Model3D(label="3DMM mesh (GLB)", clear_color=(0.95, 0.95, 0.95, 1.0), height=260)
            info = gr.Markdown()

    face_inputs = [yaw, pitch, roll, *curated, *detailed, azimuth, elevation, intensity]

    def controls_from(values, identity_value) -> FaceControls:
        pose, rest = values[:3], values[3:]
        curated_values, rest = rest[:len(curated)], rest[len(curated):]
        detailed_values, light = rest[:len(detailed)], rest[len(detailed):]
        expression = dict(zip(EXPRESSION_NAMES, (float(v) for v in detailed_values)))
        for label, value in zip(CURATED_EXPRESSIONS, curated_values):
            for name in CURATED_EXPRESSIONS[label]:
                expression[name] = min(expression[name] + float(value), 1.0)
        return FaceControls(*(float(v) for v in pose), expression, *(float(v) for v in light), identity=identity_value)

    @gpu(duration=30)
    def generate(variant_name, seed_value, random_identity_value, identity_value, *values):
        variants = tuple(VARIANTS) if variant_name == BOTH else (variant_name,)
        try:
            pipeline = TaxFreePipeline.from_pretrained(variants, runtime)
            controls = controls_from(values, None if random_identity_value else identity_value)
            mesh_path = new_output_dir("face3dmm-") / "face3dmm.glb"
            result = pipeline(controls, int(seed_value), variants, random_identity=bool(random_identity_value),
                              mesh_path=mesh_path)
        except (WeightsError, ValueError) as error:
            raise_user_error(error)
        images = save_pngs([result.images[v] for v in variants], result.provenance, "taxfree")
        timing = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.seconds.items())
        models = ", ".join(f"{pipeline.model_names[v]} ({pipeline.generators[v].img_resolution} px)" for v in variants)
        return ([(path, v) for path, v in zip(images, variants)],
                save_pngs([result.condition_render], result.provenance, "condition")[0], str(result.mesh_path),
                f"Seed {result.seed} on {runtime.device.type} with {models}: {timing}.")

    def copy_from_photo(photo_path):
        require_photo(photo_path)
        try:
            pipeline = TaxFreePipeline.from_pretrained(tuple(VARIANTS)[:1], runtime)
            controls, warnings = pipeline.controls_from_photo(photo_path)
        except (FaceInputError, WeightsError, ValueError) as error:
            raise_user_error(error)
        for warning in warnings:
            gr.Warning(warning)
        gr.Info("Copied: sliders now reproduce the photo's pose, expression and light; its identity is kept until "
                "'Random identity' is ticked again.")
        detailed_values = [round(controls.expression.get(name, 0.0), 2) for name in EXPRESSION_NAMES]
        pose_and_light = [(controls.yaw, yaw), (controls.pitch, pitch), (controls.roll, roll)]
        light = [(controls.light_azimuth, azimuth), (controls.light_elevation, elevation),
                 (controls.light_intensity, intensity)]
        clipped = [round(min(max(value, slider.minimum), slider.maximum), 1) for value, slider in pose_and_light + light]
        return clipped[:3] + [0.0] * len(curated) + detailed_values + clipped[3:] + [controls.identity.tolist(), False]

    def reset_to_average():
        light = [average.light_azimuth, average.light_elevation, average.light_intensity]
        detailed_values = [average.expression[name] for name in EXPRESSION_NAMES]
        return [0.0, 0.0, 0.0] + [0.0] * len(curated) + detailed_values + light + [None, True]

    reset.click(reset_to_average, None, [*face_inputs, identity, random_identity], api_name="taxfree_reset",
                queue=False)
    copy.click(copy_from_photo, photo, [*face_inputs, identity, random_identity], api_name="taxfree_copy_from_photo",
               concurrency_limit=1)
    run.click(randomize_seed, [seed, randomize], seed, queue=False, api_visibility="private").then(
        generate,
        [variant, seed, random_identity, identity, *face_inputs],
        [faces, condition, mesh, info],
        api_name="taxfree_generate",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
