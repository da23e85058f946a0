"""'Tax-free' tab end to end: /taxfree_generate gives the faces of each generator, the 3DMM condition render and a
GLB; /taxfree_copy_from_photo fills the sliders from a photo. Most tests run on tiny random generators registered
in a temporary registry; one runs the app on the bundled generators and checks that the yaw slider turns the head."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from gradio_client import Client, handle_file
from PIL import Image

from app import build_demo
from core.face3dmm import EXPRESSION_NAMES
from core.mesh import read_glb_asset_extras
from core.pipelines.taxfree import CURATED_EXPRESSIONS, VARIANTS, TaxFreePipeline, average_controls
from core.provenance import read_png_provenance
from core.runtime import Runtime
from tabs.common import EXAMPLE_PHOTOS, MAX_UPLOAD_SIZE, preview_note
from tabs import available_tabs, taxfree
from tabs.taxfree import BOTH
from tests.tiny_weights import add_taxfree, load_registry


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("weights")
    add_taxfree(weights_dir)
    return weights_dir


@pytest.fixture(scope="module")
def client(weights_dir, tmp_path_factory):
    demo = build_demo(Runtime("cpu", registry=load_registry(weights_dir))).queue(max_size=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, max_file_size=MAX_UPLOAD_SIZE)
    yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    demo.close()


def _face_values(yaw=0.0, smile=0.0, detailed=None, light=(30.0, 20.0, 0.8)):
    curated = [smile if label == "smile" else 0.0 for label in CURATED_EXPRESSIONS]
    detailed = [0.0] * len(EXPRESSION_NAMES) if detailed is None else [detailed[name] for name in EXPRESSION_NAMES]
    return [yaw, 0.0, 0.0, *curated, *detailed, *light]


def test_generate_both_variants_with_condition_render_and_mesh(client):
    faces, condition, mesh, info = client.predict("both side by side", 5, True, *_face_values(yaw=20, smile=1.0),
                                                  api_name="/taxfree_generate")
    assert [item["caption"] for item in faces] == list(VARIANTS)
    record = read_png_provenance(faces[0]["image"])
    assert record["seed"] == 5 and record["parameters"]["yaw"] == 20
    assert record["parameters"]["expression"] == {"mouthSmile_L": 1.0, "mouthSmile_R": 1.0}
    detailed = dict.fromkeys(EXPRESSION_NAMES, 0.0) | {"mouthSmile_L": 0.3, "jawOpen": 0.5}
    faces, *_ = client.predict("tax-free", 5, True, *_face_values(smile=0.5, detailed=detailed),
                               api_name="/taxfree_generate")
    expression = read_png_provenance(faces[0]["image"])["parameters"]["expression"]
    assert expression == {"mouthSmile_L": 0.8, "mouthSmile_R": 0.5, "jawOpen": 0.5}  # named sliders add to the rest
    assert Image.open(condition).size == (256, 256)
    loaded = trimesh.load(mesh, force="mesh")
    assert 0 < len(loaded.faces) <= 100_000
    assert read_glb_asset_extras(mesh)["seed"] == 5
    assert "Seed 5" in info and f"{VARIANTS['tax-free'][0]} (16 px)" in info
    one, *_ = client.predict("tax-free", 5, True, *_face_values(), api_name="/taxfree_generate")
    assert [item["caption"] for item in one] == ["tax-free"]


def test_fallback_models_serve_the_tab_when_the_preferred_ones_are_missing(tmp_path):
    add_taxfree(tmp_path, alternative=-1)
    registry = load_registry(tmp_path)
    assert taxfree in available_tabs(registry)
    pipeline = TaxFreePipeline.from_pretrained(runtime=Runtime("cpu", registry=registry))
    assert pipeline.model_names == {variant: names[-1] for variant, names in VARIANTS.items()}
    note = preview_note(registry, {names[0]: registry.first_available(names) for names in VARIANTS.values()})
    assert "Preview models" in note and f"{VARIANTS['over-constrained'][-1]} (16 px)" in note
    assert preview_note(registry, {names[-1]: names[-1] for names in VARIANTS.values()}) is None


def test_copy_from_photo_fills_the_sliders(client):
    values = client.predict(handle_file(EXAMPLE_PHOTOS[0]), api_name="/taxfree_copy_from_photo")
    yaw, pitch, roll = values[:3]
    assert -40 <= yaw <= 40 and -25 <= pitch <= 25 and -20 <= roll <= 20
    detailed = values[3 + len(CURATED_EXPRESSIONS):3 + len(CURATED_EXPRESSIONS) + len(EXPRESSION_NAMES)]
    assert len(detailed) == len(EXPRESSION_NAMES) and all(0.0 <= v <= 1.0 for v in detailed)
    assert values[-1] is False  # random identity switched off: the photo's identity is kept


def test_reset_returns_the_average_face_after_a_copy(client, weights_dir):
    copied = list(client.predict(handle_file(EXAMPLE_PHOTOS[0]), api_name="/taxfree_copy_from_photo"))
    values = list(client.predict(api_name="/taxfree_reset"))
    assert len(values) == len(copied) and values != copied
    assert values[:3] == [0, 0, 0] and values[-1] is True  # frontal, random identity again
    curated = values[3:3 + len(CURATED_EXPRESSIONS)]
    detailed = values[3 + len(CURATED_EXPRESSIONS):3 + len(CURATED_EXPRESSIONS) + len(EXPRESSION_NAMES)]
    assert curated == [0] * len(CURATED_EXPRESSIONS)
    registry = load_registry(weights_dir)
    average = TaxFreePipeline.from_pretrained(runtime=Runtime("cpu", registry=registry)).average_controls()
    assert detailed == [average.expression[name] for name in EXPRESSION_NAMES]
    assert detailed[EXPRESSION_NAMES.index("eyeWide_L")] == 0.5  # the registered model's average, not zeros
    light = values[len(values) - 4:-1]  # the identity state is not returned to API clients; random identity is last
    assert light == [average.light_azimuth, average.light_elevation, average.light_intensity]


def test_bad_input_gets_clear_messages(client, tmp_path):
    with pytest.raises(Exception, match="(?i)maximum"):
        client.predict("tax-free", 5, True, *_face_values(yaw=90), api_name="/taxfree_generate")
    with pytest.raises(Exception, match="(?i)choices"):
        client.predict("unconstrained", 5, True, *_face_values(), api_name="/taxfree_generate")
    blank = tmp_path / "wall.png"
    Image.new("RGB", (300, 300), (90, 90, 90)).save(blank)
    with pytest.raises(Exception, match="(?i)no face"):
        client.predict(handle_file(str(blank)), api_name="/taxfree_copy_from_photo")


def test_bundled_generators_turn_the_head_with_the_yaw_slider(app_client):
    """The launched app on its bundled weights: both generators answer with images, the render and a GLB, and
    changing only the yaw slider (-25 -> +25 deg) turns the generated head that way: the issue asks for the
    direction, a margin of 2 deg keeps landmark jitter out (how far it turns is measured by `eval_taxfree`'s slider
    sweep, into the model cards). The landmark pose (`core.face.estimate_pose`) is the camera's look-at yaw, the
    3DMM yaw the head's rotation: they have opposite signs (r = -0.996 between the dataset's fitted 3DMM yaw and
    its landmark yaw)."""
    from training.eval_taxfree import landmark_measurements

    def landmark_yaw(path: str) -> float:
        image = Image.open(path).convert("RGB")
        size = max(128, image.width)  # detection needs the crops' size; the preview generators make 32 px
        return float(landmark_measurements(np.asarray(image.resize((size, size), Image.BICUBIC))[None])["pose"][0, 0])

    registry = Runtime("cpu").registry  # the bundled registry the app runs on
    average = average_controls(registry.load_config(registry.first_available(VARIANTS["tax-free"]))["conditioning"])
    light = (average.light_azimuth, average.light_elevation, average.light_intensity)  # the tab's starting values
    for seed in (0, 1, 2):
        measured = {}
        for yaw in (-25, 25):
            values = _face_values(yaw=yaw, detailed=average.expression, light=light)
            faces, condition, mesh, info = app_client.predict(BOTH, seed, True, *values, api_name="/taxfree_generate")
            assert [item["caption"] for item in faces] == list(VARIANTS)
            assert Image.open(condition).size == (256, 256) and len(trimesh.load(mesh, force="mesh").faces) > 0
            measured[yaw] = [landmark_yaw(item["image"]) for item in faces]
        for variant, before, after in zip(VARIANTS, measured[-25], measured[25]):
            assert before - after > 2, (seed, variant, before, after)  # NaN (no face found) fails too
