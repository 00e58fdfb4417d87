"""estimate/compare.py + report.py: the three columns, checked against a real adapter and by hand."""

from __future__ import annotations

import pytest

from lorakit import LoraConfig, LorakitError, get_peft_model
from lorakit.estimate import estimate, human
from lorakit.estimate.constants import FRAMEWORK_BYTES


def test_lora_count_matches_the_real_adapter(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    result = estimate(tmp_path, r=4, target_modules=["q_proj", "v_proj", "down_proj"], seq_len=32, batch=2)
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert result.lora_params == trainable and result.total_params == total - trainable


def test_columns_add_up(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    result = estimate(tmp_path, r=4, seq_len=32, batch=2)
    full, lora, qlora = result.columns["full"], result.columns["lora"], result.columns["qlora"]
    assert full.optimizer == 8 * result.total_params and lora.optimizer == 2 * lora.saved_file
    assert qlora.checkpointing and not lora.checkpointing and qlora.weights < lora.weights
    for column in (full, lora, qlora):
        assert column.training_peak == FRAMEWORK_BYTES + column.weights + column.optimizer + max(column.activations, column.gradients)
        assert column.peak_bytes == max(column.training_peak, column.loading_peak)
    table = result.table()
    assert f"| trainable parameters | {result.total_params:,d} | {lora.trainable:,d} | {qlora.trainable:,d} |" in table


def test_unknown_allocator_is_refused(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    with pytest.raises(LorakitError, match="allocator must be one of glibc, mmap"):
        estimate(tmp_path, allocator="jemalloc")


def test_human_sizes():
    assert human(999) == "999 B" and human(1_500) == "1.50 KB" and human(2_000_000_000) == "2.00 GB"
