"""Choose the torch device, with a sentence the user can read about what was chosen and why."""

from __future__ import annotations

from typing import Tuple, Union

import torch

_CPU_NOTE = "Fast mode is fine there, Full mode (diffusion sampling) is slow on the CPU"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _cuda_message(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"Using CUDA device {index} ({torch.cuda.get_device_name(index)})."


def select_device(name: Union[str, torch.device] = "auto") -> Tuple[torch.device, str]:
    """Return (device, message): `auto` picks cuda > mps > cpu; a named device must exist.

    An explicitly requested device that is missing is an error rather than a silent
    fallback, so a user who asked for the GPU never waits hours on the CPU unknowingly.
    """
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
            return device, _cuda_message(device)
        if _mps_available():
            return torch.device("mps"), "Using the Apple GPU (MPS); no CUDA device was found."
        return torch.device("cpu"), f"Using the CPU: no CUDA or MPS device was found; {_CPU_NOTE}."
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cpu":
        return device, f"Using the CPU as requested; {_CPU_NOTE}."
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was requested but torch reports no CUDA device; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"CUDA device {device.index} was requested but torch sees only "
                             f"{torch.cuda.device_count()} CUDA device(s); use --device cuda:0 or auto")
        return device, _cuda_message(device)
    if device.type == "mps":
        if not _mps_available():
            raise ValueError("MPS was requested but torch reports no Apple GPU; use --device cpu or auto")
        return device, "Using the Apple GPU (MPS) as requested."
    raise ValueError(f"unsupported device '{name}': use auto, cpu, cuda, cuda:N or mps")
