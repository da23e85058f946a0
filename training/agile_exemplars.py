"""Exemplar folders for AgileGAN3D styles, built procedurally from dataset crops (no artwork of people is stored).

    python -m training.agile_exemplars --data datasets/faces/faces128.npz --style toon --count 20 \
        --out runs/exemplars_toon

Picks `count` aligned crops of an archive split with a seeded permutation (so the 5-, 10- and 20-exemplar sets of
one seed are nested), runs each through a `training.style_filters` filter and writes them as PNGs plus a SOURCE.md
(origin and licence, read by `training.agilegan3d` for the model card). The crops are aligned already: pass
`--aligned` to `training.agilegan3d`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from training.agilegan3d import SOURCE_FILE
from training.style_filters import STYLE_FILTERS, stylize

DATA_LICENCE = ("derived from the project's face archive: MEBeauty (non-commercial research only) and CelebA"
                " (non-commercial research only, no redistribution); do not publish these images or ship them in a"
                " public repository")


def pick_samples(count: int, total: int, seed: int) -> np.ndarray:
    """`count` sample indices of a seeded permutation of `total`; smaller counts give prefixes of larger ones."""
    if count > total:
        raise ValueError(f"asked for {count} exemplars from {total} samples")
    return np.random.default_rng(seed).permutation(total)[:count]


def build_exemplars(archive, style: str, count: int, out: str | Path, seed: int = 0, origin: str = "") -> Path:
    """Write `count` `style`-filtered crops of `archive` (anything with `names`, `image(i)` and `len`) into `out`,
    with a SOURCE.md naming the crops, the filter and the licence."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    indices = pick_samples(count, len(archive), seed)
    for rank, index in enumerate(indices):
        Image.fromarray(stylize(archive.image(int(index)), style)).save(out / f"{rank:02d}_{style}.png")
    names = ", ".join(archive.names[int(i)] for i in indices)
    (out / SOURCE_FILE).write_text(
        f"Procedural `{style}` renderings (training/style_filters.py) of {count} aligned face crops {origin}"
        f" (seed {seed}): {names}.\nLicence: {DATA_LICENCE}.\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="face archive (training.data)")
    parser.add_argument("--split", default="val", help="archive split the crops come from")
    parser.add_argument("--style", required=True, choices=sorted(STYLE_FILTERS))
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from training.data.archive import load_archive

    archive = load_archive(args.data, split=args.split)
    out = build_exemplars(archive, args.style, args.count, args.out, args.seed,
                          origin=f"of `{Path(args.data).name}` split `{args.split}`")
    print(f"{args.count} {args.style} exemplars in {out}", flush=True)


if __name__ == "__main__":
    main()
