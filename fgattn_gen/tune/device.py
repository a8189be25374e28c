"""The device a tuning run measures on: one CUDA GPU, or Triton's CPU interpreter (``--interpret``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..backends import SPECS
from ..tuned import gpu_slug
from .options import BACKEND_CHOICES

INTERPRETER_SLUG = "interpret"


@dataclass(frozen=True)
class Device:
    """What tuning needs to know about the device.

    Attributes:
        slug: filename-safe name used in paths and study names (``"nvidia-h100-80gb-hbm3"``, ``"interpret"``).
        name: ``torch.cuda.get_device_name()`` or ``"triton-interpreter"``.
        sm: compute capability ``"9.0"``; None under the interpreter.
        n_sms: streaming multiprocessors; 0 under the interpreter.
        smem_limit: bytes of shared memory one block may opt in to; None (no limit) under the interpreter.
        l2_bytes: L2 cache size; 0 under the interpreter.
        torch_device: where the inputs live (``cuda:i`` or ``cpu``).
    """

    slug: str
    name: str
    sm: str | None
    n_sms: int
    smem_limit: int | None
    l2_bytes: int
    torch_device: torch.device

    @property
    def interpret(self) -> bool:
        return self.torch_device.type == "cpu"


def detect_device(interpret: bool) -> Device:
    """The interpreter, or the current CUDA device (raises RuntimeError when there is none)."""
    if interpret:
        return Device(INTERPRETER_SLUG, "triton-interpreter", None, 0, None, 0, torch.device("cpu"))
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU found")
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return Device(
        slug=gpu_slug(props.name), name=props.name, sm=f"{props.major}.{props.minor}",
        n_sms=props.multi_processor_count, smem_limit=props.shared_memory_per_block_optin,
        l2_bytes=props.L2_cache_size, torch_device=torch.device("cuda", index),
    )


def search_backends(choice: str, device: Device) -> tuple[str, ...]:
    """The kernel backends one tuning run searches (``--backend``): one backend by name; ``all`` is every
    backend; ``auto`` every backend that runs on this device (``BackendSpec.supports``), the CUDA kernel
    only where cuda-python's NVRTC imports."""
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {choice!r}")
    if choice in SPECS:
        return (choice,)
    if choice == "all":
        return tuple(SPECS)
    sm = None if device.interpret else tuple(int(x) for x in device.sm.split("."))
    has_nvrtc = importlib.util.find_spec("cuda") is not None
    return tuple(name for name, spec in SPECS.items() if spec.supports(sm) and (name != "cuda" or has_nvrtc))
