"""The process a stage runs in: its device, threads and precision, each chosen once.

Precision is decided here and applied in one place: the stage passes :func:`amp_dtype`'s answer to the network it
trains (``net.amp_dtype``), whose forward is the only code that autocasts (:class:`scm.nn.UNet`).
"""

from __future__ import annotations

from typing import Any

import torch

from study.errors import StageError


def pick_device(requested: str = "auto") -> str:
    """The one place a device is chosen: ``auto`` means CUDA when present, else CPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"base.device={requested!r} but CUDA is not available on this machine (use 'auto' or 'cpu')")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise StageError(f"base.device={requested!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    return requested


def setup_torch(base: Any) -> str:
    """The one place a stage configures torch: threads (``base.threads``, 0 = torch's default), TF32 and the device.

    TF32 is off for matrix products and convolutions alike (PyTorch's own defaults differ between the two): float32
    means float32, and reduced precision is asked for explicitly with ``base.precision: bf16``.
    """
    if base.threads:
        torch.set_num_threads(base.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return pick_device(base.device)


def amp_dtype(precision: str, device: str) -> torch.dtype | None:
    """The one precision decision of the training stages: bf16 autocast on CUDA if asked; CPU always float32."""
    return torch.bfloat16 if precision == "bf16" and str(device).startswith("cuda") else None
