"""One notion of a device for the whole package: resolved to a concrete index once, where a run
starts, and compared by type and index everywhere.

``torch.device("cuda")`` has no index, and ``torch.device("cuda") != torch.device("cuda:0")``, while
every tensor moved with ``.to("cuda")`` reports ``cuda:0`` (or whichever device is current). So
comparing a requested device with a tensor's device fails unless both are made concrete first.
"""

from __future__ import annotations

import os

import torch

DeviceLike = str | torch.device


def concrete(device: DeviceLike) -> torch.device:
    """``device`` with its index filled in: the current device of its type when it has none
    (``cuda`` -> ``cuda:<torch.cuda.current_device()>``; 0 when no such device is visible)."""
    device = torch.device(device)
    if device.index is not None or device.type in ("cpu", "meta"):
        return device
    index = 0
    if device.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
    return torch.device(device.type, index)


def same(a: DeviceLike, b: DeviceLike) -> bool:
    """Whether a and b name the same device (type and index; a missing index is the current one)."""
    return concrete(a) == concrete(b)


def local_rank() -> int:
    """This process's rank on its node under torchrun (``LOCAL_RANK``), 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve(device: DeviceLike = "auto") -> torch.device:
    """The concrete device a run uses. ``"auto"``: CUDA when available, else the CPU. ``"cuda"`` with
    no index: this process's GPU under torchrun (``LOCAL_RANK``), else the current CUDA device.
    Raises ValueError naming the device when it does not exist."""
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r}: not a device name (cpu, cuda, cuda:N or auto)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is None:
            index = local_rank() if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
            if index >= count:
                raise ValueError(f"device 'cuda': local rank {index} has no GPU ({count} visible)")
            device = torch.device("cuda", index)
        elif device.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} CUDA device(s) are visible")
    return concrete(device)
