"""End to end: the launched app answers gradio_client, and the About tab reports methods, weights and device."""

from __future__ import annotations

from core.methods import METHODS
from core.weights import Registry


def test_system_info_over_the_api(app_client):
    info = app_client.predict(api_name="/system_info")
    assert info["runtime"]["device"].startswith("cpu")
    assert info["runtime"]["dtype"] == "float32"
    assert [m["arxiv"].rsplit("/", 1)[-1] for m in info["methods"]] == [m.arxiv for m in METHODS]
    assert [w["model"] for w in info["weights"]] == Registry.load().names
    assert all(w["checksums"] == "ok" for w in info["weights"] if w["source"] == "bundled")


def test_api_lists_the_public_endpoints(app_client):
    endpoints = app_client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/system_info" in endpoints
