"""Test settings shared by every test: offline, no analytics, temporary Gradio files."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def _gradio_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))


@pytest.fixture(scope="session")
def app_client(tmp_path_factory):
    """The launched app (CPU, bundled weights) and a gradio_client connected to it; one launch per session."""
    from gradio_client import Client

    from app import build_demo
    from core.runtime import Runtime

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio-app"))
    demo = build_demo(Runtime("cpu")).queue(max_size=8)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    client = Client(url, download_files=str(tmp_path_factory.mktemp("downloads")), verbose=False)
    yield client
    client.close()
    demo.close()
