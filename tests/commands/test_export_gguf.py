"""`lorakit export-gguf` and `lorakit merge --gguf` through the CLI, and their files run in llama.cpp.

The llama.cpp tests need llama.cpp's server and quantizer built (README, "GGUF out"): set
LORAKIT_LLAMA_CPP to the directory holding llama-server and llama-quantize, or put them on PATH.
They check that llama.cpp, given the exported adapter on a bf16 base (made with llama-quantize from
the default model's Q4_1 GGUF), decodes lorakit's 64 greedy tokens on the same weights, token for
token up to a near-tie where two bf16 runs may rightly part (check_same_or_tied)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import gguf
import pytest
import torch

from lorakit.cli import main
from lorakit.infer.engine import Engine
from lorakit.infer.sampling import SamplingParams
from tests.helpers import make_tiny_llama

NEW_TOKENS = 64
CHATS = ["What is the capital of France?", "Write a short poem about the sea.", "List three uses of a paperclip."]


def peft_adapter(directory, model, **config) -> None:
    import peft

    lora = peft.get_peft_model(model, peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    lora.save_pretrained(str(directory))


def test_export_gguf_writes_the_adapter_and_says_what_it_folded(tmp_path, capsys) -> None:
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    peft_adapter(tmp_path / "adapter", model, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])
    code = main(["export-gguf", str(tmp_path / "adapter"), "-o", str(tmp_path / "a.gguf"), "--base", str(tmp_path / "base")])
    out = capsys.readouterr().out
    assert code == 0 and "llama.cpp LoRA GGUF, llama, 4 weights, rank 4, alpha 8" in out and "folded into lora_b" in out
    assert gguf.GGUFReader(tmp_path / "a.gguf").fields["general.type"].contents() == "adapter"


def test_export_gguf_refuses_dora_with_exit_2_and_one_line(tmp_path, capsys) -> None:
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "base")
    peft_adapter(tmp_path / "adapter", model, r=4, use_dora=True, target_modules=["q_proj"])
    capsys.readouterr()  # transformers' save progress bar
    code = main(["export-gguf", str(tmp_path / "adapter"), "-o", str(tmp_path / "a.gguf"), "--base", str(tmp_path / "base")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorakit export-gguf: error: DoRA") and err.count("\n") == 1
    assert not (tmp_path / "a.gguf").exists()


def test_merge_gguf_refuses_requantize_too(tmp_path, capsys) -> None:
    code = main(["merge", str(tmp_path), "-o", str(tmp_path / "m.gguf"), "--model", "x", "--gguf", "bf16", "--requantize", "int8"])
    assert code == 2 and "--gguf and --requantize" in capsys.readouterr().err


# --- in llama.cpp -------------------------------------------------------------------------------

def llama_cpp_bin() -> Path | None:
    """The directory with llama-server and llama-quantize: $LORAKIT_LLAMA_CPP, else PATH."""
    named = os.environ.get("LORAKIT_LLAMA_CPP")
    if named:
        return Path(named)
    found = shutil.which("llama-server")
    return Path(found).parent if found and shutil.which("llama-quantize") else None


BIN = llama_cpp_bin()
needs_llama_cpp = pytest.mark.skipif(
    BIN is None or not (BIN / "llama-server").is_file() or not (BIN / "llama-quantize").is_file(),
    reason="llama.cpp is not built here: set LORAKIT_LLAMA_CPP to the directory holding llama-server and llama-quantize "
           "(README, 'GGUF out', says how to build them)",
)


class LlamaServer:
    """llama-server on a free local port, one slot, greedy completions from token ids."""

    def __init__(self, model: Path, loras: list[Path] = ()) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [str(BIN / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                   "-t", str(min(os.cpu_count() or 1, 2)), "-np", "1", "-c", "2048", "--no-warmup",
                   "--no-repack"]  # its AMX repacking of quantized weights dies of SIGILL on some VMs
        for lora in loras:
            command += ["--lora", str(lora)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"llama-server did not start: {self.process.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def greedy(self, prompt: list[int], lora_scale: float | None = None) -> list[int]:
        body = {"prompt": prompt, "n_predict": NEW_TOKENS, "temperature": 0.0, "top_k": 1, "return_tokens": True,
                "cache_prompt": False, "seed": 0}
        if lora_scale is not None:
            body["lora"] = [{"id": 0, "scale": lora_scale}]
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as reply:
            return list(json.loads(reply.read())["tokens"])

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def lorakit_greedy(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """lorakit's engine, one request at a time, greedy (the EOS that ends a reply is not in token_ids)."""
    engine = Engine.from_model(model, tokenizer, max_batch=1, max_len=512)
    try:
        return [c.token_ids for c in engine.generate(prompts, ["a" if hasattr(model, "peft_config") else None] * len(prompts),
                                                     SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))]
    finally:
        engine.close(cancel=True)


def without_eos(tokens: list[int], tokenizer) -> list[int]:
    """llama.cpp's tokens end with the EOS that stopped them; lorakit's do not."""
    return tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_token_id else tokens


def check_same_or_tied(ours: list[list[int]], theirs: list[list[int]], prompts: list[list[int]], model, what: str) -> int:
    """Every reply equal token for token, except where two bf16 runs may rightly part: at a near-tie.

    Where lorakit's and llama.cpp's tokens first differ, lorakit's model (the same bf16 weights, in
    fp32) must score the two within TIE of each other; a lost or mis-scaled adapter parts them at a
    clear winner and fails. Returns how many replies were equal throughout."""
    same, parted = 0, []
    for prompt, a, b in zip(prompts, ours, theirs):
        if a == b:
            same += 1
            continue
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        assert at is not None, f"one reply is a prefix of the other ({len(a)} vs {len(b)} tokens): one stopped early"
        with torch.no_grad():
            logits = model(torch.tensor([prompt + a[:at]]), **adapter_kwargs(model)).logits[0, -1].float()
        gap = abs(logits[a[at]] - logits[b[at]]).item()
        parted.append(f"token {at} (logits {gap:.3f} apart)")
        assert gap < TIE, f"{what}: lorakit and llama.cpp part at token {at} of {len(a)} where lorakit's logits differ by {gap:.3f} (not a tie)"
    print(f"{what}: {same} of {len(prompts)} replies equal for all their tokens; the others part at near-ties: {', '.join(parted) or 'none'}")
    return same


# Two bf16 runs round activations differently through 30 layers, so tokens whose logits are within
# two bf16 steps at logits of 16-32 (0.125 each) may go either way; an adapter lost or mis-scaled
# changes the logits by far more than that where it parts.
TIE = 0.25


def adapter_kwargs(model) -> dict:
    return {"adapter_names": ["a"]} if hasattr(model, "peft_config") else {}


def chat_prompts(tokenizer) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)) for c in CHATS]


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    """The default model's Q4_1 GGUF turned into BF16 by llama.cpp's own llama-quantize."""
    from lorakit.models.default import gguf_path

    target = tmp_path_factory.mktemp("llama_cpp") / "base-bf16.gguf"
    subprocess.run([str(BIN / "llama-quantize"), "--allow-requantize", str(gguf_path()), str(target), "BF16"],
                   check=True, capture_output=True)
    return target


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> Path:
    """An rsLoRA adapter on every projection of the default model that changes its greedy replies."""
    from lorakit import LoraConfig, get_peft_model, load_model

    directory = tmp_path_factory.mktemp("llama_cpp") / "adapter"
    model = get_peft_model(load_model("default"), LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(str(directory))
    config = json.loads((directory / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"v_proj": 32, "layers.3.mlp.down_proj": 4}  # folded per module, as rsLoRA is
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def lorakit_model(adapter: Path | None, dtype=torch.bfloat16):
    from lorakit import load_model
    from lorakit.lora.model import LoraModel

    model = load_model("default", dtype=dtype)
    if adapter is None:
        return model
    wrapped = LoraModel.wrap(model)
    wrapped.load_adapter(adapter, "a")
    return wrapped


@pytest.mark.slow
@needs_llama_cpp
def test_an_exported_adapter_gives_lorakits_greedy_tokens_in_llama_cpp(tmp_path, bf16_base, trained_adapter, tokenizer) -> None:
    code = main(["export-gguf", str(trained_adapter), "-o", str(tmp_path / "a.gguf"), "--base", "default"])
    assert code == 0
    prompts = chat_prompts(tokenizer)
    ours = lorakit_greedy(lorakit_model(trained_adapter), tokenizer, prompts)
    base = lorakit_greedy(lorakit_model(None), tokenizer, prompts)
    assert ours != base  # the adapter changes the replies, so a lost or mis-scaled adapter cannot pass
    server = LlamaServer(bf16_base, [tmp_path / "a.gguf"])
    try:
        theirs = [without_eos(server.greedy(p, lora_scale=1.0), tokenizer) for p in prompts]
        without = [without_eos(server.greedy(p, lora_scale=0.0), tokenizer) for p in prompts]
        # llama.cpp's own converter keeps lora_alpha alone: alpha / r instead of rsLoRA's alpha / sqrt(r)
        unfolded = [without_eos(server.greedy(p, lora_scale=math.sqrt(8) / 8), tokenizer) for p in prompts]
    finally:
        server.close()
    fp32 = lorakit_model(trained_adapter).to(torch.float32)
    same = check_same_or_tied(ours, theirs, prompts, fp32, "adapter")
    assert same >= 1, "no reply was the same throughout"
    # the scale matters to these replies (a near-tie check alone does not tell a mis-scale apart: at
    # alpha / r the replies also first part where lorakit's logits are < 0.25 apart)
    assert unfolded != theirs
    check_same_or_tied(base, without, prompts, lorakit_model(None).to(torch.float32), "base")  # llama.cpp's base is lorakit's too


@pytest.mark.slow
@needs_llama_cpp
def test_a_merged_gguf_gives_lorakits_greedy_tokens_in_llama_cpp(tmp_path, trained_adapter, tokenizer) -> None:
    from lorakit import load_model

    assert main(["merge", str(trained_adapter), "-o", str(tmp_path / "merged"), "--model", "default", "--dtype", "bf16"]) == 0
    assert main(["merge", str(trained_adapter), "-o", str(tmp_path / "m.gguf"), "--model", "default", "--gguf", "bf16"]) == 0
    prompts = chat_prompts(tokenizer)
    ours = lorakit_greedy(load_model(str(tmp_path / "merged"), dtype=torch.bfloat16), tokenizer, prompts)
    server = LlamaServer(tmp_path / "m.gguf")
    try:
        theirs = [without_eos(server.greedy(p), tokenizer) for p in prompts]
    finally:
        server.close()
    same = check_same_or_tied(ours, theirs, prompts, load_model(str(tmp_path / "merged"), dtype=torch.bfloat16).to(torch.float32), "merged")
    assert same >= 1, "no reply was the same throughout"


@pytest.mark.slow
@needs_llama_cpp
def test_llama_quantize_and_lorakit_write_the_same_bf16_base(tmp_path, bf16_base, tokenizer, default_model_dir) -> None:
    from lorakit import load_model
    from lorakit.export.gguf_model import write_model_gguf

    write_model_gguf(load_model("default"), tokenizer, default_model_dir, tmp_path / "ours.gguf", "bf16")
    ours = {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    theirs = {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(bf16_base).tensors}
    assert sorted(ours) == sorted(theirs)
    assert [n for n in theirs if ours[n] != theirs[n]] == []
