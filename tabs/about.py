"""About tab: the methods, their papers, the weights in use and the device."""

from __future__ import annotations

from typing import Any

import gradio as gr

from core.methods import METHODS
from core.runtime import Runtime
from core.weights import weights_status

LICENCE_NOTE = (
    "**Research demo, non-commercial use only.** The bundled models are trained on face datasets licensed for "
    "non-commercial research (MEBeauty, CelebA), and the official checkpoints this suite can load carry "
    "non-commercial licences too. Every image and mesh it returns is synthetic and says so in its metadata."
)


def system_info(runtime: Runtime, available_tabs: set[str]) -> dict[str, Any]:
    """What the About tab shows, as one JSON object (also served as the `/system_info` API)."""
    return {
        "runtime": runtime.describe(),
        "methods": [
            {"key": m.key, "title": m.title, "paper": m.paper, "arxiv": m.paper_url,
             "tab": "available" if m.key in available_tabs else "not yet available (weights in training)"}
            for m in METHODS
        ],
        "weights": weights_status(runtime.registry),
    }


def _methods_markdown(available_tabs: set[str]) -> str:
    # The tab's state goes in the method's cell: a column of its own holding one word is squeezed by the table layout
    # until the word breaks ("availa-ble"; Gradio's prose tables wrap anywhere).
    lines = ["| Method | Paper |", "|---|---|"]
    for m in METHODS:
        status = "available" if m.key in available_tabs else "not yet available (weights in training)"
        lines.append(f"| **{m.title}**<br>{m.summary}<br>*Tab: {status}* | [{m.paper}]({m.paper_url}) "
                     f"(arXiv {m.arxiv}) |")
    return "\n".join(lines)


def create_tab(runtime: Runtime, available_tabs: set[str]) -> None:
    """Build the About tab's components inside the current `gr.Tab`."""
    gr.Markdown(LICENCE_NOTE)
    gr.Markdown("### Methods\n" + _methods_markdown(available_tabs))
    described = runtime.describe()
    gr.Markdown(
        f"### Runtime\nDevice **{described['device']}**, compute dtype **{described['dtype']}** "
        f"(float16 only on CUDA, float32 on CPU), torch {described['torch']}."
    )
    gr.Markdown("### Weights\nResolved in this order: bundled copy in `weights/`, converted copy in the local cache, "
                "local Hugging Face cache, installed Python package (converted at first use), Hub.")
    rows = weights_status(runtime.registry)
    columns = ["model", "source", "hub", "size", "checksums", "licence"]
    gr.Dataframe(
        value=[[row[c] for c in columns] for row in rows] or [["(none registered)", "", "", "", "", ""]],
        headers=columns,
        interactive=False,
        wrap=True,
    )
    with gr.Accordion("Details as JSON (also the `/system_info` API)", open=False):
        refresh = gr.Button("Refresh", size="sm")
        details = gr.JSON()
    refresh.click(
        lambda: system_info(runtime, available_tabs),
        outputs=details,
        api_name="system_info",
        concurrency_limit=None,
    )
