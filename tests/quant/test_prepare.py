"""Loading a quantized base, preparing it for training, and training through it."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model, load_model, prepare_model_for_kbit_training
from lorakit.lora.layer import LoraLinear
from lorakit.quant.detect import detect_quantization, quantized_layers
from lorakit.quant.prepare import is_norm
from tests.quant.qhelpers import adapter_params, batch, save_tiny_llama

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("quantization, layer_type", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_load_quantizes_every_linear_but_the_head(model_dir, quantization, layer_type):
    model = load_model(model_dir, quantization=quantization)
    layers = quantized_layers(model)
    assert len(layers) == 14 and {type(m).__name__ for m in layers.values()} == {layer_type}
    assert {name.rsplit(".", 1)[-1] for name in layers} == set(LINEAR_NAMES)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    detected = detect_quantization(model)
    assert detected.quantization == quantization and detected.uses_double_quant == (quantization != "int8")


def test_no_double_quant_is_honoured(model_dir):
    model = load_model(model_dir, quantization={"quantization": "nf4", "double_quant": False})
    assert not model.model.layers[0].self_attn.q_proj.weight.quant_state.nested
    assert not detect_quantization(model).uses_double_quant


def test_prepare_freezes_upcasts_norms_and_keeps_activations_bf16(model_dir):
    model = prepare_model_for_kbit_training(load_model(model_dir, quantization="nf4"))
    assert not any(p.requires_grad for p in model.parameters())
    norms = [m for m in model.modules() if is_norm(m)]
    assert len(norms) == 5 and all(m.weight.dtype == torch.float32 for m in norms)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # unlike peft, no fp32 residual stream
    assert model.is_activation_checkpointing and model.config.use_cache is False
    seen = {}

    def record(module, args, out):
        seen["dtype"] = (out[0] if isinstance(out, tuple) else out).dtype

    model.model.layers[1].register_forward_hook(record)
    model(**batch())
    assert seen["dtype"] == torch.bfloat16


def test_checkpointing_every_other_layer(model_dir):
    model = prepare_model_for_kbit_training(load_model(model_dir, quantization="nf4"), checkpoint_every_n_layers=2)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]


def train_steps(model, optimizer, steps: int, seed: int) -> None:
    """Every step must reach every adapter: a missing or all-zero gradient fails at once (lora_A's
    gradient is B^T-weighted, so it is legitimately zero while B still holds its zero init)."""
    model.train()
    for step in range(steps):
        loss = model(**batch(seed + step)).loss
        loss.backward()
        for name, param in adapter_params(model).items():
            b_is_zero = "lora_A" in name and not model.get_parameter(name.replace("lora_A", "lora_B")).any()
            assert param.grad is not None and (b_is_zero or param.grad.abs().sum() > 0), f"no gradient reached {name} at step {step}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_train_evaluate_train_updates_every_adapter(model_dir, quantization):
    torch.manual_seed(0)
    base = prepare_model_for_kbit_training(load_model(model_dir, quantization=quantization))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 14
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, optimizer, 2, seed=0)
    model.eval()
    with torch.no_grad():  # batch of one row: bitsandbytes' gemv path, the one that repacks
        model(input_ids=batch(9, rows=1)["input_ids"])
        model(**batch(10))
    before = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    train_steps(model, optimizer, 2, seed=100)
    unchanged = [n for n, p in adapter_params(model).items() if torch.equal(before[n], p.detach())]
    assert unchanged == []


@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")
def test_an_evaluation_pass_does_not_change_the_gradients(model_dir):
    """The adapters above would change even with bitsandbytes' bug (the gradient still flows through the
    LoRA paths and the residual stream, just wrongly), so compare with a twin that never evaluated."""
    grads = []
    for evaluate in (False, True):
        torch.manual_seed(0)
        base = prepare_model_for_kbit_training(load_model(model_dir, quantization="nf4"))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in adapter_params(model).items():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
        if evaluate:
            model.eval()
            with torch.no_grad():
                model(input_ids=batch(9, rows=1)["input_ids"])
            model.train()
        model(**batch(1)).loss.backward()
        grads.append({n: p.grad for n, p in adapter_params(model).items()})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), f"the evaluation pass changed the gradient of {name}"


def test_seeds_qlora_snippet_runs_with_only_the_import_changed(model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # was: from peft import ...

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb_config, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.05,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(3):
        loss = model(**batch(0)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_prepare_after_get_peft_model_keeps_adapters_trainable(model_dir):
    model = get_peft_model(load_model(model_dir, quantization="nf4"), LoraConfig(r=4, target_modules=["q_proj"]))
    prepare_model_for_kbit_training(model)
    assert all(p.requires_grad for p in adapter_params(model).values())
    assert sum(p.requires_grad for p in model.parameters()) == 4

