"""Source images of the training set: MEBeauty originals (crop fallback) and CelebA999, with scores and splits.

Splits
* MEBeauty has no person ids. Scored images keep the official file-level split `scores/{train,val,test}_2022.txt`
  (a path listed in several lists goes to the most held-out one: test > val > train; its score is the mean of its
  lines). Images in no 2022 list take their score from `scores/{train,test}_crop.csv` (another rating version; used
  only where the 2022 lists have none) and their split from a hash of the relative path.
* CelebA999 has no identities in this copy: the split is a hash of the file name.
* Hash split: the first 8 bytes of sha256(name) modulo 100: < 80 train, < 90 val, else test.
* Held out: photos byte-identical to an image in the `hold_out` folder (e.g. the test fixtures, which are MEBeauty
  originals) go to the test split whatever their source split.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

SPLITS = ("train", "val", "test")
SOURCES = ("mebeauty", "celeba999")
MEBEAUTY_CROP_DIR = Path("cropped_images") / "images_crop_align_mtcnn"
MEBEAUTY_ORIGINAL_DIR = Path("original_images")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class SourceImage:
    """One input photo: `name` is the unique id "<source>/<relative path>", `group` e.g. "female/asian" or "celeba"."""

    name: str
    path: Path
    source: str
    group: str
    split: str
    beauty: float | None
    from_crop: bool
    sha256: str


def hash_split(name: str) -> str:
    """Deterministic 80/10/10 split from a hash of `name`."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _images_under(directory: Path) -> dict[str, Path]:
    return {
        path.relative_to(directory).as_posix(): path
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    }


def _mebeauty_scores(root: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Scores and official splits keyed by path relative to the crop / original folders."""
    lines: dict[str, list[tuple[str, float]]] = {}
    prefix = "./" + MEBEAUTY_CROP_DIR.as_posix() + "/"
    for split in SPLITS:
        list_path = root / "scores" / f"{split}_2022.txt"
        if not list_path.is_file():
            continue
        for line in list_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            path, score = line.rsplit(" ", 1)
            lines.setdefault(path.removeprefix(prefix), []).append((split, float(score)))
    scores = {path: sum(score for _, score in entries) / len(entries) for path, entries in lines.items()}
    splits = {path: max((split for split, _ in entries), key=SPLITS.index) for path, entries in lines.items()}
    for split in ("train", "test"):
        csv_path = root / "scores" / f"{split}_crop.csv"
        if not csv_path.is_file():
            continue
        with csv_path.open(encoding="utf-8", newline="") as file:
            for row in csv.DictReader(file):
                path = row["image"].removeprefix(MEBEAUTY_CROP_DIR.as_posix() + "/")
                scores.setdefault(path, float(row["score"]))
    return scores, splits


def mebeauty_images(root: Path) -> list[SourceImage]:
    """MEBeauty originals (the MTCNN crop where an original is missing), sorted by relative path."""
    originals = _images_under(root / MEBEAUTY_ORIGINAL_DIR)
    crops = _images_under(root / MEBEAUTY_CROP_DIR)
    scores, splits = _mebeauty_scores(root)
    images = []
    for relative in sorted(set(originals) | set(crops)):
        path = originals.get(relative) or crops[relative]
        group = "/".join(relative.split("/")[:2])
        name = f"mebeauty/{relative}"
        images.append(
            SourceImage(
                name=name, path=path, source="mebeauty", group=group, split=splits.get(relative) or hash_split(name),
                beauty=scores.get(relative), from_crop=relative not in originals, sha256=_sha256(path),
            )
        )  # fmt: skip
    return images


def celeba_images(root: Path) -> list[SourceImage]:
    """CelebA999 aligned faces, sorted by file name."""
    return [
        SourceImage(
            name=f"celeba999/{relative}", path=path, source="celeba999", group="celeba", split=hash_split(relative),
            beauty=None, from_crop=False, sha256=_sha256(path),
        )
        for relative, path in _images_under(root).items()
    ]  # fmt: skip


def keep_priority(image: SourceImage) -> tuple:
    """Sort key choosing which copy of a duplicate to keep: scored first, the most held-out split, then by name."""
    return (image.beauty is None, -SPLITS.index(image.split), SOURCES.index(image.source), image.name)


def collect_images(
    shared_data: Path, limit: int | None = None, hold_out: Path | None = None
) -> tuple[list[SourceImage], list[tuple[str, str]]]:
    """All source images with byte-identical copies removed, and (name, reason) for each removed copy.

    `limit` keeps only the first images of each source (quick trial builds); photos byte-identical to an image under
    `hold_out` are put in the test split.
    """
    images = []
    for source, lister in (("mebeauty", mebeauty_images), ("celeba999", celeba_images)):
        found = lister(shared_data / source) if (shared_data / source).is_dir() else []
        images += found[:limit] if limit else found
    if hold_out is not None:
        held = {_sha256(path) for path in _images_under(Path(hold_out)).values()}
        images = [replace(image, split="test") if image.sha256 in held else image for image in images]
    kept: dict[str, SourceImage] = {}
    skipped = []
    for image in sorted(images, key=keep_priority):
        if image.sha256 in kept:
            skipped.append((image.name, f"byte-identical to {kept[image.sha256].name}"))
        else:
            kept[image.sha256] = image
    return sorted(kept.values(), key=lambda image: image.name), sorted(skipped)
