"""Official PanoHead and stylized generators (core.official): the catalogue's own commands convert and register a
small PanoHead-format generator (the reference small config, written as an official-layout network pickle) and a
perturbed "stylized" state dict of it in a temporary registry; the pipeline lists and loads the stylized generator
as a style of the official base; /stylize_head runs it end to end, and unregistered variants get instructions."""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import gradio as gr
import pytest
import torch
import trimesh
from gradio_client import Client
from safetensors.torch import load_file

from core import convert
from core import weights as W
from core.mesh import read_glb_asset_extras
from core.nets import build_generator
from core.nets.camera import PANOHEAD_LOOKAT
from core.official import DOWNLOADS, PANOHEAD, PANOHEAD_FILE, PANOHEAD_REPO, STYLIZED, VARIANTS, stylized_variants
from core.pipelines.head3d import available_styles, available_stylized_generators, load_official
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs import available_tabs, stylize3d
from tabs.common import MAX_UPLOAD_SIZE
from tests.test_convert import fake_official_modules, write_network_pickle
from tests.test_tab_stylize3d import _copy_identity

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "panohead_small_seed0.json"
STYLE, MISSING_STYLE = STYLIZED[0], STYLIZED[1]


def _run(command: str, root: Path) -> None:
    """Run a catalogue command through the real CLI entry points, its downloads/ and weights/ paths under `root`."""
    argv = [str(root / arg) if arg.startswith((f"{DOWNLOADS}/", "weights/")) else arg for arg in shlex.split(command)]
    assert argv[:2] == ["python", "-m"] and argv[2] in ("core.convert", "core.weights")
    if argv[2] == "core.convert":
        assert convert.main(argv[3:]) == 0
    else:
        assert W.main([*argv[3:], "--registry", str(root / "weights" / "registry.json")]) == 0


def _small_panohead() -> tuple[torch.nn.Module, dict]:
    """The small PanoHead reference generator, with a dense field so that the official density level finds a
    surface, and its official constructor kwargs."""
    if not REFERENCE.exists():
        pytest.skip(f"reference data not found: {REFERENCE}")
    config = json.loads(REFERENCE.read_text())
    generator = build_generator("panohead", config["init_kwargs"], config["rendering_kwargs"],
                                config["neural_rendering_resolution"])
    generator.load_state_dict(load_file(str(REFERENCE.parent / config["state_dict_file"])))
    with torch.no_grad():
        generator.decoder.net[-1].bias[0] += 20
    return generator.eval(), config["init_kwargs"]


@pytest.fixture(scope="module")
def official_root(tmp_path_factory):
    """A folder with downloads/ (the official-format files) and weights/ (registry with the converted variants)."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("official")
    (root / DOWNLOADS).mkdir()
    generator, init_kwargs = _small_panohead()
    marker = root / "pickled_code_ran"
    pickled = copy.deepcopy(generator)
    del pickled.superresolution.spec  # an attribute of ours; the official modules hold plain values only
    with pytest.MonkeyPatch.context() as patch:
        write_network_pickle(root / DOWNLOADS / PANOHEAD.filename, fake_official_modules(patch, marker), pickled,
                             init_kwargs)
    stylized = copy.deepcopy(generator)
    with torch.no_grad():  # the paper fine-tunes the backbone synthesis and the super-resolution
        for parameter in [*stylized.backbone.synthesis.parameters(), *stylized.superresolution.parameters()]:
            parameter.add_(0.2 * torch.randn_like(parameter))
    torch.save(stylized.state_dict(), root / DOWNLOADS / STYLE.filename)
    for variant in (PANOHEAD, STYLE):
        for command in variant.commands[1:]:
            _run(command, root)
    assert not marker.exists()
    _copy_identity(root / "weights" / "identity")
    W.main(["register", str(root / "weights" / "identity"), "--name", stylize3d.IDENTITY_NAME, "--licence", "test",
            "--registry", str(root / "weights" / "registry.json")])
    return root


@pytest.fixture(scope="module")
def registry(official_root):
    return W.Registry.load(official_root / "weights" / "registry.json")


def test_catalogue_lists_panohead_and_its_styles():
    assert PANOHEAD.base is None and PANOHEAD.filename == PANOHEAD_FILE
    assert stylized_variants(PANOHEAD.name) == STYLIZED
    assert all(variant.base == PANOHEAD.name for variant in STYLIZED)
    assert all("non-commercial" in variant.licence for variant in VARIANTS.values())
    download = shlex.split(PANOHEAD.download)
    assert download == ["hf", "download", PANOHEAD_REPO, PANOHEAD_FILE, "--local-dir", DOWNLOADS]
    if shutil.which("hf"):  # the option exists in the installed Hub CLI
        assert "--local-dir" in subprocess.run(["hf", "download", "--help"], capture_output=True, text=True).stdout
    assert STYLE.filename in STYLE.download and STYLE.download.startswith("#")
    text = STYLE.instructions()
    assert all(command in text for command in STYLE.commands) and PANOHEAD.name in text
    assert "--half" in PANOHEAD.convert_command and f"--base {PANOHEAD.name}" in STYLE.convert_command


def test_readme_gives_the_catalogue_commands():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Using the official PanoHead and stylized weights")[1].split("\n## ")[0]
    assert all(command in section for variant in (PANOHEAD, STYLE) for command in variant.commands)
    assert "non-commercial research" in section and "SafeUnpickler" in section


def test_commands_convert_and_register_the_official_files(official_root, registry):
    assert {PANOHEAD.name, STYLE.name} <= set(registry.names) and MISSING_STYLE.name not in registry.names
    assert registry.entry(PANOHEAD.name).licence == PANOHEAD.licence
    assert registry.locate(PANOHEAD.name)[0] == "bundled"
    base, style = registry.load_config(PANOHEAD.name), registry.load_config(STYLE.name)
    assert base["kind"] == style["kind"] == "panohead" and "base" not in base and style["base"] == PANOHEAD.name
    assert style["init_kwargs"] == base["init_kwargs"] and style["neural_rendering_resolution"] == 32
    weights = registry.load_state_dict(PANOHEAD.name)
    generator, _ = _small_panohead()
    assert all(tensor.dtype == torch.float16 for tensor in weights.values())
    for name, tensor in generator.state_dict().items():
        torch.testing.assert_close(weights[name].float(), tensor, atol=2e-2, rtol=1e-2)


def test_pipeline_lists_and_loads_the_stylized_generator(registry):
    assert available_stylized_generators(registry, PANOHEAD.name) == [STYLE.name]
    assert available_stylized_generators(registry, stylize3d.MODEL_NAME) == []
    assert available_styles(registry, PANOHEAD.name) == []  # full generators are not style deltas
    pipeline = load_official(PANOHEAD.name, Runtime("cpu", registry=registry))
    assert pipeline.camera_pivot == PANOHEAD_LOOKAT and pipeline.encoder is None
    result = pipeline.stylize(STYLE.name, seed=1, yaws=(-20.0, 20.0), mesh=False)
    assert result.original.shape == result.stylized.shape == (2, 128, 128, 3)
    assert (result.original != result.stylized).any() and all(-1 <= value <= 1 for value in result.identity_similarity)
    coarse = pipeline.render_views(pipeline.latent(1), [(-20.0, 0.0)], max_ray_resolution=16)
    assert coarse.shape == (1, 128, 128, 3) and (coarse[0] != result.original[0]).any()


def _launch(registry, tmp_path_factory):
    with gr.Blocks() as demo:
        with gr.Tab("3D head stylization"):
            stylize3d.create_tab(Runtime("cpu", registry=registry))
    demo.queue(max_size=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, max_file_size=MAX_UPLOAD_SIZE)
    return demo, Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def app(registry, tmp_path_factory):
    demo, client = _launch(registry, tmp_path_factory)
    yield demo, client
    demo.close()


def _dropdown_choices(demo, label: str) -> dict[str, str]:
    (component,) = [c for c in demo.config["components"] if c.get("props", {}).get("label") == label]
    return {value: text for text, value in component["props"]["choices"]}


def test_tab_shows_with_the_official_generator_only(registry, app):
    assert stylize3d in available_tabs(registry) and stylize3d.MODEL_NAME not in registry.names
    assert stylize3d not in available_tabs(W.Registry([entry for entry in map(registry.entry, registry.names)
                                                       if entry.name != PANOHEAD.name]))
    demo, _ = app
    generators = _dropdown_choices(demo, "Generator")
    assert generators[PANOHEAD.name] == PANOHEAD.title and generators[stylize3d.MODEL_NAME].endswith("(not trained yet)")
    styles = _dropdown_choices(demo, "Style")
    assert styles[STYLE.name] == STYLE.title and styles[MISSING_STYLE.name].endswith("(needs download)")


def test_official_variant_end_to_end(app):
    _, client = app
    original, stylized, glb, table, info = client.predict("seed", 3, None, 0, STYLE.name, 2, 30, 0, PANOHEAD.name,
                                                          True, api_name="/stylize_head")
    assert [item["caption"] for item in original] == [item["caption"] for item in stylized] == ["yaw -30°", "yaw +30°"]
    record = read_png_provenance(stylized[0]["image"])
    assert record["model"] == PANOHEAD.name and record["parameters"]["style"] == STYLE.name
    assert [row[0] for row in table["data"]] == [-30, 30] and all(-1 <= row[1] <= 1 for row in table["data"])
    mesh = trimesh.load(glb, force="mesh")
    assert 0 < len(mesh.faces) <= 100_000 and read_glb_asset_extras(glb)["method"] == "stylize3d"
    scene = trimesh.load(glb)  # glTF is +Y up: the head's up axis stays Y after loading
    assert scene.bounds[1][1] > scene.bounds[0][1]
    assert STYLE.name in info and PANOHEAD.name in info


def test_unavailable_variants_get_instructions_not_crashes(app):
    _, client = app
    with pytest.raises(Exception, match="needs a download") as error:
        client.predict("seed", 0, None, 0, MISSING_STYLE.name, 1, 0, 0, PANOHEAD.name, True, api_name="/stylize_head")
    assert MISSING_STYLE.convert_command in str(error.value)
    with pytest.raises(Exception, match="not trained yet"):
        client.predict("seed", 0, None, 0, "original", 1, 0, 0, stylize3d.MODEL_NAME, True, api_name="/stylize_head")
    with pytest.raises(Exception, match="bundled generator only"):
        client.predict("photo", 0, None, 0, "original", 1, 0, 0, PANOHEAD.name, True, api_name="/stylize_head")
    with pytest.raises(Exception, match="(?i)choices"):
        client.predict("seed", 0, None, 0, "cartoon", 1, 0, 0, PANOHEAD.name, True, api_name="/stylize_head")
    # the client still works after the errors
    _, stylized, _, table, _ = client.predict("seed", 0, None, 0, "original", 1, 0, 0, PANOHEAD.name, True,
                                              api_name="/stylize_head")
    assert len(stylized) == 1 and table["data"][0][1] == pytest.approx(1, abs=1e-3)
