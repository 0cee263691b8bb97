"""Where torch trains: one reading of a ``device`` setting for every trainer in bc_fast.

The forms are ``"auto"`` (CUDA when torch sees a GPU, else the CPU), ``"cpu"``, ``"cuda"`` and
``"cuda:N"``. :func:`check_device_spec` checks the form without importing torch (configs call it
when they validate); :func:`resolve_device` imports torch and turns the setting into a
``torch.device``, refusing a GPU that torch does not see.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["DEVICE_FORMS", "check_device_spec", "describe_device", "resolve_device"]

#: The accepted forms, as error messages name them.
DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def check_device_spec(device: Any) -> str:
    """Return ``device`` if it has one of the accepted forms, else raise ValueError naming them."""
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda")
                                           or re.fullmatch(r"cuda:[0-9]+", device)):
        raise ValueError(f"device must be {DEVICE_FORMS}, got {device!r}")
    return device


def resolve_device(device: Any) -> Any:
    """The ``torch.device`` of a device setting ("auto" resolved), or a ValueError saying why not.

    ``device`` is one of the string forms or a CPU/CUDA ``torch.device``. "auto" is
    ``torch.device("cuda")`` when ``torch.cuda.is_available()``, else the CPU. A CUDA device
    that torch does not see (no GPU, or an index past the last one) is refused.
    """
    import torch

    if isinstance(device, torch.device) and device.type in ("cpu", "cuda"):
        device = "cpu" if device.type == "cpu" else str(device)
    d = check_device_spec(device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={d!r} but torch sees no CUDA GPU (torch {torch.__version__}); use "
                             "device='cpu' or 'auto' (the forms: " + DEVICE_FORMS + ")")
        count = torch.cuda.device_count()
        if ":" in d and int(d[5:]) >= count:
            raise ValueError(f"device={d!r} but torch sees {count} CUDA GPU(s), cuda:0..cuda:{count - 1}; use "
                             f"one of them, 'cuda', 'cpu' or 'auto'")
    return torch.device(d)


def describe_device(device: Any) -> str:
    """A short record of a torch device for logs and results: ``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return str(dev)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
