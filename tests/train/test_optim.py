"""`build_optimizer`: the four names, their state, and one-line errors where a platform lacks one."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.train.optim import OPTIMIZERS, build_optimizer, optimizer_problems


def fit(name: str, steps: int = 60) -> tuple[torch.optim.Optimizer, float, torch.nn.Parameter]:
    """Least squares on a 64 x 128 matrix (8,192 elements: large enough for 8-bit moments)."""
    torch.manual_seed(0)
    target = torch.randn(64, 128)
    weight = torch.nn.Parameter(torch.zeros(64, 128))
    optimizer = build_optimizer([weight], name, lr=0.05)
    for _ in range(steps):
        loss = (weight - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, (weight - target).pow(2).mean().item(), weight


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_8bit"])
def test_cpu_optimizers_converge(name):
    _, final, _ = fit(name)
    assert final < 0.1  # from 1.0


def test_adamw_8bit_keeps_8bit_moments_and_tracks_adamw():
    optimizer, _, weight = fit("adamw_8bit", steps=5)
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    _, _, reference = fit("adamw_torch", steps=5)
    torch.testing.assert_close(weight, reference, atol=0.02, rtol=0.05)


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_need_cuda_and_say_so_in_one_line(name):
    with pytest.raises(ConfigError) as caught:
        build_optimizer([torch.nn.Parameter(torch.zeros(4))], name, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and "needs CUDA" in message and "adamw_8bit" in message


def test_unknown_name_lists_the_choices():
    problems = optimizer_problems("adam_w")
    assert len(problems) == 1 and all(name in problems[0] for name in OPTIMIZERS)
    with pytest.raises(ConfigError):
        build_optimizer([torch.nn.Parameter(torch.zeros(4))], "sgd")


def test_param_groups_and_empty_params():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    optimizer = build_optimizer([{"params": iter([a]), "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], "adamw_torch")
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([], "adamw_torch")


# --- LoRA+ ------------------------------------------------------------------------------------------
def _dora_model(seed: int = 0):
    """A tiny Llama with a DoRA adapter and biases, so every LoRA+ group (A, B, 1-D) has members."""
    import copy

    import peft

    import lorakit
    from tests.helpers import make_tiny_llama

    base = make_tiny_llama(attention_bias=True)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, bias="lora_only")
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    torch.manual_seed(seed)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    return theirs, ours


def _lr_by_name(optimizer, model) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            name = name.removeprefix("base_model.model.") if name.startswith("base_model.") else name.removeprefix("model.")
            name = name.replace(".weight", "").replace(".default", "")
            found[name] = (group["lr"], group["weight_decay"])
    return found


def test_loraplus_groups_give_every_parameter_peft_s_learning_rate():
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.train.optim import loraplus_groups

    theirs, ours = _dora_model()
    expected = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01)
    got = build_optimizer(loraplus_groups(ours, 16, weight_decay=0.01), "adamw_torch", lr=1e-3)
    lrs, expected_lrs = _lr_by_name(got, ours), _lr_by_name(expected, theirs)
    assert lrs == expected_lrs
    assert {lr for lr, _ in lrs.values()} == {1e-3, 1.6e-2} and any("magnitude" in n and lr == 1.6e-2 for n, (lr, _) in lrs.items())


def test_loraplus_steps_equal_peft_s_and_the_schedule_keeps_the_ratio():
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.train.optim import loraplus_groups
    from tests.helpers import randomize_lora_b

    theirs, ours = _dora_model()
    randomize_lora_b(theirs), randomize_lora_b(ours)
    expected = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8)
    got = build_optimizer(loraplus_groups(ours, 8), "adamw_torch", lr=1e-3)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for model, optimizer in ((theirs, expected), (ours, got)):
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    mine = {n.removeprefix("model.").replace(".default", ""): p for n, p in ours.named_parameters() if p.requires_grad}
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            assert (mine[key] - param).abs().max() < 1e-5, (key, (mine[key] - param).abs().max())
    # train/loop.py sets each step's lr through lr_scale: B keeps 8x the schedule's value
    for group in got.param_groups:
        group["lr"] = 5e-4 * group.get("lr_scale", 1.0)
    assert sorted({g["lr"] for g in got.param_groups}) == [5e-4, 4e-3]


def test_loraplus_ratio_must_be_positive():
    from lorakit.train.optim import loraplus_groups

    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be > 0"):
        loraplus_groups(torch.nn.Linear(2, 2), 0)
