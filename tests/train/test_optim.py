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
