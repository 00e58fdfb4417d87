"""peft-format adapter files: what is written, atomic saves, loads that refuse adapters that do not fit,
and damaged files: a one-line error naming the file and the fix, never a traceback from safetensors or
json; the model is left as it was."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from lorakit import LoraConfig, LorakitError, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.lora import peft_format
from lorakit.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter_weights
from tests.helpers import make_tiny_gpt2, make_tiny_llama, randomize_lora_b


ATOL = 1e-5
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def trained(seed: int = 1, model: nn.Module | None = None, **config) -> nn.Module:
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    wrapped = get_peft_model(model if model is not None else make_tiny_llama(), LoraConfig(**config))
    randomize_lora_b(wrapped, seed=seed)
    return wrapped


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_save_writes_peft_files(tmp_path: Path) -> None:
    trained().save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(tensors)[:2] == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    ]
    assert len(tensors) == 8 and tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]


def test_save_then_load_gives_the_same_logits(tmp_path: Path) -> None:
    model = trained()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), atol=ATOL, rtol=0)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path: Path) -> None:
    trained().save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert len(names) == 8 and all(".lora_" in n for n in names)
    frozen.set_adapter("default")  # peft's set_adapter makes the adapter trainable...
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == names
    frozen.set_adapter("default", inference_mode=True)  # ...unless told otherwise
    assert frozen.get_nb_trainable_parameters()[0] == 0


def test_atomic_save_keeps_the_old_adapter_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "adapter"
    trained(seed=1).save_pretrained(target)
    before = snapshot(target)

    def write_half_then_fail(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half a safetensors file")
        raise OSError("disk full")

    monkeypatch.setattr(peft_format, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        trained(seed=2).save_pretrained(target)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or retired directories left
    assert PeftModel.from_pretrained(make_tiny_llama(), target)  # still loads


def test_first_save_that_fails_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peft_format, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        trained().save_pretrained(tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_save_keeps_other_files_in_the_directory(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-1.txt").write_text("kept")
    trained().save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "checkpoints" / "step-1.txt").read_text() == "kept"


def test_named_adapters_are_saved_in_sub_directories(tmp_path: Path) -> None:
    model = trained()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    randomize_lora_b(model, seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "other" / "adapter_model.safetensors").is_file()
    model.save_pretrained(tmp_path, selected_adapters=["default"])  # re-saving default keeps "other"
    assert (tmp_path / "other" / "adapter_config.json").is_file()
    model.set_adapter("other")
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(logits(loaded), logits(model), atol=ATOL, rtol=0)


def test_load_adapter_adds_a_second_adapter(tmp_path: Path) -> None:
    first, second = trained(seed=1), trained(seed=2, target_modules=["o_proj"])
    second.save_pretrained(tmp_path)
    first.load_adapter(tmp_path, adapter_name="second")
    assert list(first.peft_config) == ["default", "second"] and first.active_adapter == "default"
    first.set_adapter("second")
    torch.testing.assert_close(logits(first), logits(second), atol=ATOL, rtol=0)


def assert_refused_and_unchanged(model: nn.Module, directory: Path, match: str, **kwargs) -> None:
    """Loading must fail with `match` and leave `model` exactly as it was, still usable."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = [(n, type(m).__name__) for n, m in model.named_modules()]
    expected = logits(model)
    with pytest.raises(LorakitError, match=match):
        if isinstance(model, PeftModel):
            model.load_adapter(directory, **kwargs)
        else:
            PeftModel.from_pretrained(model, directory, **kwargs)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == structure
    assert model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)


def test_load_refuses_wrong_shapes(tmp_path: Path) -> None:
    trained().save_pretrained(tmp_path)
    smaller = make_tiny_llama(hidden_size=32, intermediate_size=64)
    assert_refused_and_unchanged(
        smaller, tmp_path,
        r"adapter does not fit this base model: 8 tensors have the wrong shape \(e\.g\. model\.layers\.0\.self_attn\.q_proj"
        r"\.lora_A\.default\.weight is \(4, 64\) in the file but \(4, 32\) in the model\); load it on the base model it was trained on",
    )


def test_load_refuses_wrong_shapes_into_an_adapted_model(tmp_path: Path) -> None:
    trained().save_pretrained(tmp_path)
    adapted = trained(model=make_tiny_llama(hidden_size=32, intermediate_size=64), target_modules=["q_proj"])
    assert_refused_and_unchanged(adapted, tmp_path, "tensors have the wrong shape", adapter_name="extra")
    assert list(adapted.peft_config) == ["default"]


def test_load_refuses_module_names_the_model_lacks(tmp_path: Path) -> None:
    model = trained()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    assert_refused_and_unchanged(make_tiny_llama(), tmp_path, r"1 tensors name modules the base model lacks \(e\.g\. .*q_proj\.extra\.weight\)")


def test_load_refuses_a_file_with_missing_tensors(tmp_path: Path) -> None:
    trained().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    assert_refused_and_unchanged(make_tiny_llama(), tmp_path, r"1 adapter tensors are missing from the file \(e\.g\. .*layers\.1\.self_attn\.v_proj\.lora_B")


def test_load_refuses_an_adapter_whose_targets_the_model_lacks(tmp_path: Path) -> None:
    trained().save_pretrained(tmp_path)
    assert_refused_and_unchanged(make_tiny_gpt2(), tmp_path, r"target_modules \['q_proj', 'v_proj'\] match no module")


def test_missing_files_and_bad_json_are_explained(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="no adapter_config.json in"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LorakitError, match="is not valid JSON"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(LoraConfig(target_modules=["q_proj"]).to_peft_dict()))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LorakitError, match="never unpickles adapter_model.bin"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)


def test_gpt2_adapter_records_fan_in_fan_out(tmp_path: Path) -> None:
    trained(model=make_tiny_gpt2(), target_modules=["c_attn"]).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_bare_factors_round_trip_through_peft_keys(tmp_path: Path) -> None:
    factors = {"model.layers.0.self_attn.q_proj": (torch.randn(4, 64), torch.randn(64, 4))}
    tensors = peft_format.factors_state_dict(factors)
    assert sorted(tensors) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    back, others = peft_format.split_factors({**tensors, "base_model.model.lm_head.weight": torch.zeros(1)}, "the file")
    assert others == ["base_model.model.lm_head.weight"]
    assert all(torch.equal(x, y) for x, y in zip(back["model.layers.0.self_attn.q_proj"], factors["model.layers.0.self_attn.q_proj"]))
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    with pytest.raises(LorakitError, match="the file has only one of lora_A / lora_B for model.layers.0.self_attn.q_proj; re-save"):
        peft_format.split_factors(tensors, "the file")


def test_writing_files_can_replace_the_whole_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("old")
    tensors = peft_format.factors_state_dict({"model.layers.0.self_attn.q_proj": (torch.randn(4, 64), torch.randn(64, 4))})
    peft_format.write_adapter_files(tmp_path, LoraConfig(r=4, target_modules=["q_proj"]), tensors, keep_other_files=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert read_adapter_weights(tmp_path).keys() == tensors.keys()


# --- damaged files ---------------------------------------------------------------------------------
@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def overwrite(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("offset, data", [(0, b"\xff\xff\xff\x7f"), (12, b"\x00\x01\x02\x03"), (8, b"[[[[")],
                         ids=["header-length", "header-bytes", "header-json"])
def test_corrupted_weights_name_the_file_and_the_fix(adapter_dir: Path, offset: int, data: bytes) -> None:
    overwrite(adapter_dir / WEIGHTS_NAME, offset, data)
    with pytest.raises(LorakitError) as caught:
        read_adapter_weights(adapter_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{adapter_dir / WEIGHTS_NAME} is not a valid safetensors file" in message
    assert message.endswith("re-save or re-download the adapter")


def test_truncated_weights_are_refused_before_the_model_changes(adapter_dir: Path) -> None:
    path = adapter_dir / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-16])
    base = make_tiny_llama()
    names = [name for name, _ in base.named_modules()]
    with pytest.raises(LorakitError, match="is not a valid safetensors file"):
        PeftModel.from_pretrained(base, adapter_dir)
    assert [name for name, _ in base.named_modules()] == names


@pytest.mark.parametrize("text, expected", [("{\"r\": 4,", "is not valid JSON"), ("[1, 2]", "holds a JSON list"),
                                            ("\udcff", "is not valid JSON")])
def test_invalid_config_names_the_file_and_the_fix(adapter_dir: Path, text: str, expected: str) -> None:
    (adapter_dir / CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(LorakitError) as caught:
        PeftModel.from_pretrained(make_tiny_llama(), adapter_dir)
    message = str(caught.value)
    assert "\n" not in message and str(adapter_dir / CONFIG_NAME) in message and expected in message
    assert "re-save or re-download the adapter" in message


def test_missing_config_is_named(adapter_dir: Path) -> None:
    (adapter_dir / CONFIG_NAME).unlink()
    with pytest.raises(LorakitError, match=f"no {CONFIG_NAME} in "):
        PeftModel.from_pretrained(make_tiny_llama(), adapter_dir)


def save_tiny_model_with_tokenizer(directory: Path) -> Path:
    """The tiny Llama plus a word-level tokenizer, enough for `lorakit generate` to start."""
    make_tiny_llama().save_pretrained(directory)
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="</s>").save_pretrained(directory)
    return directory


def test_generate_with_a_corrupted_adapter_is_one_line(adapter_dir: Path, tmp_path: Path, capsys) -> None:
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "model")
    overwrite(adapter_dir / WEIGHTS_NAME, 0, b"\xff\xff\xff\x7f")
    capsys.readouterr()  # drop the progress bars of saving the model
    code = main(["generate", "--model", str(model_dir), "--adapter", str(adapter_dir), "--prompt", "hello",
                 "--max-new-tokens", "2", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lorakit generate: error: ") and f"{adapter_dir / WEIGHTS_NAME} is not a valid safetensors file" in err


# --- files that are not regular files: refused at once, never opened in a way that waits ------------
def outcome_within(seconds: float, call, fifo: Path | None = None) -> BaseException | None:
    """Run `call` in a thread and return what it raised; a call that blocks (opening a FIFO for reading
    waits for a writer) fails the test after `seconds` instead of hanging the suite."""
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            call()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    if thread.is_alive() and fifo is not None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer that closes at once: the reader sees EOF
        except OSError:  # no reader waiting in open()
            pass
    assert not thread.is_alive(), "the load blocked on a file that is not a regular file"
    return outcome.get("error")


def model_state(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return list(model.peft_config), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
@pytest.mark.parametrize("via_symlink", [False, True], ids=["fifo", "symlink-to-fifo"])
def test_a_fifo_in_place_of_an_adapter_file_is_refused_promptly(adapter_dir: Path, tmp_path: Path, name: str, via_symlink: bool) -> None:
    path = adapter_dir / name
    path.unlink()
    fifo = tmp_path / "elsewhere.fifo" if via_symlink else path
    os.mkfifo(fifo)
    if via_symlink:
        path.symlink_to(fifo)
    model = trained(seed=3)
    before = model_state(model)
    error = outcome_within(10, lambda: model.load_adapter(adapter_dir, adapter_name="extra"), fifo)
    assert isinstance(error, LorakitError)
    assert str(error) == f"{path} is not a regular file (a FIFO); replace it with the file save_pretrained wrote"
    names, state = model_state(model)
    assert names == before[0] == ["default"]
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], v) for k, v in before[1].items())


def test_a_fifo_swapped_in_after_the_check_is_refused_by_the_open_descriptor(adapter_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = adapter_dir / WEIGHTS_NAME
    path.unlink()
    os.mkfifo(path)
    regular = os.stat(adapter_dir / CONFIG_NAME)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if Path(p) == path else real_stat(p, *a, **k))  # the check saw a file
    error = outcome_within(10, lambda: read_adapter_weights(adapter_dir), path)
    assert isinstance(error, LorakitError) and f"{path} is not a regular file (a FIFO)" in str(error)


def test_a_directory_in_place_of_the_weights_is_named(adapter_dir: Path) -> None:
    (adapter_dir / WEIGHTS_NAME).unlink()
    (adapter_dir / WEIGHTS_NAME).mkdir()
    with pytest.raises(LorakitError, match=r"adapter_model\.safetensors is not a regular file \(a directory\); replace it"):
        read_adapter_weights(adapter_dir)


def test_symlinks_to_regular_files_are_followed(adapter_dir: Path, tmp_path: Path) -> None:
    expected = logits(PeftModel.from_pretrained(make_tiny_llama(), adapter_dir))
    store = tmp_path / "store"
    store.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (adapter_dir / name).rename(store / name)
        (adapter_dir / name).symlink_to(store / name)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(make_tiny_llama(), adapter_dir)), expected, atol=0, rtol=0)
