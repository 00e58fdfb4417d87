"""lorakit's C++ decode-attention kernel against its plain-torch oracle."""

import pytest
import torch

from lorakit.kernels import decode_attention


@pytest.fixture(scope="module", params=[False, True], ids=["native", "portable"])
def kernel(request):  # portable: the plain C++ loops that CPUs without AVX-512 BF16 run
    op = decode_attention.load(portable=request.param)
    assert op is not None, "the kernel must build here (a C++ compiler and ninja are set-up requirements)"
    return op


def _inputs(rows: int = 5, slots: int = 7, kv_heads: int = 3, groups: int = 3, capacity: int = 96, dim: int = 64):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(rows, kv_heads, groups, dim, generator=generator).bfloat16()
    keys = torch.randn(slots, kv_heads, capacity, dim, generator=generator).bfloat16()
    values = torch.randn(slots, kv_heads, capacity, dim, generator=generator).bfloat16()
    return q, keys, values


def test_the_kernel_equals_fp32_attention_over_each_rows_own_positions(kernel) -> None:
    q, keys, values = _inputs()
    lengths = torch.tensor([1, 17, 96, 40, 64])
    for row, length in enumerate(lengths.tolist()):  # past a row's length: never read
        keys[row, :, length:], values[row, :, length:] = float("nan"), float("inf")
    out = kernel(q, keys, values, lengths, 0.125)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), decode_attention.reference(q, keys, values, lengths, 0.125).float(),
                               atol=1e-2, rtol=1e-2)


def test_a_rows_result_does_not_depend_on_the_batch_around_it(kernel) -> None:
    q, keys, values = _inputs(rows=6, slots=6)
    lengths = torch.tensor([5, 90, 33, 2, 71, 64])
    together = kernel(q, keys, values, lengths, 0.125)
    for row in range(6):
        alone = kernel(q[row : row + 1], keys[row : row + 1], values[row : row + 1], lengths[row : row + 1], 0.125)
        assert torch.equal(alone[0], together[row])


def test_the_kernel_reads_a_strided_cache_view(kernel) -> None:
    q, keys, values = _inputs(rows=2, slots=4, capacity=128, dim=32)
    lengths = torch.tensor([50, 70])
    view_k, view_v = keys[:, :, :80], values[:, :, :80]  # a narrower capacity: positions strided as in the full buffer
    torch.testing.assert_close(kernel(q, view_k, view_v, lengths, 0.2), kernel(q, keys, values, lengths, 0.2))


def test_bad_inputs_are_refused(kernel) -> None:
    q, keys, values = _inputs()
    with pytest.raises(RuntimeError, match="bf16 tensors only"):
        kernel(q.float(), keys, values, torch.ones(5, dtype=torch.long), 0.125)
    with pytest.raises(RuntimeError, match="shapes of q, keys and lengths disagree"):
        kernel(q, keys, values, torch.ones(4, dtype=torch.long), 0.125)
