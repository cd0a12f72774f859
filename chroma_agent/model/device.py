"""Which device to run on, checked before anything is loaded or downloaded."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VALID_FORMS = "cpu, cuda, or cuda:N for the N-th GPU (e.g. cuda:0)"


class DeviceError(ValueError):
    """A device that does not exist on this machine, or is not a device at all."""


def check_device(device: "str | torch.device | None") -> "torch.device":
    """`device` as a torch.device that this machine has; None means CUDA when present,
    else the CPU. Raises `DeviceError` saying what to use instead."""
    if isinstance(device, str) and not re.fullmatch(r"(cpu|cuda)(:\d+)?", device):  # said without importing torch
        raise DeviceError(f"{device!r} is not a device chroma-agent runs on; use {VALID_FORMS}")
    import torch  # here, not at import time: the CLI checks the device only once the arguments parse

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise DeviceError(f"{str(resolved)!r} is not a device chroma-agent runs on; use {VALID_FORMS}")
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device was found"
        raise DeviceError(f"CUDA is not available on this machine ({why}); use --device cpu")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise DeviceError(f"there is no {resolved}: this machine has {count} CUDA device(s), "
                          f"cuda:0 to cuda:{count - 1}")
    return resolved
