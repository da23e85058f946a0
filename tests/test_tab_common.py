"""Shared tab pieces: bad photo uploads get a clear validation message through the API, and the server stays up."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from core.face import prepare_face
from core.provenance import Provenance, read_png_provenance
from tabs.common import (FaceInputError, photo_input, raise_user_error, randomize_seed, require_photo,
                         save_pngs)


def _png_claiming(width: int, height: int, path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    def face_size(path):
        require_photo(path)
        try:
            return list(prepare_face(path).image.shape)
        except FaceInputError as error:
            raise_user_error(error)

    with gr.Blocks() as demo:
        photo = photo_input()
        out = gr.JSON()
        gr.Button().click(face_size, photo, out, api_name="face_size")
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, max_file_size="25mb")
    yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))
    demo.close()


def test_bad_uploads_get_clear_messages_and_the_server_stays_up(client, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bomb = _png_claiming(20000, 20000, tmp_path / "huge.png")
    tiny = _png_claiming(1, 1, tmp_path / "tiny.png")
    for path, expected in ((text, "not an image|could not|cannot"), (bomb, "too large|megapixel"),
                           (tiny, "too small")):
        with pytest.raises(Exception, match=f"(?i){expected}"):
            client.predict(handle_file(str(path)), api_name="/face_size")
    face = next((Path(__file__).parent / "fixtures" / "faces").glob("*.jpg"))
    assert client.predict(handle_file(str(face)), api_name="/face_size")[:2] == [256, 256]


def test_no_face_is_a_user_error_not_a_crash(client, tmp_path):
    from PIL import Image

    blank = tmp_path / "wall.png"
    Image.new("RGB", (300, 300), (120, 140, 160)).save(blank)
    with pytest.raises(AppError, match="(?i)no face"):
        client.predict(handle_file(str(blank)), api_name="/face_size")


def test_seed_randomization():
    assert randomize_seed(5, False) == 5
    assert randomize_seed(-3, False) == 0
    assert 0 <= randomize_seed(5, True) <= 2**31 - 1


def test_saved_outputs_go_to_one_pruned_root_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("FACE_SUITE_OUTPUT_DIR", str(tmp_path))
    images = [np.full((8, 8, 3), value, np.uint8) for value in (0, 255)]

    paths = [Path(path) for path in save_pngs(images, Provenance("beauty", "model-x"), "view")]

    assert [path.name for path in paths] == ["view-0.png", "view-1.png"]
    assert paths[0].parent == paths[1].parent and paths[0].parent.parent == tmp_path
    assert read_png_provenance(paths[1])["model"] == "model-x"
