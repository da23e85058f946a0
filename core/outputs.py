"""Where the suite writes the files it returns (PNGs, GLBs): fresh folders under one root, pruned by age.

Gradio copies every returned file into its own cache (which `delete_cache` empties), so the suite's copy is needed
only until the event's response is built. Each new folder removes those of the root older than `MAX_AGE_S`, so a
long-running server does not fill its disk. The root is `$FACE_SUITE_OUTPUT_DIR`, by default
`<system temp>/face-suite-outputs`. Callers that want to keep their files pass their own folder to the pipelines.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

MAX_AGE_S = 3600.0


def output_root() -> Path:
    """The folder holding the suite's output folders (`$FACE_SUITE_OUTPUT_DIR` or a fixed one in the temp dir)."""
    return Path(os.environ.get("FACE_SUITE_OUTPUT_DIR") or Path(tempfile.gettempdir()) / "face-suite-outputs")


def prune_outputs(max_age_s: float = MAX_AGE_S, root: Path | None = None) -> int:
    """Remove output folders last modified more than `max_age_s` ago; returns how many went."""
    root = root or output_root()
    cutoff = time.time() - max_age_s
    removed = 0
    for entry in root.glob("*") if root.is_dir() else ():
        try:
            stale = entry.stat().st_mtime < cutoff
        except FileNotFoundError:  # removed by a concurrent request
            continue
        if not stale:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


def new_output_dir(prefix: str) -> Path:
    """A new empty folder for one request's files, named `<prefix>…`; stale folders are pruned first."""
    root = output_root()
    root.mkdir(parents=True, exist_ok=True)
    prune_outputs(root=root)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
