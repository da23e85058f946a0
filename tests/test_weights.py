"""Weights registry: bundled / cache / offline miss / unreachable Hub / checksum mismatch / CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core import weights as W

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _make_model_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"width": 3}))


def _register(tmp_path: Path, *, repo_id: str | None = None, revision: str | None = None) -> W.Registry:
    weights_dir = tmp_path / "weights"
    _make_model_folder(weights_dir / "tiny")
    args = ["register", str(weights_dir / "tiny"), "--name", "tiny", "--licence", "MIT",
            "--registry", str(weights_dir / "registry.json")]
    if repo_id:
        args += ["--repo-id", repo_id, "--revision", revision]
    assert W.main(args) == 0
    return W.Registry.load(weights_dir / "registry.json")


def _fill_hf_cache(cache: Path, repo_id: str, revision: str, source: Path) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in ("model.safetensors", "config.json"):
        (snapshot / name).write_bytes((source / name).read_bytes())


def test_bundled_model_resolves_and_loads(tmp_path):
    registry = _register(tmp_path)
    resolved = registry.resolve("tiny")
    assert resolved.source == "bundled"
    assert registry.load_config("tiny") == {"width": 3}
    assert registry.load_state_dict("tiny")["w"].dtype == torch.float16


def test_checksum_mismatch_refuses_the_file(tmp_path):
    registry = _register(tmp_path)
    config = tmp_path / "weights" / "tiny" / "config.json"
    config.write_text(json.dumps({"width": 4}))  # same size, different content
    with pytest.raises(W.WeightsChecksumError, match="refused"):
        registry.load_config("tiny")


def test_hf_cache_is_used_when_not_bundled(tmp_path, monkeypatch):
    registry = _register(tmp_path, repo_id="org/tiny", revision=REVISION)
    cache = tmp_path / "hf-cache"
    _fill_hf_cache(cache, "org/tiny", REVISION, tmp_path / "weights" / "tiny")
    for f in (tmp_path / "weights" / "tiny").iterdir():
        f.unlink()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    resolved = registry.resolve("tiny")
    assert resolved.source == "cache"
    assert registry.load_config("tiny") == {"width": 3}


def test_offline_miss_is_answered_fast_with_an_actionable_message(tmp_path, monkeypatch):
    registry = _register(tmp_path, repo_id="org/tiny", revision=REVISION)
    for f in (tmp_path / "weights" / "tiny").iterdir():
        f.unlink()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(W.WeightsUnavailableError, match="hf download org/tiny"):
        registry.resolve("tiny")
    assert time.monotonic() - start < 1.0


def test_unreachable_hub_is_answered_fast(tmp_path, monkeypatch):
    registry = _register(tmp_path, repo_id="org/tiny", revision=REVISION)
    for f in (tmp_path / "weights" / "tiny").iterdir():
        f.unlink()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(W.WeightsUnavailableError, match="unreachable"):
        registry.resolve("tiny")
    assert time.monotonic() - start < 1.0


def test_unpublished_model_missing_locally_says_so(tmp_path):
    registry = _register(tmp_path)
    (tmp_path / "weights" / "tiny" / "model.safetensors").unlink()
    assert registry.locate("tiny") == ("missing", None)
    with pytest.raises(W.WeightsUnavailableError, match="not published"):
        registry.resolve("tiny")


def test_registry_rejects_short_revisions_and_pickles(tmp_path):
    base = {"name": "x", "licence": "MIT", "files": {"model.safetensors": {"sha256": "0" * 64, "size": 1}}}
    with pytest.raises(W.WeightsError, match="40-character"):
        W._entry_from_json({**base, "repo_id": "a/b", "revision": "abc123"})
    with pytest.raises(W.WeightsError, match="only safetensors"):
        W._entry_from_json({**base, "files": {"model.pkl": {"sha256": "0" * 64, "size": 1}}})


def test_unknown_model_lists_the_registered_ones(tmp_path):
    registry = _register(tmp_path)
    with pytest.raises(W.WeightsError, match="Registered models: tiny"):
        registry.entry("nope")


def test_list_cli_reports_every_model_offline():
    out = subprocess.run(
        [sys.executable, "-m", "core.weights", "list"], capture_output=True, text=True, check=True,
        cwd=W.REPO_ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    ).stdout
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["model", "source"]
    registered = W.Registry.load().names
    assert len(lines) == 1 + len(registered)
    for name, line in zip(registered, lines[1:]):
        assert line.startswith(name)
        assert "MISMATCH" not in line
