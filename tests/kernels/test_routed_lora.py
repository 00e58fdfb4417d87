"""lorakit's C++ routed-LoRA kernel against its plain-torch oracle and the adapters' own arithmetic."""

import pytest
import torch

from lorakit.kernels import routed_lora

SLOTS, RANK, INPUTS, SIZES = 5, 7, 72, [40, 24, 24]  # an odd rank: padded to a pair


@pytest.fixture(scope="module", params=[False, True], ids=["native", "portable"])
def kernel(request):  # portable: the plain C++ loops that CPUs without AVX-512 BF16 run
    op = routed_lora.load(portable=request.param)
    assert op is not None, "the kernel must build here (a C++ compiler and ninja are set-up requirements)"
    return op


def _banks(generator: torch.Generator) -> list:
    """Banks for q/k/v-like layers of which the middle one has no adapters."""
    def bank(out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(SLOTS * RANK, INPUTS, generator=generator).bfloat16(),
                torch.randn(out, SLOTS * RANK, generator=generator).bfloat16())
    return [bank(SIZES[0]), None, bank(SIZES[2])]


def _case(rows: int = 4, tokens: int = 3):
    generator = torch.Generator().manual_seed(0)
    banks = _banks(generator)
    x = torch.randn(rows * tokens, INPUTS, generator=generator).bfloat16()
    out = torch.randn(rows * tokens, sum(SIZES), generator=generator).bfloat16()
    slots = torch.tensor([[1, 0, 3, 5], [2, 0, 0, 1]])[:, :rows]  # a mix, a base row, a scaled row, a mix
    weights = torch.tensor([[1.0, 1.0, 0.5, 0.7], [0.3, 1.0, 1.0, 0.2]])[:, :rows]
    return banks, x, out, slots, weights


def _dense(banks: list, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out + sum_j w_j B_s (A_s x), layer by layer from the banks, in fp32."""
    tokens = x.shape[0] // slots.shape[1]
    result = out.float().clone()
    for n in range(x.shape[0]):
        for slot, weight in zip(slots[:, n // tokens].tolist(), weights[:, n // tokens].tolist()):
            for t, bank in enumerate(banks):
                if slot and bank is not None:
                    a = bank[0].float().view(SLOTS, RANK, INPUTS)[slot - 1]
                    b = bank[1].float().view(SIZES[t], SLOTS, RANK)[:, slot - 1]
                    first = sum(SIZES[:t])
                    result[n, first : first + SIZES[t]] += weight * (b @ (a @ x[n].float()))
    return result


def test_the_kernel_adds_each_rows_own_adapters(kernel) -> None:
    banks, x, out, slots, weights = _case()
    a, b, segments = routed_lora.layout(banks, SIZES, SLOTS)
    mine = out.clone()
    kernel(mine, x, a, b, segments, slots, weights)
    oracle = routed_lora.reference(out, x, a, b, segments, slots, weights)
    torch.testing.assert_close(mine.float(), oracle.float(), atol=0.02 * float(oracle.abs().max()), rtol=0.01)
    dense = _dense(banks, x, out, slots, weights)  # the layout keeps each layer's A and B to its own columns
    torch.testing.assert_close(oracle.float(), dense, atol=0.03 * float(dense.abs().max()), rtol=0.02)
    assert torch.equal(mine[3:6], out[3:6])  # the base row's tokens untouched
    assert torch.equal(mine[:, SIZES[0] : SIZES[0] + SIZES[1]], out[:, SIZES[0] : SIZES[0] + SIZES[1]])  # no adapter there


def test_a_rows_result_does_not_depend_on_the_batch_around_it(kernel) -> None:
    banks, x, out, slots, weights = _case(tokens=1)
    a, b, segments = routed_lora.layout(banks, SIZES, SLOTS)
    together = out.clone()
    kernel(together, x, a, b, segments, slots, weights)
    for row in range(4):
        alone = out[row : row + 1].clone()
        kernel(alone, x[row : row + 1], a, b, segments, slots[:, row : row + 1], weights[:, row : row + 1])
        assert torch.equal(alone[0], together[row])


def test_bad_inputs_are_refused(kernel) -> None:
    banks, x, out, slots, weights = _case()
    a, b, segments = routed_lora.layout(banks, SIZES, SLOTS)
    with pytest.raises(RuntimeError, match="bf16 tensors only"):
        kernel(out.float(), x, a, b, segments, slots, weights)
    with pytest.raises(RuntimeError, match="a row's slot is outside the bank"):
        kernel(out, x, a, b, segments, slots + SLOTS, weights)
    with pytest.raises(RuntimeError, match="shapes of out, x, a, b, segments and the routing disagree"):
        kernel(out, x[:5], a, b, segments, slots, weights)
