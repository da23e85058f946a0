"""Beauty optimization tab: raise a learned beauty score of a face by CMA-ES in the GAN latent space, keeping identity."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from core.pipelines.beauty import (BIAS_NOTE, DEFAULT_BUDGET, DEFAULT_IDENTITY_WEIGHT, DEFAULT_POPULATION,
                                   DEFAULT_STRENGTH, GENERATOR_ENCODER_PAIRS, BeautyOptimizer,
                                   available_generator_encoder)
from core.runtime import Runtime, gpu
from core.weights import Registry, WeightsError
from tabs.common import (FaceInputError, MAX_SEED, example_photos, photo_input, preview_note, raise_user_error,
                         randomize_seed, require_photo, save_pngs)

KEY = "beauty"
MODELS = {"scorer": "beauty-regressor", "evaluator": "beauty-evaluator", "identity": "identity-resnet"}
REQUIRED_MODELS = tuple(MODELS.values())  # plus a generator with its encoder: `available`
SOURCES = ("photo", "random face (seed)")
BEST_SERIES = "best candidate"
MEAN_SERIES = "population mean"
PLOT_CAPTION = ("Best candidate: the generation's best by the objective (beauty minus the identity and distance "
                "penalties), so its beauty score can dip where keeping the person costs beauty.")
INTRO = (
    "Invert a face into a StyleGAN, then let CMA-ES move its latent along the main directions of the latent space to "
    "raise a learned beauty score while an identity penalty keeps the person recognisable "
    "([Regression-guided facial beauty optimization](https://arxiv.org/abs/2501.00811)); candidates that the identity "
    "network would call another person are rejected. A second, independently "
    "trained scorer checks that the gain is not the optimiser exploiting the first one."
)


def available(registry: Registry) -> bool:
    """Shown when one of the base generator + encoder pairs is available."""
    try:
        available_generator_encoder(registry)
    except WeightsError:
        return False
    return True


def _same_person(result) -> str:
    verdict = "the same person" if result.identity_distance < result.same_person_distance else "**another person**"
    return (f"The identity network sees {verdict} (descriptor distance {result.identity_distance:.2f}; same person "
            f"below {result.same_person_distance:g}).")


def _scores_markdown(result) -> str:
    return (
        "| | before (reconstruction) | after (optimized) |\n|---|---|---|\n"
        f"| beauty score (optimized scorer, 1-10) | {result.score_before:.2f} | **{result.score_after:.2f}** |\n"
        f"| independent evaluator (1-10) | {result.evaluator_before:.2f} | **{result.evaluator_after:.2f}** |\n"
        f"| identity similarity to the input | {result.reconstruction_identity:.3f} | "
        f"**{result.identity_similarity:.3f}** |\n\n"
        f"{_same_person(result)} {result.evaluations} candidates scored in {result.timings['total_s']:.1f} s."
    )


def create_tab(runtime: Runtime) -> None:
    """Components and events of the tab, inside the current `gr.Tab`."""
    gr.Markdown(INTRO)
    note = preview_note(runtime.registry, dict(zip(GENERATOR_ENCODER_PAIRS[0],
                                                   available_generator_encoder(runtime.registry))))
    if note:
        gr.Markdown(note)
    gr.Markdown(f"> **Note.** {BIAS_NOTE}")
    with gr.Row():
        with gr.Column():
            source = gr.Radio(list(SOURCES), value=SOURCES[0], label="Start from")
            photo = photo_input("Face photo")
            examples = example_photos(photo)
            with gr.Row():
                seed = gr.Slider(0, MAX_SEED, value=0, step=1, label="Seed (random face and CMA-ES)")
                randomize = gr.Checkbox(value=False, label="Randomize seed")
            budget = gr.Slider(2, 60, value=DEFAULT_BUDGET, step=1, label="Budget (CMA-ES generations)")
            population = gr.Slider(4, 32, value=DEFAULT_POPULATION, step=1, label="Candidates per generation")
            identity_weight = gr.Slider(0.0, 10.0, value=DEFAULT_IDENTITY_WEIGHT, step=0.1, label="Identity weight",
                                        info="higher keeps the person closer to the input")
            strength = gr.Slider(0.25, 3.0, value=DEFAULT_STRENGTH, step=0.05, label="Strength",
                                 info="how far the latent may move (standard deviations)")
            run = gr.Button("Optimize", variant="primary")
        with gr.Column():
            with gr.Row():  # "fit-image": app.CSS scales images smaller than the box (the 32-px preview's) up
                input_image = gr.Image(label="Input (aligned)", format="png", height=220, elem_classes=["fit-image"])
                reconstruction = gr.Image(label="GAN reconstruction", format="png", height=220,
                                          elem_classes=["fit-image"])
                optimized = gr.Image(label="Optimized", format="png", height=220, elem_classes=["fit-image"])
            scores = gr.Markdown()
            plot = gr.LinePlot(x="generation", y="score", color="series", title="Beauty score per generation",
                               color_title="", height=260, caption=PLOT_CAPTION)

    def optimize(source_name, photo_path, seed_value, budget_value, population_value, identity_value, strength_value,
                 progress=gr.Progress()):
        if source_name == SOURCES[0]:
            require_photo(photo_path)
        return optimize_on_gpu(source_name, photo_path, seed_value, budget_value, population_value, identity_value,
                               strength_value, progress)

    @gpu(duration=120)
    def optimize_on_gpu(source_name, photo_path, seed_value, budget_value, population_value, identity_value,
                        strength_value, progress):
        def report(generation, total, record):
            progress((generation, total), desc=f"generation {generation}/{total}: best score {record.best_score:.2f}")

        try:
            pipeline = BeautyOptimizer.from_pretrained(**MODELS, runtime=runtime)
            result = pipeline(photo_path if source_name == SOURCES[0] else None, seed=int(seed_value),
                              budget=int(budget_value), population=int(population_value),
                              identity_weight=float(identity_value), strength=float(strength_value), progress=report)
        except (FaceInputError, WeightsError, ValueError) as error:
            raise_user_error(error)
        for warning in result.warnings:
            gr.Warning(warning)
        input_png, reconstruction_png, optimized_png = save_pngs(
            [result.input_image, result.reconstruction, result.optimized], result.provenance, "beauty")
        history = pd.DataFrame(
            [{"generation": r.generation, "score": r.best_score, "series": BEST_SERIES} for r in result.history]
            + [{"generation": r.generation, "score": r.mean_score, "series": MEAN_SERIES}
               for r in result.history]
        )
        return input_png, reconstruction_png, optimized_png, _scores_markdown(result), history

    source.change(lambda name: [gr.update(visible=name == SOURCES[0])] * 2, source, [photo, examples], queue=False,
                  api_visibility="private")  # a random face needs no photo
    run.click(randomize_seed, [seed, randomize], seed, queue=False, api_visibility="private").then(
        optimize,
        [source, photo, seed, budget, population, identity_weight, strength],
        [input_image, reconstruction, optimized, scores, plot],
        api_name="beauty_optimize",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
