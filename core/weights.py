"""Weights registry: one entry per model, resolved bundled -> converted cache -> local HF cache -> installed package
(converted at first use) -> Hub, safetensors only, sha256-checked.

The registry lives in `weights/registry.json`. Each entry names the model, its Hub `repo_id` and full 40-character
`revision` (when it is published), the files with their sha256 and size, the licence, and the folder under
`weights/` holding a bundled copy (when there is one), and optionally `limitations`: what a user of the model should
expect it to get wrong, in a sentence or two (the tabs show it beside their preview-model note). A `derived_from`
entry names a file inside an installed Python package (with its sha256) and a converter in `CONVERTERS` that writes
the model's `outputs` from it into the cache folder (`cache_root() / <name>`); the model's other files come from its
bundled folder. This module imports neither torch nor gradio at import time, so `python -m core.weights list`
answers fast.

CLI:
    python -m core.weights list                      # where each model resolves, size, checksum state
    python -m core.weights convert NAME [NAME ...]   # convert derived models now (e.g. at image build time)
    python -m core.weights register weights/<dir> --name NAME --licence LICENCE [--repo-id ID --revision SHA]
        [--description TEXT] [--limitations TEXT]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
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
class DerivedSource:
    """A file inside an installed Python package from which `converter` derives the model's `outputs` files."""

    package: str
    version: str
    path: str
    sha256: str
    size: int
    converter: str
    outputs: tuple[str, ...]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


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

    @property
    def limitations(self) -> str:
        """What the model is known to get wrong ("" when the entry says nothing)."""
        return self.extra.get("limitations", "")

    def hub_filename(self, name: str) -> str:
        return f"{self.subfolder}/{name}" if self.subfolder else name

    @property
    def derived_from(self) -> DerivedSource | None:
        """The package file this model is converted from (registry key `derived_from`), if any."""
        item = self.extra.get("derived_from")
        if item is None:
            return None
        return DerivedSource(item["package"], item["version"], item["path"], item["sha256"], int(item["size"]),
                             item["converter"], tuple(item["outputs"]))


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files were found: `source` is 'bundled', 'converted', 'cache' or 'hub'."""

    entry: ModelEntry
    source: str
    paths: dict[str, Path]

    @property
    def directory(self) -> Path:
        """The one folder holding every file (a converted model's files lie in two: use `paths` there)."""
        folders = {path.parent for path in self.paths.values()}
        if len(folders) != 1:
            raise WeightsError(f"'{self.entry.name}' is split over {len(folders)} folders; load it by file name")
        return folders.pop()

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
_convert_lock = threading.Lock()


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


def cache_root() -> Path:
    """Where converted models are written: $FACE_SUITE_CACHE, else $XDG_CACHE_HOME/face-suite or ~/.cache/face-suite."""
    if os.environ.get("FACE_SUITE_CACHE"):
        return Path(os.environ["FACE_SUITE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "face-suite"


def package_file(source: DerivedSource) -> Path | None:
    """The source file inside the installed package (found from its metadata, never imported), or None."""
    try:
        distribution = importlib.metadata.distribution(source.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(distribution.locate_file(source.path))
    return path if path.is_file() else None


def _convert_dlib_resnet_v1(source: Path) -> dict[str, bytes]:
    """dlib's face-recognition ResNet `.dat` -> the identity network's float16 `model.safetensors`."""
    from safetensors.torch import save

    from core.dlib_model import convert_dlib_resnet

    return {"model.safetensors": save(convert_dlib_resnet(source))}


# converter name (registry `derived_from.converter`) -> function(source file) -> {output file name: bytes}
CONVERTERS: dict[str, Callable[[Path], dict[str, bytes]]] = {"dlib_resnet_v1": _convert_dlib_resnet_v1}


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file in the same folder and os.replace, so readers never see a partial file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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

    def _derived_paths(self, entry: ModelEntry) -> dict[str, Path]:
        """A derived model's files once converted: the converter's outputs in the cache folder, the rest bundled."""
        outputs = entry.derived_from.outputs
        converted, bundled = cache_root() / entry.name, self.weights_dir / (entry.bundled or entry.name)
        return {f.name: (converted if f.name in outputs else bundled) / f.name for f in entry.files}

    def _converted_paths(self, entry: ModelEntry) -> dict[str, Path] | None:
        if entry.derived_from is None:
            return None
        paths = self._derived_paths(entry)
        return paths if all(p.is_file() for p in paths.values()) else None

    def _convertible(self, entry: ModelEntry) -> bool:
        """The source package file is installed and the files the converter does not write are bundled."""
        derived = entry.derived_from
        if derived is None or package_file(derived) is None:
            return False
        paths = self._derived_paths(entry)
        return all(paths[f.name].is_file() for f in entry.files if f.name not in derived.outputs)

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
        """Where a model would come from without downloading or converting: ('bundled'|'converted'|'cache', paths),
        ('package'|'hub'|'missing', None)."""
        entry = self.entry(name)
        finders = (("bundled", self._bundled_paths), ("converted", self._converted_paths), ("cache", self._cached_paths))
        for source, finder in finders:
            paths = finder(entry)
            if paths is not None:
                return source, paths
        if self._convertible(entry):
            return "package", None
        return ("hub" if entry.repo_id and entry.revision else "missing"), None

    def is_available(self, name: str) -> bool:
        """Registered and resolvable: bundled, converted or cached, convertible from its installed package, or
        pinned on the Hub (which may still fail offline)."""
        return name in self._entries and self.locate(name)[0] != "missing"

    def first_available(self, names: Sequence[str]) -> str:
        """The first of `names` (alternatives, preferred first) that `is_available`; WeightsError when none is."""
        for name in names:
            if self.is_available(name):
                return name
        raise WeightsError(f"None of the models {', '.join(names)} is registered and available. Train and register "
                           "one (training/README.md) or pin it on the Hub.")

    def resolve(self, name: str, allow_download: bool = True) -> ResolvedModel:
        """Find a model's files (bundled, converted cache, HF cache, converted now from its package, Hub) and verify
        every checksum."""
        entry = self.entry(name)
        source, paths = self.locate(name)
        if source == "package":
            paths, source = self._convert(entry), "converted"
        elif paths is None:
            paths = self._download(entry, allow_download)
            source = "hub"
        for spec in entry.files:
            try:
                verify_file(paths[spec.name], spec)
            except WeightsChecksumError as error:
                if source != "converted" or spec.name not in entry.derived_from.outputs:
                    raise
                raise WeightsChecksumError(
                    f"{error} Once deleted, it is converted again from {entry.derived_from.requirement} "
                    f"(at next use, or now: python -m core.weights convert {name})."
                ) from None
        return ResolvedModel(entry, source, paths)

    def _convert(self, entry: ModelEntry) -> dict[str, Path]:
        """Check the installed package file against the registry, convert it and write the outputs atomically."""
        derived = entry.derived_from
        converter = CONVERTERS.get(derived.converter)
        if converter is None:
            raise WeightsError(
                f"'{entry.name}': unknown converter '{derived.converter}' in the registry "
                f"(known: {', '.join(sorted(CONVERTERS)) or 'none'})."
            )
        source = package_file(derived)
        try:
            verify_file(source, FileSpec(source.name, derived.sha256, derived.size))
        except WeightsChecksumError as error:
            raise WeightsChecksumError(
                f"{error} It is the source of '{entry.name}': reinstall the package "
                f"(pip install --force-reinstall {derived.requirement})."
            ) from None
        with _convert_lock:  # one conversion at a time; another thread may have finished it meanwhile
            paths = self._converted_paths(entry)
            if paths is not None:
                return paths
            outputs = converter(source)
            if set(outputs) != set(derived.outputs):
                raise WeightsError(f"converter '{derived.converter}' wrote {sorted(outputs)}, the registry expects "
                                   f"{sorted(derived.outputs)}")
            folder = cache_root() / entry.name
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for file_name, data in outputs.items():
                    _write_atomically(folder / file_name, data)
            except OSError as error:
                raise WeightsUnavailableError(
                    f"Could not write the converted weights of '{entry.name}' to {folder} ({error}). "
                    "Set FACE_SUITE_CACHE to a writable folder."
                ) from None
        return self._derived_paths(entry)

    def _download(self, entry: ModelEntry, allow_download: bool) -> dict[str, Path]:
        derived = entry.derived_from
        if not entry.repo_id and derived is not None and package_file(derived) is None:
            raise WeightsUnavailableError(
                f"Weights for '{entry.name}' are converted at first use from the Python package {derived.package}, "
                f"which is not installed (or lacks {derived.path}). Install it: pip install {derived.requirement}"
            )
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
    derived = item.get("derived_from")
    if derived is not None:
        required = {"package", "version", "path", "sha256", "size", "converter", "outputs"}
        if not isinstance(derived, dict) or not required <= set(derived) or not derived["outputs"]:
            raise WeightsError(f"registry entry '{item['name']}': derived_from needs {', '.join(sorted(required))}")
        if not set(derived["outputs"]) <= {f.name for f in files}:
            raise WeightsError(f"registry entry '{item['name']}': derived_from outputs must be registered files")
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


_SOURCE_LABELS = {"converted": "package (converted)", "package": "package (convertible)"}


def weights_status(registry: Registry) -> list[dict[str, str]]:
    """One row per model: name, where it resolves (bundled, package (converted), cache, package (convertible), hub,
    missing), Hub repo@revision, size, checksum state and licence. Nothing is downloaded or converted."""
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
            {"model": name, "source": _SOURCE_LABELS.get(source, source), "hub": hub, "size": _format_size(entry.size),
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
    if previous is not None and previous.derived_from is not None:  # keep the specs of outputs converted elsewhere
        present = {f.name for f in files}
        files += tuple(f for f in previous.files if f.name in previous.derived_from.outputs and f.name not in present)
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
            extra={**(previous.extra if previous else {}),
                   **({"limitations": args.limitations} if args.limitations is not None else {})},
        )
    )
    registry.save(Path(args.registry))
    print(f"registered {args.name}: {', '.join(f.name for f in files)}")
    return 0


def _convert_now(registry: Registry, names: list[str]) -> int:
    for name in names:
        started = time.monotonic()
        try:
            resolved = registry.resolve(name, allow_download=False)
        except WeightsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        where = ", ".join(str(path) for path in resolved.paths.values())
        print(f"{name}: {_SOURCE_LABELS.get(resolved.source, resolved.source)} in {time.monotonic() - started:.1f} s "
              f"({where})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="where each registered model resolves, its size and checksum state")
    conv = sub.add_parser("convert", help="convert models derived from an installed package now (verified)")
    conv.add_argument("names", nargs="+", metavar="NAME")
    conv.add_argument("--registry", default=str(REGISTRY_PATH))
    reg = sub.add_parser("register", help="add or update a bundled model folder (checksums computed)")
    reg.add_argument("folder")
    reg.add_argument("--name", required=True)
    reg.add_argument("--licence")
    reg.add_argument("--description")
    reg.add_argument("--limitations", help="what the model is known to get wrong (shown in the tabs)")
    reg.add_argument("--repo-id")
    reg.add_argument("--revision")
    reg.add_argument("--registry", default=str(REGISTRY_PATH))
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(Registry.load())
    if args.command == "convert":
        return _convert_now(Registry.load(Path(args.registry)), args.names)
    return _register(args)


if __name__ == "__main__":
    sys.exit(main())
