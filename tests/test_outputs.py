"""`core.outputs`: returned files go to fresh folders under one root, and stale folders are pruned."""

from __future__ import annotations

import os
import tempfile
import time

from core import outputs


def _age(path, seconds):
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_new_output_dir_is_fresh_and_under_the_configured_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FACE_SUITE_OUTPUT_DIR", str(tmp_path / "root"))
    first, second = outputs.new_output_dir("head3d_"), outputs.new_output_dir("head3d_")

    assert first != second
    for folder in (first, second):
        assert folder.parent == tmp_path / "root" and folder.name.startswith("head3d_")
        assert folder.is_dir() and not any(folder.iterdir())


def test_new_output_dir_prunes_only_stale_entries(tmp_path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv("FACE_SUITE_OUTPUT_DIR", str(root))
    stale, recent = outputs.new_output_dir("a-"), outputs.new_output_dir("b-")
    (stale / "view.png").write_bytes(b"png")
    _age(stale, outputs.MAX_AGE_S + 60)
    stray = root / "stray.glb"
    stray.write_bytes(b"glb")
    _age(stray, outputs.MAX_AGE_S + 60)
    _age(recent, outputs.MAX_AGE_S - 60)

    fresh = outputs.new_output_dir("c-")

    assert sorted(path.name for path in root.iterdir()) == sorted([recent.name, fresh.name])


def test_prune_outputs_counts_and_tolerates_a_missing_root(tmp_path):
    assert outputs.prune_outputs(root=tmp_path / "absent") == 0
    for name in ("old-1", "old-2", "new"):
        (tmp_path / name).mkdir()
    _age(tmp_path / "old-1", 120)
    _age(tmp_path / "old-2", 120)

    assert outputs.prune_outputs(max_age_s=60, root=tmp_path) == 2
    assert [path.name for path in tmp_path.iterdir()] == ["new"]


def test_default_root_is_in_the_system_temp_folder(monkeypatch):
    monkeypatch.delenv("FACE_SUITE_OUTPUT_DIR")
    assert outputs.output_root().name == "face-suite-outputs"
    assert str(outputs.output_root().parent) == tempfile.gettempdir()
