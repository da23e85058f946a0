"""'3D head stylization' tab: a generated or inverted 3D head, original vs stylized, from several views, with the
bundled generator or the official PanoHead and the paper's stylized generators (`core.official`)."""

from __future__ import annotations

import gradio as gr

from core.face import FaceInputError
from core.official import PANOHEAD, VARIANTS, stylized_variants
from core.pipelines.head3d import (DEFAULT_YAW_RANGE, ENCODER_NAMES, IDENTITY_NAME, MODEL_NAME, MODEL_NAMES,
                                   YAW_RANGE_INFO, Head3DPipeline, available_styles, available_stylized_generators,
                                   load_official, preferred_model, view_yaws)
from core.runtime import Runtime, gpu
from core.weights import Registry, WeightsError
from tabs.common import (MAX_SEED, example_photos, photo_input, preview_note, raise_user_error, randomize_seed,
                         require_photo, save_pngs, style_label)

KEY = "stylize3d"
REQUIRED_MODELS = (IDENTITY_NAME,)
ORIGINAL = "original"
SOURCES = ("seed", "photo")
NEEDS_DOWNLOAD = " (needs download)"
NOT_TRAINED = " (not trained yet)"
FAST_RAYS = 64  # px: the "fast" neural rendering resolution (PanoHead's released model renders rays at 128 px)
DEFAULT_VIEWS = 5
DEFAULT_VIEWS_PANOHEAD = 3  # 512-px renders are slow on a CPU
DEFAULT_TRUNCATION = 0.7  # Head3DPipeline.stylize's default
TRUNCATION_RANGE = (0.3, 1.0)  # the slider's; Gradio refuses values outside it
INTRO = (
    "A 3D head from the bundled PanoHead-style generator (from a seed, or inverted from a photo) or from the official "
    "PanoHead, rendered from several views by the original generator and by a stylized copy (identity-preserving 3D "
    "head stylization, Bilecen et al., ICCV 2025). The table compares the identity of the original and the "
    "stylized head per view."
)
STYLES_HELP = (
    "Each bundled style is a small change of the 3D head generator (a low-rank delta of its synthesis and "
    "super-resolution layers, about 0.3 MiB), trained with the paper's recipe: likelihood distillation of a 2D "
    "diffusion teacher's style direction into 2x2 grids of renders from different yaws, with mirrored gradients, "
    "score rank weighing, and identity and silhouette references from a frozen copy of the generator. The paper "
    "distils Stable Diffusion with ControlNet; here each teacher is a small diffusion model of our own, trained on "
    "the face dataset and the same faces through a bronze, pencil-sketch or cartoon filter. The GLB takes its "
    "colours from the stylized views. Measurements and recipe: each style's model card "
    "(`weights/head3d_style_*/README.md`); training commands: `training/README.md`."
)
NO_STYLES_NOTE = ("**Note:** no style is available for this generator yet, so only **original** runs "
                  "(the 'stylized' side shows the original head).")
BUNDLED_MISSING = ("**The bundled 3D head generator is not trained yet.** `training/README.md` ('3D head generator') "
                   "has the GPU commands; pick the official PanoHead meanwhile.")
PHOTO_NOT_READY = "The photo encoder of {name} is not trained yet; photo input reports that when used."
# Render cost: docs/BENCHMARKS.md (python -m core.bench: released PanoHead config, 128-px rays, random weights, 2-core
# CPU); GLB cost: docs/BENCHMARKS_PIPELINES.md (128³ density lattice of the bundled-size generator).
PANOHEAD_COST_NOTE = (
    "**Slow on CPU.** The official PanoHead renders 512-px images: every view twice (original and stylized), plus a "
    "128³ density grid for the GLB. On a 2-core CPU one 512-px PanoHead render with 128-px rays took 2.5 s (random "
    "weights), so the default 3 views need six such renders (less with fast rays) before the GLB. "
    "'Fast rays' keeps the rays at 64 px instead of the 128 px of PanoHead's final training stage."
)


def available(registry: Registry) -> bool:
    """Shown when a bundled generator (or its preview) or the official one resolves."""
    return any(registry.is_available(name) for name in (*MODEL_NAMES, PANOHEAD.name))


def _generators(registry: Registry) -> dict[str, str]:
    """Registry name -> label of the dropdown's generators: the bundled one, then the official PanoHead."""
    bundled = preferred_model(registry)
    return {bundled: f"Bundled 3D head generator ({bundled})", PANOHEAD.name: PANOHEAD.title}


def _generator_choices(registry: Registry) -> list[tuple[str, str]]:
    def suffix(name):
        if registry.is_available(name):
            return ""
        return NEEDS_DOWNLOAD if name == PANOHEAD.name else NOT_TRAINED

    return [(label + suffix(name), name) for name, label in _generators(registry).items()]


def _default_views(generator: str) -> int:
    return DEFAULT_VIEWS_PANOHEAD if generator == PANOHEAD.name else DEFAULT_VIEWS


def _ready_styles(registry: Registry, generator: str) -> list[str]:
    """original and the styles here for `generator`: its stylize3d style deltas and full stylized generators."""
    return [ORIGINAL, *available_styles(registry, generator, method="stylize3d"),
            *available_stylized_generators(registry, generator)]


def _style_choices(registry: Registry, generator: str) -> list[tuple[str, str]]:
    """(label, value) pairs: the ready styles, then the official stylized generators that need a download."""
    official = {variant.name: variant.title for variant in stylized_variants(generator)}
    ready = _ready_styles(registry, generator)

    def label(name: str) -> str:
        if name in official or name == ORIGINAL:
            return official.get(name, name)
        return style_label(registry, name)

    return ([(label(name), name) for name in ready]
            + [(title + NEEDS_DOWNLOAD, name) for name, title in official.items() if name not in ready])


def _missing(registry: Registry, generator: str, style: str) -> str | None:
    """Markdown on how to get the selected generator or official style, or None when both can run."""
    if not registry.is_available(generator):
        return VARIANTS[generator].instructions() if generator in VARIANTS else BUNDLED_MISSING
    variant = VARIANTS.get(style)
    if variant is not None and variant.base == generator and style not in _ready_styles(registry, generator):
        return variant.instructions()
    return None


def create_tab(runtime: Runtime) -> None:
    """Components and events of the tab, inside the current `gr.Tab`."""
    registry = runtime.registry
    bundled = preferred_model(registry)
    encoder = ENCODER_NAMES.get(bundled)
    photo_ready = encoder is not None and registry.is_available(encoder)
    default = next(name for name in _generators(registry) if registry.is_available(name))
    ready = _ready_styles(registry, default)
    gr.Markdown(INTRO)
    note = preview_note(registry, {MODEL_NAME: bundled}) if registry.is_available(bundled) else None
    if note:
        gr.Markdown(note)
    with gr.Row():
        with gr.Column():
            generator = gr.Dropdown(_generator_choices(registry), value=default, label="Generator")
            cost_note = gr.Markdown(PANOHEAD_COST_NOTE, visible=default == PANOHEAD.name)
            source = gr.Radio(list(SOURCES), value="seed", label="Source")
            with gr.Row():
                seed = gr.Slider(0, MAX_SEED, value=0, step=1, label="Seed")
                randomize = gr.Checkbox(value=False, label="Randomize seed")
            truncation = gr.Slider(*TRUNCATION_RANGE, value=DEFAULT_TRUNCATION, step=0.05,
                                   label="Truncation ψ (seeds: lower is more typical, higher more varied)")
            with gr.Accordion("Photo (bundled generator only)", open=False):
                if not photo_ready:
                    gr.Markdown(PHOTO_NOT_READY.format(name=bundled))
                photo = photo_input("Face photo")
                example_photos(photo)
                refine_steps = gr.Slider(0, 50, value=10, step=1, label="Refinement steps (slower, closer)")
            style = gr.Dropdown(_style_choices(registry, default), value=ready[min(1, len(ready) - 1)], label="Style",
                                allow_custom_value=True)  # choices follow the generator; checked in `stylize`
            no_styles = gr.Markdown(NO_STYLES_NOTE, visible=len(ready) == 1)
            with gr.Accordion("How the styles were made", open=False):
                gr.Markdown(STYLES_HELP)
            instructions = gr.Markdown(visible=False)
            with gr.Group():
                views = gr.Slider(1, 9, value=_default_views(default), step=1, label="Number of views")
                yaw_range = gr.Slider(0, 60, value=DEFAULT_YAW_RANGE, step=5, label="Yaw range (± degrees)",
                                      info=YAW_RANGE_INFO)
                pitch = gr.Slider(-25, 25, value=0, step=1, label="Pitch (degrees, + looks from below)")
                fast = gr.Checkbox(value=True, label=f"Fast rays (at most {FAST_RAYS} px; the images keep their size)",
                                   visible=default == PANOHEAD.name)
            run = gr.Button("Generate", variant="primary")
        with gr.Column():
            original = gr.Gallery(label="Original", columns=5, format="png", elem_classes=["view-strip"])
            stylized = gr.Gallery(label="Stylized", columns=5, format="png", elem_classes=["view-strip"])
            mesh = gr.Model3D(label="Stylized head (GLB)", clear_color=(0.95, 0.95, 0.95, 1.0), height=300)
            similarity = gr.Dataframe(headers=["yaw (°)", "identity similarity"], label="Original vs stylized",
                                      interactive=False)
            info = gr.Markdown()

    def show_missing(generator_value, style_value):
        text = _missing(registry, generator_value, style_value)
        return gr.update(value=text or "", visible=bool(text)), gr.update(interactive=not text)

    def pick_generator(generator_value):
        styles_here = _ready_styles(registry, generator_value)
        value = styles_here[min(1, len(styles_here) - 1)]
        official = generator_value == PANOHEAD.name
        return (gr.update(choices=_style_choices(registry, generator_value), value=value),
                gr.update(visible=len(styles_here) == 1 and registry.is_available(generator_value)),
                gr.update(visible=official), gr.update(visible=official),
                gr.update(value=_default_views(generator_value)), *show_missing(generator_value, value))

    generator.change(pick_generator, generator, [style, no_styles, cost_note, fast, views, instructions, run],
                     queue=False, api_visibility="private")
    style.change(show_missing, [generator, style], [instructions, run], queue=False, api_visibility="private")

    def stylize(source_value, seed_value, photo_path, refine_value, style_value, view_count, yaw_value, pitch_value,
                generator_value, fast_value, truncation_value):
        text = _missing(registry, generator_value, style_value)
        if text:
            raise gr.Error(text, print_exception=False)
        if style_value not in _ready_styles(registry, generator_value):
            names = ", ".join(_ready_styles(registry, generator_value))
            raise gr.Error(f"Style '{style_value}' is not one of the choices for {generator_value}: {names}.",
                           print_exception=False)
        if source_value == "photo":
            if generator_value != bundled:
                raise gr.Error("Photo input works with the bundled generator only (its photo encoder was trained "
                               "for it); use a seed with the official PanoHead.", print_exception=False)
            require_photo(photo_path)
        return stylize_on_gpu(source_value, seed_value, photo_path, refine_value, style_value, view_count, yaw_value,
                              pitch_value, generator_value, fast_value, float(truncation_value))

    @gpu(duration=60)
    def stylize_on_gpu(source_value, seed_value, photo_path, refine_value, style_value, view_count, yaw_value,
                       pitch_value, generator_value, fast_value, truncation_value):
        try:
            if generator_value == bundled:
                pipeline = Head3DPipeline.from_pretrained(bundled, runtime)
            else:
                pipeline = load_official(generator_value, runtime)
            result = pipeline.stylize(None if style_value == ORIGINAL else style_value, seed=int(seed_value),
                                      truncation_psi=truncation_value,
                                      photo=photo_path if source_value == "photo" else None,
                                      refine_steps=int(refine_value), yaws=view_yaws(int(view_count), yaw_value),
                                      pitch=float(pitch_value), max_ray_resolution=FAST_RAYS if fast_value else None)
        except (FaceInputError, WeightsError, ValueError) as error:
            raise_user_error(error)
        for warning in result.warnings:
            gr.Warning(warning)
        captions = [f"yaw {yaw:+.0f}°" for yaw, _ in result.views]
        originals = save_pngs(list(result.original), result.provenance, "original")
        styled = save_pngs(list(result.stylized), result.provenance, style_value)
        rows = [[round(yaw, 1), value] for (yaw, _), value in zip(result.views, result.identity_similarity)]
        timing = ", ".join(f"{name[:-2]} {seconds:.2f} s" for name, seconds in result.timings.items())
        notes = [f"Style **{style_value}** on **{generator_value}**, "
                 f"{'photo' if result.inversion else f'seed {int(seed_value)} (ψ {truncation_value:g})'} on "
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
        [source, seed, photo, refine_steps, style, views, yaw_range, pitch, generator, fast, truncation],
        [original, stylized, mesh, similarity, info],
        api_name="stylize_head",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
