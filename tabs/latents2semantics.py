"""Latents2Semantics tab: edit the style of one facial region of a photo in a single forward pass."""

from __future__ import annotations

import gradio as gr

from core.pipelines.latents2semantics import MAX_VARIANTS, MODEL_NAMES, MODES, Latents2SemanticsPipeline
from core.runtime import Runtime, gpu
from core.weights import WeightsError
from tabs.common import (FaceInputError, MAX_SEED, example_photos, photo_input, preview_note, raise_user_error,
                         randomize_seed, require_photo, save_pngs)

KEY = "latents2semantics"
REQUIRED_MODELS = (MODEL_NAMES,)
INTRO = (
    "Pick a region and change only its style — hair, skin, eyes, brows, nose, lips or background — in one forward "
    "pass of an autoencoder whose structure tensor has one channel slice per region "
    "([Latents2Semantics](https://arxiv.org/abs/2312.15037)). Pixels outside the predicted region (plus a few pixels "
    "of feathering) stay exactly those of your photo."
)
DEFAULT_REGION = "hair"
DEFAULT_STRENGTH = {MODES[0]: 2.0, MODES[1]: 1.0}  # a visible random edit; the reference's own style


def create_tab(runtime: Runtime) -> None:
    """Components and events of the tab, inside the current `gr.Tab`."""
    model_name = runtime.registry.first_available(MODEL_NAMES)
    regions = list(runtime.registry.load_config(model_name)["config"]["regions"])

    gr.Markdown(INTRO)
    note = preview_note(runtime.registry, {MODEL_NAMES[0]: model_name})
    if note:
        gr.Markdown(note)
    with gr.Row():
        with gr.Column():
            photo = photo_input("Face photo")
            example_photos(photo)
            region = gr.Dropdown(regions, value=DEFAULT_REGION if DEFAULT_REGION in regions else regions[0],
                                 label="Region to edit")
            mode = gr.Radio(list(MODES), value=MODES[0], label="Mode")
            reference = photo_input("Reference photo (its style is copied)", visible=False)
            strength = gr.Slider(0.0, 3.0, value=DEFAULT_STRENGTH[MODES[0]], step=0.05, label="Strength",
                                 info="random style: noise scale; reference: 1 = the reference's style")
            with gr.Row():
                seed = gr.Slider(0, MAX_SEED, value=0, step=1, label="Seed")
                randomize = gr.Checkbox(value=True, label="Randomize seed")
            variants = gr.Slider(1, MAX_VARIANTS, value=4, step=1, label="Variants (random style)")
            keep_detail = gr.Checkbox(value=True, label="Keep the photo's detail",
                                      info="add the decoder's change of style to your photo; off: paste the decoded "
                                           "region, as the paper does (soft at the model's resolution)")
            run = gr.Button("Edit region", variant="primary")
        with gr.Column():
            edited = gr.Gallery(label="Edited", columns=4, format="png", height=320)
            with gr.Row():
                overlay = gr.Image(label="Predicted region", format="png", height=200)
                reconstruction = gr.Image(label="Autoencoder reconstruction", format="png", height=200,
                                          elem_classes=["fit-image"])  # app.CSS scales the model-size image up
            info = gr.Markdown()

    def edit(photo_path, region_name, mode_name, strength_value, seed_value, n_variants, reference_path, detail):
        require_photo(photo_path)
        if mode_name == MODES[1]:
            require_photo(reference_path, "reference photo")
        return edit_on_gpu(photo_path, region_name, mode_name, strength_value, seed_value, n_variants, reference_path,
                           detail)

    @gpu(duration=30)
    def edit_on_gpu(photo_path, region_name, mode_name, strength_value, seed_value, n_variants, reference_path,
                    detail):
        try:
            pipeline = Latents2SemanticsPipeline.from_pretrained(model_name, runtime)
            result = pipeline(photo_path, region_name, mode_name, strength_value, int(seed_value), int(n_variants),
                              reference=reference_path, keep_detail=bool(detail))
        except (FaceInputError, WeightsError, ValueError) as error:
            raise_user_error(error)
        for warning in result.warnings:
            gr.Warning(warning)
        seeds = f"seeds {result.seeds[0]}–{result.seeds[-1]}" if result.seeds else "reference style"
        summary = (f"Edited **{result.region}** ({result.mode}, {seeds}) in **{result.seconds:.2f} s** on "
                   f"{runtime.device.type} (model and blend; face alignment not counted).")
        return (save_pngs(result.edited, result.provenance, "edit"),
                save_pngs([result.mask_overlay], result.provenance, "mask")[0],
                save_pngs([result.reconstruction], result.provenance, "reconstruction")[0],
                summary)

    mode.change(lambda name: (gr.update(visible=name == MODES[1]), DEFAULT_STRENGTH[name]), mode,
                [reference, strength], queue=False, api_visibility="private")
    run.click(randomize_seed, [seed, randomize], seed, queue=False, api_visibility="private").then(
        edit,
        [photo, region, mode, strength, seed, variants, reference, keep_detail],
        [edited, overlay, reconstruction, info],
        api_name="l2s_edit",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
