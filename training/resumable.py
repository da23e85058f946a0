"""Resumable training in short chunks: a wall-clock deadline and sharded safetensors checkpoints.

GPU work runs in commands of at most ~9.5 minutes whose files come back in pieces of at most 16 MiB, eight at a
time. So a checkpoint lives in one flat run folder: `state.json` (step, optimizer hyper-parameters, anything JSON,
and the names of its shards) plus `tensors-<token>-NNNNN.safetensors` shards of at most `max_shard_bytes` each.
Saving is atomic: new shards are written under fresh names, then `state.json` is replaced in one rename, then the
old shards are deleted; any other file in the run folder (logs, samples, caches) is left alone. Loading restores
modules, optimizers and RNG states, and `Deadline` tells the loop when to stop and save.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MAX_SHARD_BYTES = 15 * 2**20
STATE_FILE = "state.json"
LOG_FILE = "log.jsonl"  # one JSON record per logged step, beside the checkpoint


class Deadline:
    """Stop-the-loop signal: `expired()` turns true `reserve_s` seconds before `budget_s` has elapsed."""

    def __init__(self, budget_s: float, reserve_s: float = 30.0):
        if budget_s <= reserve_s:
            raise ValueError(f"budget_s ({budget_s}) must exceed reserve_s ({reserve_s})")
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.reserve_s = reserve_s

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.elapsed_s >= self.budget_s - self.reserve_s


def _flatten_optimizer(name: str, optimizer: torch.optim.Optimizer, moment_dtype: torch.dtype | None,
                       skip_state: tuple[str, ...]):
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if key in skip_state:
                continue
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                if moment_dtype is not None and value.is_floating_point():
                    value = value.to(moment_dtype)
                tensors[f"optim.{name}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value.item() if isinstance(value, torch.Tensor) else value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "skipped": list(skip_state)}


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > max_shard_bytes:
            raise ValueError(f"tensor {key} ({nbytes} bytes) is larger than a shard ({max_shard_bytes} bytes)")
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        size += nbytes
    return shards


def save_checkpoint(
    directory: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    extra: dict[str, Any] | None = None,
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    module_dtypes: dict[str, torch.dtype] | None = None,
    moment_dtype: torch.dtype | None = None,
    skip_state: tuple[str, ...] = (),
) -> Path:
    """Write a checkpoint into the run folder `directory`: every module's state dict, optimizer states, RNG states.

    `module_dtypes` stores chosen modules in another float dtype (e.g. an EMA copy in float16); `moment_dtype`
    stores optimizer moments compressed (e.g. bfloat16) to keep the checkpoint small; `skip_state` names
    per-parameter optimizer states not stored at all and restored as zeros (e.g. Adam's "exp_avg" with beta1 = 0,
    which the next step overwrites before reading it).
    """
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        dtype = (module_dtypes or {}).get(name)
        for key, value in module.state_dict().items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[f"module.{name}.{key}"] = value
    optimizer_meta = {}
    for name, optimizer in (optimizers or {}).items():
        optimizer_tensors, optimizer_meta[name] = _flatten_optimizer(name, optimizer, moment_dtype, skip_state)
        tensors.update(optimizer_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = rng

    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    shard_files = []
    for index, shard in enumerate(_shard(tensors, max_shard_bytes)):
        name = f"tensors-{token}-{index:05d}.safetensors"
        save_file(shard, str(directory / name))
        shard_files.append(name)
    state = {"step": step, "optimizers": optimizer_meta, "extra": extra or {}, "shard_files": shard_files,
             "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    partial = directory / (STATE_FILE + ".partial")
    partial.write_text(json.dumps(state, indent=1, default=float))
    os.replace(partial, directory / STATE_FILE)
    for old in directory.glob("tensors-*.safetensors"):
        if old.name not in shard_files:
            old.unlink()
    return directory


def load_checkpoint(
    directory: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> tuple[int, dict[str, Any]] | None:
    """Restore a checkpoint written by `save_checkpoint` into `modules`/`optimizers` (strictly; dtypes follow the
    live modules). Returns (step, extra), or None when `directory` holds no checkpoint."""
    directory = Path(directory)
    if not (directory / STATE_FILE).exists():
        return None
    state = json.loads((directory / STATE_FILE).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in state["shard_files"]:
        tensors.update(load_file(str(directory / name)))

    for name, module in modules.items():
        prefix = f"module.{name}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        reference = module.state_dict()
        module.load_state_dict({k: v.to(reference[k].dtype) if k in reference else v for k, v in own.items()})
    for name, optimizer in (optimizers or {}).items():
        meta = state["optimizers"][name]
        live_params = [p for group in optimizer.param_groups for p in group["params"]]
        restored: dict[int, dict[str, Any]] = {}
        prefix = f"optim.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, field = key[len(prefix):].split(".", 1)
                restored.setdefault(int(index), {})[field] = value.to(live_params[int(index)].dtype)
        for index, scalars in meta["scalars"].items():
            for field, value in scalars.items():
                restored.setdefault(int(index), {})[field] = torch.tensor(float(value))
        for index, param_state in restored.items():
            for field in meta.get("skipped", ()):
                param_state[field] = torch.zeros_like(live_params[index])
        optimizer.load_state_dict({"state": restored, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return state["step"], state["extra"]


def add_budget_options(parser, reserve_s: float = 45.0) -> None:
    """The chunked trainers' budget of one call on an argparse parser: --minutes, --reserve-s and --steps."""
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this call")
    parser.add_argument("--reserve-s", type=float, default=reserve_s, help="stop this long before the budget")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps in this call")


def stored_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run config a run folder's checkpoint keeps in `extra["config"]`, or None when it holds no checkpoint."""
    state_path = Path(run_dir) / STATE_FILE
    if not state_path.exists():
        return None
    return json.loads(state_path.read_text())["extra"]["config"]


def last_log_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The last record of the run folder's `log.jsonl`, or None when nothing was logged."""
    log = Path(run_dir) / LOG_FILE
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1]) if lines else None
