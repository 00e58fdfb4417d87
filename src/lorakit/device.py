"""Where a model runs: its device, bf16 autocast for that device type, batches moved there. Shared by
training and inference, and light to import (torch only)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live: batches go there, autocast runs for its device type."""
    return next(model.parameters()).device


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager:
    """bf16 autocast for the device's type (cpu, cuda, ...), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (a no-op where they already are); lists such as seq_lens stay."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
