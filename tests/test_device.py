"""A model's device, bf16 autocast for its device type, and batches moved there (lists left alone)."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.device import autocast, model_device, to_device


def test_model_device_is_where_the_parameters_are():
    assert model_device(nn.Linear(3, 2)) == torch.device("cpu")
    assert model_device(nn.Sequential(nn.Linear(3, 2, device="meta"), nn.ReLU())) == torch.device("meta")


def test_bf16_autocast_runs_matmuls_in_bf16_on_cpu():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.device("cpu"), bf16=True):
        inside = a @ b
    assert inside.dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # only inside the block


def test_without_bf16_nothing_changes():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.device("cpu"), bf16=False):
        assert (a @ b).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")


def test_no_autocast_needs_no_accelerator():
    """bf16=False is a plain no-op for any device type, present on this machine or not."""
    with autocast(torch.device("cuda", 0), bf16=False):
        assert torch.ones(2).sum().item() == 2.0


def test_autocast_follows_the_device_type():
    with autocast(torch.device("cpu"), bf16=True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert not torch.is_autocast_enabled("cuda")


def test_to_device_moves_tensors_and_keeps_other_values():
    seq_lens = [[3, 4], [7]]
    batch = {"input_ids": torch.arange(6).view(2, 3), "labels": torch.ones(2, 3, dtype=torch.long), "seq_lens": seq_lens,
             "name": "row"}
    moved = to_device(batch, torch.device("meta"))
    assert moved.keys() == batch.keys()
    assert moved["input_ids"].device.type == moved["labels"].device.type == "meta"
    assert moved["input_ids"].shape == (2, 3) and moved["input_ids"].dtype == torch.long
    assert moved["seq_lens"] is seq_lens and moved["name"] == "row"
    assert batch["input_ids"].device.type == "cpu"  # the input batch is not changed in place


def test_to_device_is_a_no_op_where_tensors_already_are():
    batch = {"input_ids": torch.arange(4)}
    assert to_device(batch, torch.device("cpu"))["input_ids"] is batch["input_ids"]
