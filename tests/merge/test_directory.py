"""`merge_to_directory` (the `lorakit merge` pipeline) on an adapter trained on a quantized base:
dequantize, merge in fp32, write dense; re-quantize only when asked, and then say what it cost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorakit import load_model
from lorakit.errors import LorakitError
from lorakit.merge import merge_to_directory
from lorakit.quant.config import QuantConfig
from lorakit.quant.record import write_quant_record
from tests.quant.qhelpers import save_tiny_llama, train_quantized_adapter


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base dir, adapter dir): an all-linear adapter with non-trivial weights, trained 3 steps on nf4."""
    root = tmp_path_factory.mktemp("merge")
    base_dir = save_tiny_llama(root / "base")
    model = train_quantized_adapter(base_dir, "nf4", ["q_proj", "v_proj", "o_proj", "up_proj"], steps=3)
    model.save_pretrained(root / "adapter")
    write_quant_record(root / "adapter", QuantConfig("nf4"))
    return base_dir, root / "adapter"


def test_dense_merge_is_plain_bf16_and_loads_without_lorakit(trained, tmp_path):
    base_dir, adapter_dir = trained
    report = merge_to_directory(base_dir, adapter_dir, tmp_path / "merged")
    assert report.base.quantization == "nf4" and report.requantized is None
    assert report.error.max_abs < 0.1, report.lines()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})\n"
        "assert 'lorakit' not in sys.modules and 'bitsandbytes' not in sys.modules\n"
        "assert {p.dtype for p in m.parameters()} == {torch.bfloat16}, {p.dtype for p in m.parameters()}\n"
        "assert type(m.model.layers[0].mlp.down_proj) is torch.nn.Linear\n"
        "print(m(input_ids=torch.arange(8)[None]).logits.float().sum().item())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_requantized_merge_is_marked_quantized_and_costs_more(trained, tmp_path):
    base_dir, adapter_dir = trained
    dense = merge_to_directory(base_dir, adapter_dir, tmp_path / "dense", dtype="fp32")
    again = merge_to_directory(base_dir, adapter_dir, tmp_path / "nf4", requantize="nf4")
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert again.requantized.quantization == "nf4" and "re-quantizing to nf4" in again.lines()[1]
    assert dense.error.max_abs < again.error.max_abs and dense.error.mean_abs < again.error.mean_abs
    reloaded = load_model(tmp_path / "nf4")
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_bad_dtype_is_one_clear_error(trained, tmp_path):
    base_dir, adapter_dir = trained
    with pytest.raises(LorakitError, match="use bf16, fp16 or fp32"):
        merge_to_directory(base_dir, adapter_dir, tmp_path / "x", dtype="int4")
