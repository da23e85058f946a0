"""The bundled-weights budget: the registered weights plus every planned model at its trainer's default config."""

from __future__ import annotations

import json

import torch

from core.weights import ModelEntry, Registry, default_registry
from training.weights_budget import BUDGET_MIB, budget_table, float16_export_bytes, planned_models


def test_default_configs_fit_the_bundled_weights_budget():
    table, total = budget_table(default_registry(), planned_models())
    assert total <= BUDGET_MIB, table


def test_export_size_is_the_float16_state_dict():
    module = torch.nn.Linear(100, 10)
    assert 2 * 1010 < float16_export_bytes(module) < 2 * 1010 + 400  # tensors + a small safetensors header


def test_registered_models_are_counted_once_and_derived_ones_not_at_all():
    plans = planned_models()
    base = plans[0]
    entries = [ModelEntry(base.name, "", "", (), bundled="x"),
               ModelEntry("converted-at-install", "", "", (), bundled="y", extra={"derived_from": {}})]
    table, total = budget_table(Registry(entries), plans)
    assert table.count(f"| {base.name} |") == 1 and "converted-at-install" not in table
    everything = sum(p.count * p.export_bytes for p in plans) / 2**20
    assert abs(total - (everything - base.export_bytes / 2**20)) < 1e-6


def test_previews_are_listed_but_left_out_of_the_planned_total():
    from core.pipelines.taxfree import VARIANTS

    planned, preview = VARIANTS["tax-free"][:2]
    plans = planned_models()
    _, without = budget_table(Registry([]), plans)
    table, total = budget_table(Registry([ModelEntry(preview, "", "", (), bundled="p")]), plans)
    assert f"| {preview} | preview, deleted for {planned} |" in table
    assert total == without


def test_styles_of_a_preview_are_listed_but_left_out_of_the_planned_total(tmp_path):
    from core.pipelines.head3d import MODEL_NAMES
    from core.weights import FileSpec

    (tmp_path / "style").mkdir()
    (tmp_path / "style" / "config.json").write_text(json.dumps({"kind": "style_delta", "base": MODEL_NAMES[-1]}))
    plans = planned_models()
    _, without = budget_table(Registry([]), plans)
    style = ModelEntry("agilegan3d-preview", "", "", (FileSpec("config.json", "", 2**20),), bundled="style")
    table, total = budget_table(Registry([style], tmp_path), plans)
    assert f"| agilegan3d-preview | style of the preview {MODEL_NAMES[-1]}, deleted with it |" in table
    assert total == without
