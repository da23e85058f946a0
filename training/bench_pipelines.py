"""CPU timings of every pipeline against the issues' speed targets, before the generators are trained:
`python -m training.bench_pipelines [--output docs/BENCHMARKS_PIPELINES.md] [--tiny] [--only beauty,head3d]`.

Speed does not depend on trained weights, so each pipeline is built as the app builds it (`from_pretrained` on
`core.runtime.Runtime("cpu")`, float32, the tab's default arguments) from a registry that holds, next to the real
bundled models (identity network, beauty regressor and evaluator, ICT-FaceKit, F_R), randomly initialised generators
and encoders at the trainers' default configs (those `training.weights_budget` sizes), written in their export
format (float16 safetensors + config.json) into a temporary folder, and random style deltas over the 3D generator.
Each row: one warm-up call, then as many timed calls as fit in the row's time budget (at least one, at most
`max_runs`); the median and minimum are reported with the process's peak RSS and the CPU that other processes took
meanwhile. The machine is shared: a row during which other jobs took more than `BUSY_CORES` cores is measured again
after a pause (`--retries`), and the least disturbed attempt is kept. A measurement that fails becomes a
'not measured: <reason>' row. `--tiny` uses tiny configs and call sizes (for tests; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from core.bench import machine_description
from core.nets.encoders import Head3DEncoder, StyleEncoder, head3d_encoder_config, style_encoder_config
from core.nets.l2sae import L2SAE, L2SAEConfig
from core.nets.stylegan2 import Generator
from core.nets.style_delta import make_style_delta, save_style_delta
from core.pipelines.beauty import DEFAULT_BUDGET, DEFAULT_POPULATION
from core.weights import FileSpec, ModelEntry, Registry, default_registry, sha256_of
from training.train_head3d import Head3DConfig, build_head_generator
from training.train_l2sae import TrainConfig as L2SAETrainConfig
from training.train_stylegan2 import TrainConfig
from training.train_taxfree import TaxFreeConfig
from training.weights_budget import AGILE_RANK, FACE3DMM_LABEL_DIM, LD_RANK, LD_TRAINED_PREFIXES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "BENCHMARKS_PIPELINES.md"
PHOTO = sorted((REPO / "tests" / "fixtures" / "faces").glob("*.jpg"))[0]
LD_STYLE = "head3d-style-bench"
AGILE_STYLE = "agilegan3d-bench"
# Random density fields stay within about +-1, far below the official marching-cubes level (10): this bias on the
# decoder's density output makes the field dense everywhere, so that the GLB stage meshes a closed surface (the
# lattice's border box, which the official procedure sets to -1000) instead of finding none.
DENSITY_SHIFT = 20.0
PIPELINES = ("beauty", "taxfree", "latents2semantics", "head3d", "stylize3d", "agilegan3d")
BUSY_CORES = 0.25  # other processes' CPU (in cores) during a row above which the row is measured again
COLUMNS = ("Issue", "Pipeline", "Operation", "Target", "Median s", "Min s", "Runs", "Other jobs (cores)", "Peak RSS",
           "Met", "Notes")


@dataclass(frozen=True)
class Scale:
    """Model configs and call sizes of one benchmark run: the trainers' defaults and the tabs' defaults, or tiny."""

    l2sae: dict[str, Any]
    head3d: Head3DConfig
    gan2d_overrides: dict[str, Any] = field(default_factory=dict)  # of the 2D generators' TrainConfig defaults
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    beauty_budget: int = DEFAULT_BUDGET  # a run's defaults (tabs/beauty.py sliders)
    beauty_population: int = DEFAULT_POPULATION
    refine_steps: int = 10  # tabs/agilegan3d.py slider default
    tab_views: int = 5  # tabs/stylize3d.py and tabs/agilegan3d.py slider defaults
    views: int = 8  # the issues' targets
    mesh_resolution: int = 128
    warm_up: bool = True
    row_budget_s: float = 30.0  # timed calls per row: as many as fit in this, judged by the warm-up
    max_runs: int = 5
    retries: int = 2  # new attempts at a row that other jobs disturbed
    retry_wait_s: float = 20.0
    min_window_s: float = 1.0  # other jobs' CPU is averaged over at least this long (clock ticks are 10 ms)
    tiny: bool = False

    def stylegan2(self) -> TrainConfig:
        """The base 2D generator's config (beauty)."""
        return TrainConfig(**self.gan2d_overrides)

    def taxfree(self, recipe: str) -> TaxFreeConfig:
        """The conditional generator config of `recipe` ('taxfree' or 'overconstrained')."""
        return TaxFreeConfig.for_recipe(recipe, c_dim=FACE3DMM_LABEL_DIM, **self.gan2d_overrides)


def default_scale() -> Scale:
    """The trainers' default configs and the tabs' default arguments."""
    return Scale(L2SAETrainConfig().model, Head3DConfig())


def tiny_scale() -> Scale:
    """Tiny configs and calls, so that a test runs the whole benchmark in seconds."""
    l2sae = L2SAEConfig(resolution=32, structure_resolution=8, channels_per_region=2, style_dim=16, channel_base=256,
                        channel_max=16, mask_channels=8).to_dict()
    head = Head3DConfig(z_dim=16, mapping_layers=1, channel_base=256, channel_max=16, triplane_size=16,
                        neural_rendering_resolution=16, depth_samples=4, importance_samples=4)
    return Scale(l2sae, head, gan2d_overrides={"resolution": 32, "z_dim": 16, "w_dim": 16, "channel_base": 256,
                                               "channel_max": 16},
                 encoder_overrides={"channels": [8, 8, 8], "pyramid_channels": 8, "head_channels": 4,
                                    "head_grid": 2, "head_hidden": 8},
                 beauty_budget=2, beauty_population=4, refine_steps=1, tab_views=1, views=2, mesh_resolution=32,
                 warm_up=False, max_runs=1, retries=0, min_window_s=0.0, tiny=True)


# ---- the registry of random models --------------------------------------------------------------------------------


def _register(entries: list[ModelEntry], folder: Path, name: str) -> None:
    """Add the exported folder as a bundled entry (an absolute `bundled` path: `weights_dir / path` is `path`)."""
    files = tuple(FileSpec(p.name, sha256_of(p), p.stat().st_size) for p in sorted(folder.iterdir()))
    entries.append(ModelEntry(name, "random init (training.bench_pipelines)", "none", files, bundled=str(folder)))


def _export(entries: list[ModelEntry], folder: Path, name: str, module: torch.nn.Module, config: dict) -> None:
    """Write `module` as float16 `model.safetensors` + `config.json` (the trainers' export format) and register it."""
    folder.mkdir(parents=True)
    weights = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    _register(entries, folder, name)


def random_style_delta(base: torch.nn.Module, base_name: str, rank: int, prefixes: tuple[str, ...] | None = None):
    """A rank-`rank` style delta of `base` in which every float tensor under `prefixes` (all when None) changed."""
    generator = torch.Generator().manual_seed(1)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, tensor in tuned.state_dict().items():
            if tensor.is_floating_point() and (prefixes is None or name.startswith(prefixes)):
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
    return make_style_delta(base, tuned, base_name, rank=rank)


def random_weights_registry(folder: Path, scale: Scale, base: Registry | None = None) -> Registry:
    """`base` (default: this checkout's registry) plus random generators, encoders and style deltas at `scale`,
    under the registry names the pipelines load, written into `folder`."""
    from core.pipelines import head3d, latents2semantics, taxfree

    base = base or default_registry()
    entries = [base.entry(name) for name in base.names]
    torch.manual_seed(0)
    sg2 = scale.stylegan2()
    g2d = Generator(**sg2.generator_kwargs())
    _export(entries, folder / "stylegan2", "stylegan2-faces128", g2d,
            {"kind": "stylegan2", "init_kwargs": sg2.generator_kwargs()})
    encoder = StyleEncoder(style_encoder_config(g2d.num_ws, g2d.w_dim, sg2.resolution, **scale.encoder_overrides))
    _export(entries, folder / "style_encoder", "style-encoder-faces128", encoder, encoder.config)
    normalisation = base.load_config("face3dmm-estimator")["normalisation"]  # F_R's statistics, as the trainer's
    for variant, (name, *_) in taxfree.VARIANTS.items():  # the preferred (128-px) model of each variant
        config = scale.taxfree(variant.replace("-", ""))
        conditioning = {"mean": normalisation["mean"], "std": normalisation["std"], "recipe": config.recipe}
        _export(entries, folder / name, name, Generator(**config.generator_kwargs()),
                {"kind": "stylegan2", "init_kwargs": config.generator_kwargs(), "conditioning": conditioning})
    _export(entries, folder / "l2sae", latents2semantics.MODEL_NAMES[0], L2SAE(L2SAEConfig(**scale.l2sae)),
            {"kind": "l2sae", "config": scale.l2sae})
    head = scale.head3d
    g3d = build_head_generator(head)
    with torch.no_grad():
        g3d.decoder.net[-1].bias[0] += DENSITY_SHIFT
    _export(entries, folder / "head3d", head3d.MODEL_NAME, g3d,
            {"kind": "panohead", "init_kwargs": head.generator_kwargs(), "rendering_kwargs": head.rendering_kwargs(),
             "neural_rendering_resolution": head.neural_rendering_resolution})
    encoder3d = Head3DEncoder(head3d_encoder_config(g3d.backbone.num_ws, g3d.w_dim, head.resolution,
                                                    **scale.encoder_overrides))
    _export(entries, folder / "head3d_encoder", head3d.ENCODER_NAME, encoder3d, encoder3d.config)
    save_style_delta(random_style_delta(g3d, head3d.MODEL_NAME, LD_RANK, LD_TRAINED_PREFIXES), folder / LD_STYLE,
                     extra_config={"method": "stylize3d", "style": "random"})
    _register(entries, folder / LD_STYLE, LD_STYLE)
    # an AgileGAN3D style ships its stylized photo encoder as a delta over the base encoder (training.agilegan3d)
    save_style_delta(random_style_delta(g3d, head3d.MODEL_NAME, AGILE_RANK), folder / AGILE_STYLE,
                     extra_config={"method": "agilegan3d", "style": "random"},
                     parts={"encoder": random_style_delta(encoder3d, head3d.ENCODER_NAME, AGILE_RANK)})
    _register(entries, folder / AGILE_STYLE, AGILE_STYLE)
    return Registry(entries, base.weights_dir)


# ---- measuring ----------------------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux `/proc/self/clear_refs`); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's peak RSS in MiB since the last reset (VmHWM), else its lifetime maximum."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of the whole machine, steal included; clock ticks of this process) so far, from Linux's
    /proc; None elsewhere."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])


def other_cores(before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float) -> float | None:
    """Average number of cores that other processes (and the hypervisor's steal) used between two `cpu_ticks`."""
    if before is None or after is None or seconds <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(others, 0) / os.sysconf("SC_CLK_TCK") / seconds


@dataclass
class Context:
    """What the measurements share: the runtime (with the random-weights registry), the scale, a photo, a folder."""

    runtime: Any
    scale: Scale
    photo: Path
    folder: Path


@dataclass(frozen=True)
class Measurement:
    """One row: `prepare(ctx)` returns the call to time, which returns (seconds, result); `notes(result)` describes
    the last result. `limit_s` is the issue's target in seconds (None when the issue states none)."""

    issue: int
    pipeline: str
    operation: str
    target: str
    limit_s: float | None
    prepare: Callable[[Context], Callable[[], tuple[float, Any]]]
    notes: Callable[[Any], str] = lambda result: ""


def measure(measurement: Measurement, ctx: Context) -> dict[str, Any]:
    """A warm-up call (unless the scale skips it), then timed calls (as many as fit in the row budget judging by the
    warm-up, 1 to max_runs): median and minimum seconds, peak RSS and the other jobs' CPU meanwhile; any exception
    becomes the row's `error`."""
    row: dict[str, Any] = {"issue": measurement.issue, "pipeline": measurement.pipeline,
                           "operation": measurement.operation, "target": measurement.target,
                           "limit_s": measurement.limit_s}
    try:
        call = measurement.prepare(ctx)
        runs = 1
        if ctx.scale.warm_up:
            start = time.perf_counter()
            call()
            warm_up = time.perf_counter() - start
            runs = max(1, min(ctx.scale.max_runs, int(ctx.scale.row_budget_s / max(warm_up, 1e-3))))
        row["rss_reset"] = reset_peak_rss()
        samples = []
        ticks, start = cpu_ticks(), time.perf_counter()
        for _ in range(runs):
            seconds, result = call()
            samples.append(seconds)
        window = time.perf_counter() - start
        if window < ctx.scale.min_window_s:  # a short row: watch the other jobs a little longer
            time.sleep(ctx.scale.min_window_s - window)
        others = other_cores(ticks, cpu_ticks(), max(window, ctx.scale.min_window_s))
        row.update(seconds=statistics.median(samples), min_seconds=min(samples), runs=runs,
                   peak_rss_mib=peak_rss_mib(), other_cores=others, notes=measurement.notes(result))
    except Exception as error:  # noqa: BLE001 - reported in the table
        row["error"] = f"not measured: {type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")[:300]
    finally:
        gc.collect()
    return row


def measure_quietly(measurement: Measurement, ctx: Context) -> dict[str, Any]:
    """`measure`, again after a pause (up to `retries` times) while other jobs took more than BUSY_CORES cores
    during it; the least disturbed attempt, with the number of attempts."""
    best = measure(measurement, ctx)
    attempts = 1
    while attempts <= ctx.scale.retries and (best.get("other_cores") or 0) > BUSY_CORES:
        time.sleep(ctx.scale.retry_wait_s)
        row = measure(measurement, ctx)
        attempts += 1
        if "error" in row:
            break
        if row["other_cores"] < best["other_cores"]:
            best = row
    best["attempts"] = attempts
    return best


def _wall(fn: Callable[[], Any]) -> Callable[[], tuple[float, Any]]:
    def call():
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result
    return call


def _timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{name.removesuffix('_s')} {value:.2f} s" for name, value in timings.items())


def _glb_faces(path) -> int:
    import trimesh

    return len(trimesh.load(path, force="mesh").faces)


# ---- issue 5: beauty --------------------------------------------------------------------------------------------


def _beauty_tab(ctx: Context):
    from core.pipelines.beauty import BeautyOptimizer

    def run():
        start = time.perf_counter()
        pipeline = BeautyOptimizer.from_pretrained(runtime=ctx.runtime)  # the tab loads on every call
        loaded = time.perf_counter() - start
        result = pipeline(str(ctx.photo), seed=0, budget=ctx.scale.beauty_budget,
                          population=ctx.scale.beauty_population)  # default identity weight and strength
        return loaded, result
    return _wall(run)


def _beauty_notes(value) -> str:
    loaded, result = value
    return (f"from_pretrained {loaded:.2f} s; {_timings(result.timings)} (total = after loading); "
            f"{result.evaluations} candidates in {len(result.history)} generations")


# ---- issue 6: tax-free --------------------------------------------------------------------------------------------


def _taxfree(key: str, variants: tuple[str, ...], mesh: bool, tab: bool = False):
    """The tax-free pipeline's own timing `key` of a call with the tab's default controls (or the tab's whole call,
    from_pretrained included, when `tab`)."""
    def prepare(ctx: Context):
        from core.pipelines.taxfree import FaceControls, TaxFreePipeline

        def run():
            start = time.perf_counter()
            pipeline = TaxFreePipeline.from_pretrained(variants, ctx.runtime)
            result = pipeline(FaceControls(), seed=0, variants=variants, random_identity=True,
                              mesh_path=ctx.folder / "face3dmm.glb" if mesh else None)
            return time.perf_counter() - start if tab else result.seconds[key], result
        return run
    return prepare


def _taxfree_notes(result) -> str:
    size = next(iter(result.images.values())).shape[0]
    glb = f"; GLB {_glb_faces(result.mesh_path)} faces" if result.mesh_path else ""
    return f"{size}-px images; pipeline timings: {_timings(result.seconds)}{glb}"


# ---- issue 7: Latents2Semantics -----------------------------------------------------------------------------------


def _l2s(variants: int, tab: bool):
    def prepare(ctx: Context):
        from core.face import prepare_face
        from core.pipelines.latents2semantics import CROP_SIZE, MODES, Latents2SemanticsPipeline

        crop = prepare_face(ctx.photo, size=CROP_SIZE).image

        def run():
            pipeline = Latents2SemanticsPipeline.from_pretrained(runtime=ctx.runtime)
            region = "hair" if "hair" in pipeline.regions else pipeline.regions[0]  # the tab's default region
            return pipeline(str(ctx.photo) if tab else crop, region, MODES[0], 1.0, 0, variants, keep_detail=tab)
        return _wall(run)
    return prepare


def _l2s_notes(result) -> str:
    return (f"region {result.region}, {len(result.edited)} variant(s), {result.input_crop.shape[0]}-px crop; "
            f"the pipeline's own `seconds` (model + blend) {result.seconds:.2f} s")


# ---- issues 8-10: the 3D head generator ---------------------------------------------------------------------------


def _head3d(ctx: Context):
    from core.pipelines.head3d import Head3DPipeline

    return Head3DPipeline.from_pretrained(runtime=ctx.runtime)


def _yaws(count: int) -> tuple[float, ...]:
    """`count` yaws over the tabs' default yaw range."""
    from core.pipelines.head3d import DEFAULT_YAW_RANGE, view_yaws

    return view_yaws(count, DEFAULT_YAW_RANGE)


def _head3d_views(ctx: Context):
    """Seed -> ws -> the target's views, as `Head3DPipeline.__call__` renders its orbit (it has no views-only entry
    point)."""
    pipeline = _head3d(ctx)
    views = [(yaw, 0.0) for yaw in _yaws(ctx.scale.views)]

    def run():
        return ctx.runtime.run(lambda dtype: pipeline.render_views(pipeline.latent(0), views), fp16_safe=False,
                               what="The 3D head generator")
    return _wall(run)


def _head3d_views_notes(images) -> str:
    return f"{len(images)} views of {images.shape[1]} px"


def _head3d_glb(ctx: Context):
    from core.provenance import Provenance

    pipeline = _head3d(ctx)
    ws = ctx.runtime.run(lambda dtype: pipeline.latent(0), fp16_safe=False)
    provenance = Provenance("head3d", pipeline.model_name, None, 0, {})
    return _wall(lambda: pipeline.mesh(ws, ctx.folder / "head.glb", provenance, ctx.scale.mesh_resolution))


def _head3d_glb_notes(value) -> str:
    path, faces, warnings = value
    if path is None:
        return f"no surface: {' '.join(warnings)}"
    return (f"GLB {faces} faces: the surface of the (shifted) random field is the lattice's border box, not a head "
            "(see the caveats)")


def _head3d_lattice(coarse_step: int | None):
    """The density lattice as `Head3DPipeline.extract_mesh` computes it (border skipped, density alone, coarse to
    fine with `coarse_step`, the pipeline's default when None); the value is (points evaluated, interior points)."""
    def prepare(ctx: Context):
        from core.mesh import sparse_density_lattice
        from core.nets.shape import OFFICIAL_LEVEL, border_width, lattice_axis
        from core.pipelines.head3d import MESH_COARSE_STEP

        pipeline = _head3d(ctx)
        generator = pipeline.generator
        resolution = ctx.scale.mesh_resolution
        pad = border_width(resolution)

        def run():
            planes = generator.generate_planes(pipeline.latent(0), noise_mode="const")
            density, counted = pipeline.density(planes), []

            def counting(points):
                counted.append(len(points))
                return density(points)
            sparse_density_lattice(counting, lattice_axis(resolution, generator.rendering_kwargs["box_warp"]).numpy(),
                                   OFFICIAL_LEVEL, pad, coarse_step=coarse_step or MESH_COARSE_STEP)
            return sum(counted), (resolution - 2 * pad) ** 3
        return _wall(lambda: ctx.runtime.run(lambda dtype: run(), fp16_safe=False))
    return prepare


def _head3d_lattice_notes(value) -> str:
    evaluated, interior = value
    return f"{evaluated} of the {interior} points inside the border evaluated ({100 * evaluated / interior:.0f}%)"


def _stylize(views: int, mesh: bool, tab: bool):
    """`Head3DPipeline.stylize` with the 3D-stylization style from `views` yaws over the tabs' range (the tab's call,
    from_pretrained included, when `tab`)."""
    def prepare(ctx: Context):
        yaws = _yaws(views)
        loaded = None if tab else _head3d(ctx)

        def run():
            pipeline = loaded or _head3d(ctx)
            return pipeline.stylize(LD_STYLE, seed=0, yaws=yaws, pitch=0.0, mesh=mesh,
                                    mesh_resolution=ctx.scale.mesh_resolution, output_dir=ctx.folder)
        return _wall(run)
    return prepare


def _stylize_notes(result) -> str:
    glb = f"; GLB {result.mesh_faces} faces" if result.glb_path else ""
    return f"{len(result.views)} views x 2 generators, {result.original.shape[1]} px; {_timings(result.timings)}{glb}"


def _agile_tab(ctx: Context):
    def run():
        pipeline = _head3d(ctx)
        return pipeline.stylize(AGILE_STYLE, photo=str(ctx.photo), refine_steps=ctx.scale.refine_steps,
                                yaws=_yaws(ctx.scale.tab_views), mesh_resolution=ctx.scale.mesh_resolution,
                                output_dir=ctx.folder)
    return _wall(run)


def _agile_notes(result) -> str:
    glb = f"; GLB {result.mesh_faces} faces" if result.glb_path else ""
    encoder = result.provenance.parameters.get("encoder", "base")
    return (f"photo inverted by the {encoder} 3D encoder + {result.inversion.refine_steps} refinement steps; "
            f"{len(result.views)} stylized views; {_timings(result.timings)}{glb}")


def measurements(scale: Scale) -> list[Measurement]:
    """Every row of the table, in order."""
    glb = f"GLB at {scale.mesh_resolution}³"
    views, tab_views = scale.views, scale.tab_views
    tab_taxfree = ("tax-free", "over-constrained")
    return [
        Measurement(5, "beauty", f"tab default call from a photo: from_pretrained, align, encoder inversion, CMA-ES "
                    f"{scale.beauty_budget} generations x {scale.beauty_population}, final scores",
                    "CPU, 2 cores: default run ≤ 30 s", 30.0, _beauty_tab, _beauty_notes),
        Measurement(6, "taxfree", "one image (tax-free generator)", "one image ≤ 0.5 s", 0.5,
                    _taxfree("tax-free", ("tax-free",), False), _taxfree_notes),
        Measurement(6, "taxfree", "one image (over-constrained generator)", "one image ≤ 0.5 s", 0.5,
                    _taxfree("over-constrained", ("over-constrained",), False), _taxfree_notes),
        Measurement(6, "taxfree", "3DMM condition render (256 px)", "", None,
                    _taxfree("condition_render", ("tax-free",), False), _taxfree_notes),
        Measurement(6, "taxfree", "3DMM mesh GLB", "", None, _taxfree("mesh", ("tax-free",), True), _taxfree_notes),
        Measurement(6, "taxfree", "tab default call: from_pretrained, both generators, condition render, GLB", "",
                    None, _taxfree("", tab_taxfree, True, tab=True), _taxfree_notes),
        Measurement(7, "latents2semantics", "one edit (1 variant, aligned crop)", "one edit ≤ 0.5 s", 0.5,
                    _l2s(1, tab=False), _l2s_notes),
        Measurement(7, "latents2semantics", "tab default call: from_pretrained, align the photo, 4 variants, keep "
                    "detail", "",
                    None, _l2s(4, tab=True), _l2s_notes),
        Measurement(8, "head3d", f"{views} views (seed -> ws -> {views} renders)", "8 views ≤ 3 s", 3.0,
                    _head3d_views, _head3d_views_notes),
        Measurement(8, "head3d", f"{glb} (density lattice, marching cubes, colours, GLB)",
                    "GLB at 128³ ≤ 2 s", 2.0, _head3d_glb, _head3d_glb_notes),
        Measurement(8, "head3d", f"of which the {scale.mesh_resolution}³ density lattice (planes + decoder: "
                    "border skipped, coarse to fine where the surface can be)", "", None, _head3d_lattice(None),
                    _head3d_lattice_notes),
        Measurement(8, "head3d", f"the {scale.mesh_resolution}³ density lattice at every point inside the border "
                    "(no coarse pass: the most a surface can cost)", "", None, _head3d_lattice(1),
                    _head3d_lattice_notes),
        Measurement(9, "stylize3d", f"stylized {views}-view render: original + stylized (style delta) + identity "
                    "per view", "a stylized 8-view render ≤ 3 s", 3.0, _stylize(scale.views, mesh=False, tab=False),
                    _stylize_notes),
        Measurement(9, "stylize3d", f"tab default call: from_pretrained, {tab_views} views x 2, identity, stylized "
                    f"{glb}", "", None, _stylize(scale.tab_views, mesh=True, tab=True), _stylize_notes),
        Measurement(10, "agilegan3d", f"tab default call from a photo: the style's encoder, {scale.refine_steps} "
                    f"refinement steps, {tab_views} stylized views, {glb}", "", None, _agile_tab, _agile_notes),
    ]


def run_benchmarks(scale: Scale, only: tuple[str, ...] = PIPELINES) -> list[dict[str, Any]]:
    """Build the random-weights registry and runtime, then measure every row of the pipelines in `only`."""
    from core.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="bench_pipelines_") as tmp:
        folder = Path(tmp)
        registry = random_weights_registry(folder / "weights", scale)
        ctx = Context(Runtime("cpu", registry=registry), scale, PHOTO, folder / "outputs")
        ctx.folder.mkdir()
        rows = []
        for measurement in measurements(scale):
            if measurement.pipeline in only:
                rows.append(measure_quietly(measurement, ctx))
                print(json.dumps(rows[-1]), flush=True)
        return rows


def _met(row: dict[str, Any], scale: Scale) -> str:
    if row["limit_s"] is None:
        return "—"
    if scale.tiny:
        return "n/a (tiny)"
    return "yes" if row["seconds"] <= row["limit_s"] else "**no**"


def to_markdown(rows: list[dict[str, Any]], machine: dict[str, str], load_at_start: str, scale: Scale) -> str:
    """The benchmark document: method, machine, the table, caveats."""
    rss_reset = all(row.get("rss_reset", True) for row in rows)
    repeats = "a single timed call, without warm-up"
    if scale.warm_up:
        repeats = (f"one warm-up call, then as many timed calls as fit in about {scale.row_budget_s:g} s judging by "
                   f"the warm-up (1 to {scale.max_runs}; the Runs column); their median and minimum are reported")
    lines = ["# Pipeline benchmarks (CPU, untrained generators)", ""]
    if scale.tiny:
        lines += ["**`--tiny` run: tiny models and calls, for tests. These numbers mean nothing.**", ""]
    lines += [
        "Produced by `python -m training.bench_pipelines`. Each pipeline is built as the app builds it "
        "(`from_pretrained` on `Runtime(\"cpu\")`, float32, the tabs' default arguments) from a registry holding the "
        "real bundled models (identity network, beauty regressor and evaluator, ICT-FaceKit, F_R) and randomly "
        "initialised generators and encoders at the trainers' default configs (the ones `training.weights_budget` "
        "sizes), exported as the trainers export them (float16 files, loaded in float32), plus random style deltas "
        "over the 3D generator (rank 8 on the synthesis and super-resolution for 3D stylization, rank 4 on every "
        "tensor for AgileGAN3D). Speed does not depend on trained weights except where the data decides the work: "
        "see the notes. Photo inputs use `tests/fixtures/faces/" + PHOTO.name + "` (a real face, so face detection "
        "and alignment do their usual work).",
        "",
        f"Each row: {repeats}. Rows called 'tab default call' time what the tab's event does "
        "(including `from_pretrained`, which the tabs run on every call). Peak RSS: "
        + ("the process's peak resident memory during the timed calls (reset before them through "
           "`/proc/self/clear_refs`), everything loaded so far included." if rss_reset else
           "the process's peak resident memory so far (it could not be reset between rows)."),
        "",
        "## Machine",
        "",
        f"* Load average at the start (1/5/15 min): {load_at_start}",
    ]
    lines += [f"* {key}: {value}" for key, value in machine.items()]
    lines += ["", "## Results", "", "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for row in rows:
        cells = [str(row["issue"]), row["pipeline"], row["operation"], row["target"] or "—"]
        if "error" in row:
            cells += [row["error"]] + [""] * (len(COLUMNS) - len(cells) - 1)
        else:
            others = "?" if row["other_cores"] is None else f"{row['other_cores']:.2f}"
            if row["attempts"] > 1:
                others += f" (best of {row['attempts']} attempts)"
            cells += [f"{row['seconds']:.3g}", f"{row['min_seconds']:.3g}", str(row["runs"]), others,
                      f"{row['peak_rss_mib']:.0f} MiB", _met(row, scale), row["notes"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "", "## Caveats", "",
        "* Random weights: the generators' arithmetic is that of the trained models, but data-dependent steps are "
        "not. The 3D generator's random density field lies far below the marching-cubes level, so its decoder's "
        f"density bias is raised by {DENSITY_SHIFT:g} to make the field dense everywhere: the GLB rows then mesh the "
        "lattice's closed border box (face counts in the notes, decimated to the 100k-face budget) rather than a "
        "head. The lattice is evaluated coarse to fine only where the surface can be, so its work depends on the "
        "surface: the notes give the points evaluated; the row without the coarse pass (every point inside the "
        "border) is the most any surface can cost and does not depend on the weights.",
        "* Face detection runs only on the real example photo; the renders of random generators are never "
        "detected (the pipelines embed them as aligned crops). The beauty CMA-ES renders and scores a fixed "
        "population per generation; its stop criteria could end it before the budget, so the notes give the "
        "generations run.",
        "* The machine is shared with other jobs. 'Other jobs' is the average number of cores that other processes "
        "(and the hypervisor's steal) took during the row's timed calls, from /proc/stat; a row above "
        f"{BUSY_CORES:g} was measured again after a pause (at most {scale.retries} more times) and the least "
        "disturbed attempt is shown. Taken cores slow torch's parallel sections far more than in proportion. The "
        "load averages above include this benchmark's own two threads.",
        "* CUDA: not measured here.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m training.bench_pipelines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--tiny", action="store_true", help="tiny configs and calls (for tests)")
    parser.add_argument("--only", default=",".join(PIPELINES), help=f"comma-separated subset of {PIPELINES}")
    args = parser.parse_args(argv)
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = sorted(set(only) - set(PIPELINES))
    if unknown:
        parser.error(f"unknown pipelines {unknown}; expected some of {PIPELINES}")
    load_at_start = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    scale = tiny_scale() if args.tiny else default_scale()
    rows = run_benchmarks(scale, only)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_markdown(rows, machine_description(), load_at_start, scale))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
