"""Weights registry: bundled / cache / offline miss / unreachable Hub / checksums / CLI / derived from a package."""

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


def test_first_available_prefers_the_first_resolvable_alternative(tmp_path):
    registry = _register(tmp_path)
    assert registry.is_available("tiny") and not registry.is_available("big")
    assert registry.first_available(("big", "tiny")) == "tiny"
    (tmp_path / "weights" / "tiny" / "model.safetensors").unlink()
    assert not registry.is_available("tiny")
    with pytest.raises(W.WeightsError, match="None of the models big, tiny"):
        registry.first_available(("big", "tiny"))


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


def _fake_converter(source: Path) -> dict[str, bytes]:
    """The test's converter: the source bytes as one uint8 tensor."""
    from safetensors.torch import save

    return {"model.safetensors": save({"w": torch.tensor(list(source.read_bytes()), dtype=torch.uint8)})}


def _derived_registry(tmp_path: Path, package: str = "face-suite-fake-models", converter: str = "fake") -> W.Registry:
    """A registry with one model derived from `fake_models/net.dat` of an installed package `package`."""
    source = tmp_path / "site" / "fake_models" / "net.dat"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"a tiny network file")
    weights_dir = tmp_path / "weights"
    (weights_dir / "derived").mkdir(parents=True)
    (weights_dir / "derived" / "config.json").write_text(json.dumps({"width": 3}))
    output = tmp_path / "expected.safetensors"
    output.write_bytes(_fake_converter(source)["model.safetensors"])
    entry = {
        "name": "derived", "licence": "CC0-1.0", "bundled": "derived",
        "files": {name: {"sha256": W.sha256_of(path), "size": path.stat().st_size}
                  for name, path in (("config.json", weights_dir / "derived" / "config.json"),
                                     ("model.safetensors", output))},
        "derived_from": {"package": package, "version": "1.0", "path": "fake_models/net.dat",
                         "sha256": W.sha256_of(source), "size": source.stat().st_size, "converter": converter,
                         "outputs": ["model.safetensors"]},
    }
    (weights_dir / "registry.json").write_text(json.dumps({"models": [entry]}))
    return W.Registry.load(weights_dir / "registry.json")


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed distribution `face-suite-fake-models` 1.0 (metadata only), a test converter, a temp cache root."""
    info = tmp_path / "site" / "face_suite_fake_models-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: face-suite-fake-models\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    calls = []
    monkeypatch.setitem(W.CONVERTERS, "fake", lambda source: calls.append(source) or _fake_converter(source))
    monkeypatch.setenv("FACE_SUITE_CACHE", str(tmp_path / "cache"))
    return calls


def test_derived_model_is_converted_once_into_the_cache_and_verified(tmp_path, fake_package):
    registry = _derived_registry(tmp_path)
    assert registry.locate("derived") == ("package", None)
    assert W.weights_status(registry)[0]["source"] == "package (convertible)"
    resolved = registry.resolve("derived")
    assert resolved.source == "converted"
    assert resolved.path("model.safetensors") == tmp_path / "cache" / "derived" / "model.safetensors"
    assert resolved.path("config.json") == tmp_path / "weights" / "derived" / "config.json"
    assert sorted(p.name for p in (tmp_path / "cache" / "derived").iterdir()) == ["model.safetensors"]  # no temp file
    assert registry.locate("derived")[0] == "converted"
    assert registry.load_state_dict("derived")["w"].tolist() == list(b"a tiny network file")
    assert len(fake_package) == 1  # later uses read the converted file
    row = W.weights_status(registry)[0]
    assert (row["source"], row["checksums"]) == ("package (converted)", "ok")
    with pytest.raises(W.WeightsError, match="split over 2 folders"):
        resolved.directory


def test_convert_cli_converts_ahead_of_first_use(tmp_path, fake_package, capsys):
    registry = _derived_registry(tmp_path)
    assert W.main(["convert", "derived", "--registry", str(tmp_path / "weights" / "registry.json")]) == 0
    assert "derived: package (converted)" in capsys.readouterr().out
    assert registry.locate("derived")[0] == "converted" and len(fake_package) == 1


def test_tampered_package_file_is_refused_and_nothing_is_written(tmp_path, fake_package):
    registry = _derived_registry(tmp_path)
    (tmp_path / "site" / "fake_models" / "net.dat").write_bytes(b"a tiny network fil!")  # same size
    with pytest.raises(W.WeightsChecksumError, match="pip install --force-reinstall face-suite-fake-models==1.0"):
        registry.resolve("derived")
    assert not fake_package and not (tmp_path / "cache").exists()


def test_tampered_converted_file_is_refused(tmp_path, fake_package):
    registry = _derived_registry(tmp_path)
    converted = registry.resolve("derived").path("model.safetensors")
    data = bytearray(converted.read_bytes())
    data[-1] ^= 1
    converted.write_bytes(bytes(data))
    with pytest.raises(W.WeightsChecksumError, match="converted again"):
        registry.resolve("derived")
    assert W.weights_status(registry)[0]["checksums"] == "MISMATCH (refused)"


def test_re_registering_a_derived_model_keeps_its_converted_outputs(tmp_path, fake_package):
    registry = _derived_registry(tmp_path)
    path = tmp_path / "weights" / "registry.json"
    assert W.main(["register", str(tmp_path / "weights" / "derived"), "--name", "derived", "--registry", str(path)]) == 0
    again = W.Registry.load(path).entry("derived")
    assert again == registry.entry("derived")


def test_missing_package_asks_for_pip_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FACE_SUITE_CACHE", str(tmp_path / "cache"))
    registry = _derived_registry(tmp_path, package="face-suite-absent-package")
    assert registry.locate("derived") == ("missing", None)
    with pytest.raises(W.WeightsUnavailableError, match="pip install face-suite-absent-package==1.0"):
        registry.resolve("derived")


def test_unknown_converter_is_a_clear_error(tmp_path, fake_package):
    registry = _derived_registry(tmp_path, converter="nope")
    with pytest.raises(W.WeightsError, match="unknown converter 'nope'"):
        registry.resolve("derived")


def test_cache_root_follows_face_suite_cache_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("FACE_SUITE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert W.cache_root() == tmp_path / "a"
    monkeypatch.delenv("FACE_SUITE_CACHE")
    assert W.cache_root() == tmp_path / "b" / "face-suite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert W.cache_root() == Path.home() / ".cache" / "face-suite"


def test_identity_resnet_converts_from_its_package_to_the_registered_file(tmp_path, monkeypatch):
    entry = W.default_registry().entry("identity-resnet")
    source = W.package_file(entry.derived_from)
    if source is None:
        pytest.skip(f"{entry.derived_from.requirement} is not installed")
    weights_dir = tmp_path / "weights"
    (weights_dir / entry.bundled).mkdir(parents=True)
    (weights_dir / entry.bundled / "config.json").write_bytes((W.WEIGHTS_DIR / entry.bundled / "config.json").read_bytes())
    monkeypatch.setenv("FACE_SUITE_CACHE", str(tmp_path / "cache"))
    registry = W.Registry([entry], weights_dir)
    assert registry.locate("identity-resnet") == ("package", None)
    resolved = registry.resolve("identity-resnet")  # verifies the registered sha256 of model.safetensors
    assert resolved.source == "converted"
    assert resolved.path("model.safetensors").parent == tmp_path / "cache" / "identity-resnet"


def test_register_keeps_limitations_until_replaced(tmp_path):
    registry = _register(tmp_path)
    assert registry.entry("tiny").limitations == ""
    path = tmp_path / "weights" / "registry.json"
    folder = str(tmp_path / "weights" / "tiny")
    assert W.main(["register", folder, "--name", "tiny", "--limitations", "Blurry.", "--registry", str(path)]) == 0
    assert W.main(["register", folder, "--name", "tiny", "--description", "new", "--registry", str(path)]) == 0
    entry = W.Registry.load(path).entry("tiny")
    assert entry.limitations == "Blurry." and entry.description == "new" and entry.licence == "MIT"
    assert json.loads(path.read_text())["models"][0]["limitations"] == "Blurry."
