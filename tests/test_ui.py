"""The app as a user sees it: headless Chromium opens every tab, checks it renders, and saves screenshots.

Two apps: the one this checkout launches (bundled weights: the tabs they serve, used like below, and About), and
the whole app on tiny random models for every method tab (`all_tabs_url` in conftest.py). In the latter each method tab
is used as a person would: open it, pick an example photo where the tab needs one (a seed elsewhere), press its
primary button, wait for the outputs, then check what shows: output images loaded, the GLB viewer (`gr.Model3D`) of
the 3D tabs open at its size and drawing the returned mesh (gradio-app/gradio#7632 reported it collapsed in a
non-first tab), and no error toast.

Needs Debian's `chromium` and the `playwright` package (its bundled driver, no browser download); skips otherwise.
Screenshots go to $UI_SCREENSHOT_DIR (default: the test's tmp dir) so a person can look at them.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EVENT_TIMEOUT_MS = 90_000
MIN_VIEWER_PX = 150  # the GLB viewers are 260-300 px high; #7632's collapsed viewer was a few pixels


def _screenshot_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("UI_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.goto(url, wait_until="load")  # a queue heartbeat stays open: no "networkidle"
    page.get_by_role("tab", name="About").wait_for()
    page.page_errors = page_errors
    return page


@pytest.fixture(scope="module")
def bundled_page(browser, app_client):
    """The app this checkout launches (bundled weights)."""
    page = _open_page(browser, app_client.src)
    yield page
    page.close()


def test_every_tab_renders(bundled_page, tmp_path):
    page = bundled_page
    out = _screenshot_dir(tmp_path)
    tabs = page.get_by_role("tab")
    names = [tabs.nth(i).inner_text().strip() for i in range(tabs.count())]
    assert names[-1] == "About"
    for name in names:
        page.get_by_role("tab", name=name).click()
        page.wait_for_timeout(500)
        panel = page.get_by_role("tabpanel").first
        assert panel.is_visible()
        box = panel.bounding_box()
        assert box and box["height"] > 100, f"tab {name!r} renders collapsed"
        page.screenshot(path=str(out / f"tab-{name.lower().replace(' ', '-')}.png"), full_page=True)
    assert page.get_by_text("non-commercial use only").first.is_visible()


# ---- every method tab, used ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TabCheck:
    """How a user drives one method tab and what they should then see (components named by their labels)."""

    name: str  # the tab's title
    act: Callable  # act(panel): set inputs the way a user would and press the primary button
    done_text: str  # text of the tab's notes once the event finished
    images: tuple[str, ...] = ()  # gr.Image outputs
    galleries: dict[str, int] = field(default_factory=dict)  # gr.Gallery outputs and their image counts
    viewers: tuple[str, ...] = ()  # gr.Model3D outputs
    also_visible: tuple[str, ...] = ()  # other labels that must show (tables, plots)


def _block(panel, label: str):
    """The component block whose label is exactly `label`."""
    labels = panel.page.locator("[data-testid=block-label], [data-testid=block-info]")
    return panel.locator("div.block").filter(has=labels.filter(has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")))


def _pick_example(panel, label: str = "Example photos (Unsplash, via MEBeauty): click one", photo: str = "Face photo",
                  index: int = 0) -> None:
    """Click an example thumbnail, then wait until the photo field holds it."""
    from tabs.common import EXAMPLE_PHOTOS

    strip = _block(panel, label)
    box, label_box = strip.bounding_box(), strip.locator("[data-testid=block-label]").first.bounding_box()
    thumbnails = strip.locator("img")
    assert thumbnails.count() == len(EXAMPLE_PHOTOS)
    for i in range(thumbnails.count()):  # all in view: none cut off at the side or under the strip's label
        image = thumbnails.nth(i).bounding_box()
        assert box["x"] - 1 <= image["x"] and image["x"] + image["width"] <= box["x"] + box["width"] + 1, i
        assert image["y"] >= label_box["y"] + label_box["height"] - 1 and image["height"] >= 40, i
    thumbnails.nth(index).click()
    _block(panel, photo).get_by_text(Path(EXAMPLE_PHOTOS[index]).stem[:12]).first.wait_for(timeout=15_000)


def _press(panel, button: str) -> None:
    panel.get_by_role("button", name=button, exact=True).click()


def _act_taxfree(panel) -> None:
    _press(panel, "Generate")


def _act_l2s(panel) -> None:
    _pick_example(panel)
    _press(panel, "Edit region")


def _act_stylize3d(panel) -> None:
    panel.get_by_label("seed", exact=True).check()  # the default source; a user may leave it as it is
    _press(panel, "Generate")


def _set_slider(panel, label: str, value: int) -> None:
    box = panel.get_by_label(f"number input for {label}")
    box.fill(str(value))
    box.press("Enter")


def _act_beauty(panel) -> None:
    from playwright.sync_api import expect

    panel.get_by_label("random face (seed)").check()
    expect(_block(panel, "Face photo")).to_be_hidden()  # a random face needs no photo
    _set_slider(panel, "Budget (CMA-ES generations)", 3)
    _set_slider(panel, "Candidates per generation", 4)
    _press(panel, "Optimize")


def _act_agile(panel) -> None:
    _pick_example(panel, photo="Portrait", index=2)
    _set_slider(panel, "Refinement steps (slower, closer)", 2)
    _press(panel, "Stylize")


TAB_CHECKS = (
    TabCheck("3DMM-conditioned faces", _act_taxfree, "Seed 0 on cpu",
             images=("3DMM condition (what the parameters ask for)",),
             galleries={"Generated (left: tax-free, right: over-constrained)": 2}, viewers=("3DMM mesh (GLB)",)),
    TabCheck("Region style editing", _act_l2s, "Edited hair",
             images=("Predicted region", "Autoencoder reconstruction"), galleries={"Edited": 4}),
    TabCheck("3D head stylization", _act_stylize3d, "seed 0 (ψ 0.7) on cpu",  # the default style: the first one here
             galleries={"Original": 5, "Stylized": 5}, viewers=("Stylized head (GLB)",),
             also_visible=("Original vs stylized",)),
    TabCheck("Beauty optimization", _act_beauty, "candidates scored in",
             images=("Input (aligned)", "GAN reconstruction", "Optimized"), also_visible=("Beauty score per generation",)),
    TabCheck("Few-shot 3D portraits", _act_agile, "photo encoded with",  # bundled and tiny styles alike
             images=("Input (aligned)", "3D inversion (frontal)"), galleries={"Stylized portrait": 5},
             viewers=("Stylized head (GLB)",)),
)


@pytest.fixture(scope="module")
def app_page(browser, all_tabs_url):
    page = _open_page(browser, all_tabs_url)
    yield page
    page.close()


def _loaded(image) -> bool:
    return image.evaluate("img => img.complete && img.naturalWidth > 0 && img.naturalHeight > 0")


def _drawn(canvas) -> bool:
    """Whether the middle of the canvas shows more than its clear colour (the mesh was loaded and drawn). Only the
    middle: the viewer's label and buttons lie over the canvas's top edge and would count as drawn."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("L"), dtype=np.float32)
    height, width = pixels.shape
    return float(pixels[height // 5:height * 4 // 5, width // 5:width * 4 // 5].std()) > 4.0


def _wait_until(condition: Callable[[], bool], page, timeout_ms: int) -> bool:
    for _ in range(timeout_ms // 250):
        if condition():
            return True
        page.wait_for_timeout(250)
    return condition()


def _bundled_checks() -> list[TabCheck]:
    """The checks of the method tabs that this checkout's bundled weights serve."""
    from core.methods import METHODS
    from core.weights import default_registry
    from tabs import available_tabs

    titles = {method.key: method.title for method in METHODS}
    shown = {titles[tab.KEY] for tab in available_tabs(default_registry())}
    return [check for check in TAB_CHECKS if check.name in shown]


@pytest.mark.parametrize("check", _bundled_checks(), ids=[_slug(check.name) for check in _bundled_checks()])
def test_bundled_tab_in_use(bundled_page, check, tmp_path):
    """The tabs the bundled weights serve, used the same way on the app this checkout launches. Defined before
    the tests of the all-tabs app: its fixture replaces the beauty pipeline while it lives."""
    _use_tab(bundled_page, check, _screenshot_dir(tmp_path) / f"bundled-{_slug(check.name)}.png")


def test_all_tabs_show(app_page):
    tabs = app_page.get_by_role("tab")
    names = [tabs.nth(i).inner_text().strip() for i in range(tabs.count())]
    assert names == [check.name for check in TAB_CHECKS] + ["About"]


@pytest.mark.parametrize("check", TAB_CHECKS, ids=[_slug(check.name) for check in TAB_CHECKS])
def test_method_tab_in_use(app_page, check, tmp_path):
    _use_tab(app_page, check, _screenshot_dir(tmp_path) / f"all-tabs-{_slug(check.name)}.png")


def _use_tab(page, check: TabCheck, screenshot: Path) -> None:
    """Drive one method tab as `check` says, check what shows, and save a screenshot."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name=check.name).click()
    panel = page.locator("[role=tabpanel]:visible")
    expect(panel).to_have_count(1)
    check.act(panel)
    expect(panel.get_by_text(check.done_text).first).to_be_visible(timeout=EVENT_TIMEOUT_MS)

    for label in check.images:
        image = _block(panel, label).locator("img")
        expect(image).to_be_visible()
        assert _wait_until(lambda: _loaded(image), page, 10_000), f"{label!r}: the image did not load"
    for label, count in check.galleries.items():
        images = _block(panel, label).locator("img")
        expect(images).to_have_count(count)
        for i in range(count):
            expect(images.nth(i)).to_be_visible()
            assert _wait_until(lambda: _loaded(images.nth(i)), page, 10_000), f"{label!r}: image {i} did not load"
    for label in check.viewers:  # the #7632 check, with the mesh the event returned
        block = _block(panel, label)
        expect(block.get_by_test_id("model3d-download-link")).to_have_attribute("href", re.compile(r"\.glb$"))
        canvas = block.locator("canvas")
        expect(canvas).to_have_count(1)
        canvas.scroll_into_view_if_needed()
        expect(canvas).to_be_visible()
        box = canvas.bounding_box()
        assert box and box["width"] >= MIN_VIEWER_PX and box["height"] >= MIN_VIEWER_PX, f"{label!r} collapsed: {box}"
        assert _wait_until(lambda: _drawn(canvas), page, 30_000), f"{label!r}: the returned mesh is not drawn"
    for label in check.also_visible:
        expect(panel.get_by_text(label, exact=True).first).to_be_visible()

    page.wait_for_timeout(300)  # let toasts of the event's end appear
    errors = page.locator(".toast-body.error")
    assert errors.count() == 0, f"error toast: {errors.first.inner_text()}"
    assert not page.page_errors, page.page_errors
    page.screenshot(path=str(screenshot), full_page=True)


def test_about_lists_every_method_available(app_page, tmp_path):
    app_page.get_by_role("tab", name="About").click()
    panel = app_page.locator("[role=tabpanel]:visible")
    assert panel.get_by_text("Tab: available", exact=True).count() == len(TAB_CHECKS)
    assert panel.get_by_text("not yet available").count() == 0
    app_page.screenshot(path=str(_screenshot_dir(tmp_path) / "all-tabs-about.png"), full_page=True)


def test_region_editing_mode_switch_shows_the_reference_and_sets_its_strength(app_page):
    """Reference mode shows the reference upload and sets the strength to 1 (the reference's own style); back in
    random style the upload hides and the strength returns to the visible-edit default."""
    from playwright.sync_api import expect

    from tabs.latents2semantics import DEFAULT_STRENGTH

    app_page.get_by_role("tab", name="Region style editing").click()
    panel = app_page.locator("[role=tabpanel]:visible")
    reference = _block(panel, "Reference photo (its style is copied)")
    strength = panel.get_by_label("number input for Strength")
    expect(reference).to_be_hidden()
    expect(strength).to_have_value(str(int(DEFAULT_STRENGTH["random style"])))
    for mode, visible in (("style from reference", True), ("random style", False)):
        panel.get_by_label(mode, exact=True).check()
        if visible:
            expect(reference).to_be_visible()
        else:
            expect(reference).to_be_hidden()
        expect(strength).to_have_value(str(int(DEFAULT_STRENGTH[mode])))
