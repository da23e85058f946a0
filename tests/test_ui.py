"""The app as a user sees it: headless Chromium opens every tab, checks it renders, and saves screenshots.

Needs Debian's `chromium` and the `playwright` package (its bundled driver, no browser download); skips otherwise.
Screenshots go to $UI_SCREENSHOT_DIR (default: the test's tmp dir) so a person can look at them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(app_client):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_client.src, wait_until="networkidle")
        yield page
        browser.close()


def test_every_tab_renders(page, tmp_path):
    out = Path(os.environ.get("UI_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
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
