"""Which torch device a run uses: `auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda`, `cuda:N`.

Every refusal is one line that says what to do: a CPU-only torch asked for CUDA gets the command that installs a
CUDA build; a CUDA torch without a visible GPU gets the driver check (`nvidia-smi -L`).
"""
from __future__ import annotations

import re

from moecli.errors import MoecliError

NAMES = "auto, cpu, cuda or cuda:N"
CUDA_BUILD_HINT = ("pip install --force-reinstall torch  (PyPI's Linux wheels are CUDA builds; other platforms: "
                   "https://pytorch.org/get-started/locally)")


def resolve_device(name: str | None = "auto") -> str:
    """The device to run on, checked: 'cpu' or 'cuda[:N]' (what torch.device accepts), never an internal error."""
    import torch

    text = (name or "auto").strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    m = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", text)
    if m is None:
        raise MoecliError(f"--device {name!r}: not a device; use {NAMES}")
    if torch.version.cuda is None:
        raise MoecliError(f"--device {name}: this torch ({torch.__version__}) is a CPU-only build; for a CUDA "
                          f"build: {CUDA_BUILD_HINT}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise MoecliError(f"--device {name}: torch {torch.__version__} sees no CUDA device (check the driver with "
                          f"`nvidia-smi -L`, and CUDA_VISIBLE_DEVICES)")
    index = int(m[1] or 0)
    if index >= count:
        raise MoecliError(f"--device {name}: this host has {count} CUDA device{'s' * (count != 1)} "
                          f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    return f"cuda:{index}" if m[1] is not None else "cuda"


def label(device) -> str:
    """How output names a torch device: 'GPU' for CUDA, else the type as torch spells it ('cpu')."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return "GPU" if kind == "cuda" else kind
