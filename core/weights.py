"""Weights registry: one entry per model, resolved bundled -> local HF cache -> Hub, safetensors only, sha256-checked.

The registry lives in `weights/registry.json`. Each entry names the model, its Hub `repo_id` and full 40-character
`revision` (when it is published), the files with their sha256 and size, the licence, and the folder under
`weights/` holding a bundled copy (when there is one). This module imports neither torch nor gradio at import time,
so `python -m core.weights list` answers fast.

CLI:
    python -m core.weights list                      # where each model resolves, size, checksum state
    python -m core.weights register weights/<dir> --name NAME --licence LICENCE [--repo-id ID --revision SHA]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = REPO_ROOT / "weights"
REGISTRY_PATH = WEIGHTS_DIR / "registry.json"
HUB_PROBE_TIMEOUT_S = 0.5
_REVISION_RE = re.compile(r"^[0-9a-f]{40}$")


class WeightsError(RuntimeError):
    """Base class of weight-resolution errors; messages are meant for end users."""


class WeightsUnavailableError(WeightsError):
    """The files are neither bundled nor cached, and the Hub cannot be used."""


class WeightsChecksumError(WeightsError):
    """A file's sha256 differs from the registry: the file is refused."""


@dataclass(frozen=True)
class FileSpec:
    """One file of a model: name inside the model folder, sha256 and size in bytes."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelEntry:
    """A registered model."""

    name: str
    description: str
    licence: str
    files: tuple[FileSpec, ...]
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    bundled: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def hub_filename(self, name: str) -> str:
        return f"{self.subfolder}/{name}" if self.subfolder else name


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files were found: `source` is 'bundled', 'cache' or 'hub'."""

    entry: ModelEntry
    source: str
    paths: dict[str, Path]

    @property
    def directory(self) -> Path:
        return next(iter(self.paths.values())).parent

    def path(self, name: str) -> Path:
        return self.paths[name]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_verified: dict[tuple[str, int, int], str] = {}


def verify_file(path: Path, spec: FileSpec) -> None:
    """Raise WeightsChecksumError unless `path` has the registered size and sha256 (memoised per size/mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    actual = _verified.get(key)
    if actual is None:
        actual = sha256_of(path) if stat.st_size == spec.size else f"size {stat.st_size}"
        _verified[key] = actual
    if actual != spec.sha256:
        raise WeightsChecksumError(
            f"{path} does not match the registry (expected sha256 {spec.sha256[:12]}…, {spec.size} bytes; "
            f"got {actual[:12] if len(actual) == 64 else actual}). The file was refused: delete it and fetch it again."
        )


def hub_offline() -> bool:
    """True when Hub downloads are disabled (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to the Hub endpoint within `timeout_s`; avoids hf_hub_download's multi-second retry loop."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class Registry:
    """The set of registered models and their resolution."""

    def __init__(self, entries: list[ModelEntry], weights_dir: Path = WEIGHTS_DIR):
        self.weights_dir = weights_dir
        self._entries = {entry.name: entry for entry in entries}

    @classmethod
    def load(cls, path: Path = REGISTRY_PATH) -> "Registry":
        """Read a registry JSON file (an empty registry when the file does not exist)."""
        if not path.exists():
            return cls([], path.parent)
        data = json.loads(path.read_text())
        return cls([_entry_from_json(item) for item in data.get("models", [])], path.parent)

    def save(self, path: Path | None = None) -> None:
        path = path or self.weights_dir / "registry.json"
        models = [_entry_to_json(e) for e in sorted(self._entries.values(), key=lambda e: e.name)]
        path.write_text(json.dumps({"models": models}, indent=2) + "\n")

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise WeightsError(f"Unknown model '{name}'. Registered models: {', '.join(self.names) or 'none'}.") from None

    def add(self, entry: ModelEntry) -> None:
        self._entries[entry.name] = entry

    def _bundled_paths(self, entry: ModelEntry) -> dict[str, Path] | None:
        if not entry.bundled:
            return None
        folder = self.weights_dir / entry.bundled
        paths = {f.name: folder / f.name for f in entry.files}
        return paths if all(p.is_file() for p in paths.values()) else None

    def _cached_paths(self, entry: ModelEntry) -> dict[str, Path] | None:
        if not entry.repo_id:
            return None
        from huggingface_hub import try_to_load_from_cache

        paths = {}
        for spec in entry.files:
            found = try_to_load_from_cache(entry.repo_id, entry.hub_filename(spec.name), revision=entry.revision)
            if not isinstance(found, str):
                return None
            paths[spec.name] = Path(found)
        return paths

    def locate(self, name: str) -> tuple[str, dict[str, Path] | None]:
        """Where a model would come from without downloading: ('bundled'|'cache', paths), ('hub'|'missing', None)."""
        entry = self.entry(name)
        for source, finder in (("bundled", self._bundled_paths), ("cache", self._cached_paths)):
            paths = finder(entry)
            if paths is not None:
                return source, paths
        return ("hub" if entry.repo_id and entry.revision else "missing"), None

    def resolve(self, name: str, allow_download: bool = True) -> ResolvedModel:
        """Find a model's files (bundled, then HF cache, then Hub) and verify every checksum."""
        entry = self.entry(name)
        source, paths = self.locate(name)
        if paths is None:
            paths = self._download(entry, allow_download)
            source = "hub"
        for spec in entry.files:
            verify_file(paths[spec.name], spec)
        return ResolvedModel(entry, source, paths)

    def _download(self, entry: ModelEntry, allow_download: bool) -> dict[str, Path]:
        if not entry.repo_id:
            raise WeightsUnavailableError(
                f"Weights for '{entry.name}' are not in {self.weights_dir / (entry.bundled or entry.name)} and the "
                "model is not published on the Hub. Restore the bundled files (git checkout weights/) or retrain them."
            )
        if not entry.revision:
            raise WeightsUnavailableError(
                f"'{entry.name}' ({entry.repo_id}) has no pinned revision in the registry, so it is not downloaded. "
                "Pin a 40-character commit in weights/registry.json."
            )
        hint = (
            f"To use it, download it on a machine with Hub access and copy the HF cache here, e.g. "
            f"`hf download {entry.repo_id} --revision {entry.revision}`"
        )
        if not allow_download or hub_offline():
            raise WeightsUnavailableError(
                f"Weights for '{entry.name}' are not bundled or cached and Hub downloads are off (HF_HUB_OFFLINE). {hint}."
            )
        if not hub_reachable():
            raise WeightsUnavailableError(
                f"Weights for '{entry.name}' are not bundled or cached and the Hub is unreachable. {hint}."
            )
        from huggingface_hub import hf_hub_download

        return {
            spec.name: Path(hf_hub_download(entry.repo_id, entry.hub_filename(spec.name), revision=entry.revision))
            for spec in entry.files
        }

    def load_config(self, name: str) -> dict[str, Any]:
        """The model's `config.json` as a dict (verified)."""
        return json.loads(self.resolve(name).path("config.json").read_text())

    def load_state_dict(self, name: str, filename: str = "model.safetensors") -> dict:
        """The model's tensors (CPU, stored dtype) from its safetensors file (verified)."""
        from safetensors.torch import load_file

        return load_file(str(self.resolve(name).path(filename)), device="cpu")


def _entry_from_json(item: dict[str, Any]) -> ModelEntry:
    revision = item.get("revision")
    if revision is not None and not _REVISION_RE.match(revision):
        raise WeightsError(f"registry entry '{item['name']}': revision must be a full 40-character commit sha")
    files = tuple(FileSpec(name, spec["sha256"], int(spec["size"])) for name, spec in item["files"].items())
    if any(not f.name.endswith((".safetensors", ".json", ".md", ".npz", ".txt")) for f in files):
        raise WeightsError(f"registry entry '{item['name']}': only safetensors/json/npz/text files may be registered")
    known = {"name", "description", "licence", "files", "repo_id", "revision", "subfolder", "bundled"}
    return ModelEntry(
        name=item["name"],
        description=item.get("description", ""),
        licence=item["licence"],
        files=files,
        repo_id=item.get("repo_id"),
        revision=revision,
        subfolder=item.get("subfolder"),
        bundled=item.get("bundled"),
        extra={k: v for k, v in item.items() if k not in known},
    )


def _entry_to_json(entry: ModelEntry) -> dict[str, Any]:
    item: dict[str, Any] = {"name": entry.name, "description": entry.description, "licence": entry.licence}
    for key in ("repo_id", "revision", "subfolder", "bundled"):
        if getattr(entry, key) is not None:
            item[key] = getattr(entry, key)
    item["files"] = {f.name: {"sha256": f.sha256, "size": f.size} for f in entry.files}
    item.update(entry.extra)
    return item


_default_registry: Registry | None = None


def default_registry() -> Registry:
    """The registry of this checkout (`weights/registry.json`), loaded once."""
    global _default_registry
    if _default_registry is None:
        _default_registry = Registry.load()
    return _default_registry


def _format_size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def weights_status(registry: Registry) -> list[dict[str, str]]:
    """One row per model: name, where it resolves (bundled/cache/hub/missing), Hub repo@revision, size,
    checksum state and licence. Nothing is downloaded."""
    rows = []
    for name in registry.names:
        entry = registry.entry(name)
        source, paths = registry.locate(name)
        state = "not checked"
        if paths is not None:
            try:
                for spec in entry.files:
                    verify_file(paths[spec.name], spec)
                state = "ok"
            except WeightsChecksumError:
                state = "MISMATCH (refused)"
        hub = f"{entry.repo_id}@{entry.revision[:12]}" if entry.repo_id and entry.revision else entry.repo_id or "-"
        rows.append(
            {"model": name, "source": source, "hub": hub, "size": _format_size(entry.size),
             "checksums": state, "licence": entry.licence}
        )
    return rows


def _list(registry: Registry) -> int:
    columns = ("model", "source", "hub", "size", "checksums", "licence")
    rows = [columns] + [tuple(row[c] for c in columns) for row in weights_status(registry)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _register(args: argparse.Namespace) -> int:
    folder = Path(args.folder).resolve()
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 2
    registry = Registry.load(Path(args.registry))
    files = tuple(
        FileSpec(p.name, sha256_of(p), p.stat().st_size)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in {".safetensors", ".json", ".npz"}
    )
    previous = registry._entries.get(args.name)
    registry.add(
        ModelEntry(
            name=args.name,
            description=args.description or (previous.description if previous else ""),
            licence=args.licence or (previous.licence if previous else "unknown"),
            files=files,
            repo_id=args.repo_id or (previous.repo_id if previous else None),
            revision=args.revision or (previous.revision if previous else None),
            subfolder=previous.subfolder if previous else None,
            bundled=str(folder.relative_to(registry.weights_dir.resolve())),
            extra=previous.extra if previous else {},
        )
    )
    registry.save(Path(args.registry))
    print(f"registered {args.name}: {', '.join(f.name for f in files)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="where each registered model resolves, its size and checksum state")
    reg = sub.add_parser("register", help="add or update a bundled model folder (checksums computed)")
    reg.add_argument("folder")
    reg.add_argument("--name", required=True)
    reg.add_argument("--licence")
    reg.add_argument("--description")
    reg.add_argument("--repo-id")
    reg.add_argument("--revision")
    reg.add_argument("--registry", default=str(REGISTRY_PATH))
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(Registry.load())
    return _register(args)


if __name__ == "__main__":
    sys.exit(main())
