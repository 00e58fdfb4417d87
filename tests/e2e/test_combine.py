"""`lorakit combine`: adapters combined from their files alone, written in peft's format.

peft is the oracle for the files (they load in `PeftModel.from_pretrained`) and for cat's meaning (the
exact weighted sum of the inputs' deltas); bad input is one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from tests.helpers import make_tiny_llama, write_peft_adapter

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    write_peft_adapter(root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    write_peft_adapter(root / "b", 2, r=8, lora_alpha=32, target_modules=["v_proj", "o_proj"])
    write_peft_adapter(root / "c", 3, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return root


def deltas(directory) -> dict[str, torch.Tensor]:
    """Each adapted layer's scaling * B A, read back through peft."""
    model = peft.PeftModel.from_pretrained(make_tiny_llama(), str(directory))
    return {path: m.get_delta_weight("default").detach()
            for path, m in model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_cat_writes_a_peft_adapter_equal_to_the_weighted_sum(adapters, tmp_path, capsys) -> None:
    out = tmp_path / "mix"
    assert main(["combine", f"a={adapters / 'a'}:0.7", f"b={adapters / 'b'}:-0.3", "--method", "cat", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (12, 12, ["o_proj", "q_proj", "v_proj"])
    assert "r=12" in capsys.readouterr().out

    combined, first, second = deltas(out), deltas(adapters / "a"), deltas(adapters / "b")
    assert set(combined) == set(first) | set(second)
    for path, delta in combined.items():
        expected = 0.7 * first.get(path, 0) + -0.3 * second.get(path, 0)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)


def test_linear_matches_peft_on_the_model_and_warns_of_cross_terms(adapters, tmp_path, capsys) -> None:
    out = tmp_path / "lin"
    assert main(["combine", f"a={adapters / 'a'}:0.6", f"c={adapters / 'c'}:0.4", "--method", "linear", "-o", str(out)]) == 0
    assert "cross terms" in capsys.readouterr().out
    model = peft.PeftModel.from_pretrained(make_tiny_llama(), str(adapters / "a"), adapter_name="a")
    model.load_adapter(str(adapters / "c"), adapter_name="c")
    model.add_weighted_adapter(["a", "c"], [0.6, 0.4], "lin", combination_type="linear")
    combined = deltas(out)
    for path, m in model.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            torch.testing.assert_close(combined[path], m.get_delta_weight("lin").detach(), rtol=1e-5, atol=1e-6)


def test_svd_and_ties_write_the_expected_ranks(adapters, tmp_path) -> None:
    assert main(["combine", f"a={adapters / 'a'}:1", f"b={adapters / 'b'}:1", "--method", "svd", "--svd-rank", "6", "-o", str(tmp_path / "svd")]) == 0
    assert json.loads((tmp_path / "svd" / "adapter_config.json").read_text())["r"] == 6
    assert main(["combine", f"a={adapters / 'a'}:1", f"c={adapters / 'c'}:1", "--method", "dare_ties", "--density", "0.5", "-o", str(tmp_path / "dt")]) == 0
    assert json.loads((tmp_path / "dt" / "adapter_config.json").read_text())["r"] == 4
    deltas(tmp_path / "dt")  # loads in peft


def test_help_explains_linear_cross_terms_and_exact_cat(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["combine", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "cross terms B_i A_j" in text and "cat exact: sum_i w_i s_i B_i A_i" in text
    assert "Use cat to get exactly sum_i w_i (s_i B_i A_i)" in text


@pytest.mark.parametrize("make_args, message", [
    (lambda d: [f"a={d / 'a'}", f"c={d / 'c'}:0.5"], "is not NAME=DIR:WEIGHT"),
    (lambda d: [f"a={d / 'a'}:x", f"c={d / 'c'}:0.5"], "weight 'x'"),
    (lambda d: [f"a={d / 'nowhere'}:0.5", f"c={d / 'c'}:0.5"], "is not a directory"),
    (lambda d: [f"a={d / 'a'}:0.5", f"b={d / 'b'}:0.5", "--method", "linear"], "equal rank (a r=4, b r=8); use 'cat' (exact) or 'svd'"),
    (lambda d: [f"a={d / 'a'}:0.5", f"c={d / 'c'}:0.5", "--method", "ties"], "needs density"),
    (lambda d: [f"a={d / 'a'}:0.5", f"a={d / 'c'}:0.5"], "given twice"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(adapters, tmp_path, capsys, make_args, message) -> None:
    out = tmp_path / "never"
    assert main(["combine", *make_args(adapters), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("lorakit combine: error:")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(adapters, tmp_path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["combine", f"a={adapters / 'a'}:0.5", f"c={adapters / 'c'}:0.5", "-o", str(out)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_non_lora_tensors_are_refused(tmp_path, capsys) -> None:
    write_peft_adapter(tmp_path / "biased", 4, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    write_peft_adapter(tmp_path / "plain", 5, r=4, target_modules=["q_proj"])
    code = main(["combine", f"x={tmp_path / 'biased'}:0.5", f"y={tmp_path / 'plain'}:0.5", "-o", str(tmp_path / "out")])
    assert code == 2 and "not a LoRA factor" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
