"""Runtime shared by every tab: device/dtype policy, lazy LRU model cache, checked execution, GPU entry points.

Policy: CUDA runs float16 where a module says it is safe (float32 otherwise); CPU always runs float32. Every
generated tensor is checked with `isfinite`; on CUDA a non-finite float16 result is retried once in float32
before a clear error.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from core.weights import Registry, default_registry

T = TypeVar("T")
# The beauty tab alone uses 5 models (generator, encoder, identity, scorer, evaluator); the 3D tabs add their
# generator, photo encoder and one style (the identity network is shared): 8 keeps them all resident, so
# neither a call nor a switch between these tabs reloads weights (the bundled 128-px models are small).
DEFAULT_MAX_RESIDENT_MODELS = 8


class NonFiniteOutputError(RuntimeError):
    """A model produced NaN or Inf even in float32."""


def select_device(requested: str | None = None) -> torch.device:
    """`requested` (or env FACE_SUITE_DEVICE) when given, else CUDA when available, else CPU."""
    requested = requested or os.environ.get("FACE_SUITE_DEVICE") or None
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device '{requested}' was requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_for(device: torch.device, fp16_safe: bool = True) -> torch.dtype:
    """float16 on CUDA for modules that are safe in it, float32 everywhere else (always on CPU)."""
    return torch.float16 if device.type == "cuda" and fp16_safe else torch.float32


def all_finite(value: Any) -> bool:
    """True when every floating tensor inside `value` (tensor, dict, list, tuple, dataclass) is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return all(all_finite(getattr(value, name)) for name in value.__dataclass_fields__)
    return True


@dataclass(frozen=True)
class _CacheKey:
    name: str
    dtype: torch.dtype


class Runtime:
    """Device policy + model cache + checked execution. One instance per app process."""

    def __init__(
        self,
        device: str | torch.device | None = None,
        max_resident_models: int | None = None,
        registry: Registry | None = None,
    ):
        self.device = device if isinstance(device, torch.device) else select_device(device)
        limit = max_resident_models or int(os.environ.get("FACE_SUITE_MAX_MODELS", DEFAULT_MAX_RESIDENT_MODELS))
        if limit < 1:
            raise ValueError("max_resident_models must be at least 1")
        self.max_resident_models = limit
        self.registry = registry or default_registry()
        self._models: OrderedDict[_CacheKey, nn.Module] = OrderedDict()
        self._lock = threading.RLock()

    def dtype(self, fp16_safe: bool = True) -> torch.dtype:
        """The compute dtype for a module on this runtime's device."""
        return dtype_for(self.device, fp16_safe)

    @property
    def resident_models(self) -> list[str]:
        """Names of the models currently held, least recently used first."""
        return [key.name for key in self._models]

    def get_model(
        self,
        name: str,
        build: Callable[[dict[str, Any], dict[str, torch.Tensor]], nn.Module],
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """The registry model `name`, built on first use by `build(config, state_dict)`, in eval mode on the
        runtime's device and `dtype` (default: the float32/float16 policy), with gradients off. Least recently
        used models are evicted beyond `max_resident_models`."""
        dtype = dtype or self.dtype()
        key = _CacheKey(name, dtype)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            config = self.registry.load_config(name)
            state_dict = self.registry.load_state_dict(name)
            module = build(config, state_dict)
            module = module.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
            self._models[key] = module
            while len(self._models) > self.max_resident_models:
                self._models.popitem(last=False)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            return module

    def run(self, fn: Callable[[torch.dtype], T], *, fp16_safe: bool = True, what: str = "the model",
            grad: bool = False) -> T:
        """Call `fn(dtype)` under inference mode (unless `grad`) and check its output is finite.

        On CUDA with float16, a non-finite result is retried once with float32; a non-finite float32 result raises
        NonFiniteOutputError with a message for end users.
        """
        dtype = self.dtype(fp16_safe)
        result = self._call(fn, dtype, grad)
        if all_finite(result):
            return result
        if dtype != torch.float32:
            result = self._call(fn, torch.float32, grad)
            if all_finite(result):
                return result
        raise NonFiniteOutputError(
            f"{what} produced invalid values (NaN/Inf) on {self.device.type} in float32. "
            "Try another seed or input; if it persists the weights are damaged."
        )

    @staticmethod
    def _call(fn: Callable[[torch.dtype], T], dtype: torch.dtype, grad: bool) -> T:
        if grad:
            return fn(dtype)
        with torch.inference_mode():
            return fn(dtype)

    def describe(self) -> dict[str, str]:
        """Device, default dtype and library versions, for the About tab."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return {
            "device": f"{self.device} ({name})",
            "dtype": str(self.dtype()).replace("torch.", ""),
            "torch": torch.__version__,
            "threads": str(torch.get_num_threads()),
        }


def gpu(duration: int = 60) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """`spaces.GPU(duration=...)` for GPU entry points: allocates a ZeroGPU slice there, a no-op elsewhere."""
    import spaces

    return spaces.GPU(duration=duration)
