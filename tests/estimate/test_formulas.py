"""estimate/formulas.py: byte counts of the storage formats, the checkpoint and the head loss."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig

from lorakit.estimate.formulas import checkpoint_bytes_per_param, head_loss_bytes, int8_bytes, nf4_bytes, weights_by_format
from lorakit.train.loss import LOSS_CHUNK


def test_weight_formats_and_ratios():
    assert nf4_bytes(4096 * 4096) / (2 * 4096 * 4096) < 0.26  # 4 bits + 1/64 byte of scales + a few constants
    assert nf4_bytes(64, double_quant=False) == 32 + 4 + 64
    assert int8_bytes(torch.Size([8, 16])) == 8 * 16 + 4 * 8


def test_weights_by_format_keeps_the_rest_in_bf16():
    linear = nn.Linear(64, 32, bias=False, device="meta")
    formats = weights_by_format(64 * 32 + 100, [linear])
    assert formats["fp32"] == 4 * (64 * 32 + 100) and formats["bf16"] == 2 * (64 * 32 + 100)
    assert formats["int8"] == 200 + int8_bytes(linear.weight.shape)
    assert formats["nf4+dq"] == 200 + nf4_bytes(64 * 32)


def test_checkpoint_bytes_follow_config_dtype():
    assert checkpoint_bytes_per_param(LlamaConfig(dtype="bfloat16")) == 2
    assert checkpoint_bytes_per_param(LlamaConfig(dtype="float16")) == 2
    assert checkpoint_bytes_per_param(LlamaConfig(dtype="float32")) == 4
    assert checkpoint_bytes_per_param(LlamaConfig()) == 4  # unstated: fp32


def test_head_loss_counts_one_chunk_of_the_vocabulary():
    tokens, hidden, vocab = 4 * LOSS_CHUNK, 64, 1000
    assert head_loss_bytes(tokens, hidden, vocab) == 4 * tokens * hidden + LOSS_CHUNK * vocab * 8
    assert head_loss_bytes(10, hidden, vocab) == 4 * 10 * hidden + 10 * vocab * 8  # fewer tokens than a chunk
