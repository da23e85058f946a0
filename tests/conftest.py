"""Test settings shared by every test: offline, no analytics, temporary Gradio and output files (removed at the
end of the run)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# One temporary folder for the whole run: a launched app reads GRADIO_TEMP_DIR on every request, so it must not
# change; the suite's own output files (`core.outputs`) go next to it.
RUN_TEMP = Path(tempfile.mkdtemp(prefix="face-suite-tests-"))
os.environ["GRADIO_TEMP_DIR"] = str(RUN_TEMP / "gradio")
os.environ["FACE_SUITE_OUTPUT_DIR"] = str(RUN_TEMP / "outputs")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
SHARED = REPO_ROOT.parent / "shared"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(RUN_TEMP, ignore_errors=True)


@pytest.fixture(scope="session")
def app_client(tmp_path_factory):
    """The launched app (CPU, bundled weights) and a gradio_client connected to it; one launch per session."""
    from gradio_client import Client

    from app import LAUNCH_OPTIONS, build_demo
    from core.runtime import Runtime

    demo = build_demo(Runtime("cpu")).queue(max_size=8)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **LAUNCH_OPTIONS)
    client = Client(url, download_files=str(tmp_path_factory.mktemp("downloads")), verbose=False)
    yield client
    client.close()
    demo.close()


@pytest.fixture(scope="module")
def all_tabs_url(tmp_path_factory):
    """The whole app launched on one temporary registry of tiny random models for every method tab (beauty through
    `tests.tiny_weights.patch_beauty`), so that all five method tabs and About show; yields its URL. Module-scoped:
    the beauty patch must not outlive the module that uses the app."""
    from app import LAUNCH_OPTIONS, build_demo
    from core.runtime import Runtime
    from tests.tiny_weights import all_tabs_registry, patch_beauty

    registry = all_tabs_registry(tmp_path_factory.mktemp("all-tabs-weights"))
    with pytest.MonkeyPatch.context() as patch:
        patch_beauty(patch)
        demo = build_demo(Runtime("cpu", registry=registry)).queue(max_size=8)
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **LAUNCH_OPTIONS)
        yield url
        demo.close()


@pytest.fixture(autouse=os.environ.get("FACE_SUITE_FP16_ON_CPU") == "1")
def fp16_on_cpu(monkeypatch):
    """fp16 blocks compute in float16 on CPU as they do on CUDA (all tests with FACE_SUITE_FP16_ON_CPU=1)."""
    from core.nets import stylegan2

    monkeypatch.setattr(stylegan2, "FP16_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
