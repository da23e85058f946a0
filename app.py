"""Face-generation demo suite: one Gradio app, one tab per method, over the shared `core` runtime.

`python app.py` launches it; host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phone-home from offline machines

import gradio as gr  # noqa: E402

from core.methods import METHODS  # noqa: E402
from core.outputs import MAX_AGE_S as OUTPUT_MAX_AGE_S  # noqa: E402
from core.runtime import Runtime  # noqa: E402
from tabs import about, available_tabs  # noqa: E402
from tabs.common import EXAMPLES_DIR, MAX_UPLOAD_SIZE  # noqa: E402

TITLE = "Face generation demo suite"
DESCRIPTION = (
    "# Face generation demo suite\n"
    "Five research methods for generating and editing faces, in one place: 3DMM-controlled faces, "
    "region style editing, 3D head stylization, beauty optimization and few-shot 3D portraits. "
    "Models run in float16 on a GPU and float32 on a CPU. For research and qualitative checks only."
)
QUEUE_MAX_SIZE = int(os.environ.get("FACE_SUITE_QUEUE_SIZE", "20"))
# Example-photo strips (`tabs.common.example_photos`): every thumbnail in one row however narrow the column (Gradio's
# gallery cells are at least 100 px wide, so six overflowed a half-width column), below the strip's label. Multi-view
# galleries (`view-strip`) take the height of their rows of views instead of a fixed height.
CSS = """
.example-strip .grid-wrap { padding-top: var(--size-8) !important; overflow: hidden !important; }
.example-strip .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)) !important;
  grid-template-rows: none !important; grid-auto-rows: auto !important; gap: var(--spacing-sm) !important; }
.view-strip .grid-wrap { height: auto !important; min-height: 0 !important; max-height: none !important;
  padding-top: var(--size-8) !important; }
.view-strip .grid-container { grid-template-rows: none !important; grid-auto-rows: auto !important; }
.fit-image img { width: 100% !important; height: 100% !important; object-fit: contain; }
"""
# How the app is served; tests launch it with the same options.
LAUNCH_OPTIONS = {"max_file_size": MAX_UPLOAD_SIZE, "allowed_paths": [str(EXAMPLES_DIR)], "css": CSS}


def build_demo(runtime: Runtime) -> gr.Blocks:
    """The whole app: a description, then one tab per available method, then About."""
    titles = {m.key: m.title for m in METHODS}
    tabs = available_tabs(runtime.registry)
    with gr.Blocks(title=TITLE, delete_cache=(int(OUTPUT_MAX_AGE_S), int(OUTPUT_MAX_AGE_S))) as demo:
        gr.Markdown(DESCRIPTION)
        if runtime.device.type == "cpu":
            gr.Markdown("Running on CPU: generation takes seconds rather than milliseconds.")
        with gr.Tabs():
            for tab in tabs:
                with gr.Tab(titles[tab.KEY], id=tab.KEY):
                    tab.create_tab(runtime)
            with gr.Tab("About", id="about"):
                about.create_tab(runtime, {tab.KEY for tab in tabs})
    return demo


if __name__ == "__main__":
    build_demo(Runtime()).queue(max_size=QUEUE_MAX_SIZE).launch(**LAUNCH_OPTIONS)
