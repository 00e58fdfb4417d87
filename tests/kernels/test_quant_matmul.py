"""Quantized base-weight matmuls: the formats against their definitions, the C++ kernels (native and
portable builds) against a plain-torch oracle of the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import LorakitError
from lorakit.kernels import quant_matmul as qm

QUANTIZE = {"int8": qm.quantize_int8, "q4_0": qm.quantize_4bit}
# (N, K, block): N not a multiple of 16 and K not of the block (both padded), and the model's own
SHAPES = [(37, 100, 32), (50, 200, 64), (96, 576, 32)]


@pytest.fixture(scope="module", params=[False, True], ids=["native", "portable"])
def portable(request) -> bool:  # portable: the plain C++ loops that CPUs without AVX-512 VNNI run
    assert qm.load(portable=request.param) is not None, "the kernels must build here (a C++ compiler and ninja are set-up requirements)"
    return request.param


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator) * 0.05
    w[3, :] = 0  # an all-zero row (and so all-zero blocks): scale 0, no NaN
    w[5, 7] = 1.5  # an outlier in its row / block
    return w.bfloat16()


def _x(rows: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[0, :] = 0  # an all-zero row of x
    return x.bfloat16()


@pytest.mark.parametrize("fmt", QUANTIZE)
@pytest.mark.parametrize("n,k,block", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 40])  # 16 and 40: AMX tiles where the CPU has them, one partly filled
def test_the_kernel_computes_x_times_the_dequantized_weight(portable, fmt, n, k, block, rows) -> None:
    q = QUANTIZE[fmt](_weight(n, k), block)
    x, bias = _x(rows, k), torch.randn(n).bfloat16()
    mine = qm.matmul(x, q, bias, portable=portable).float()
    assert mine.shape == (rows, n) and mine.dtype == torch.float32
    # Exactly what the kernel means to compute (x quantized per block, fp64 sums), up to bf16 rounding
    exact = qm.reference(x, q, bias).float()
    torch.testing.assert_close(mine, exact, atol=0.008 * float(exact.abs().max()), rtol=0.008)
    # and within x's int8 rounding of x (bf16) times the dequantized weight, the fp32 oracle
    oracle = x.float() @ qm.dequantize(q).float().T + bias.float()
    err = (mine - oracle).abs()
    assert float(err.max()) <= 0.02 * float(oracle.abs().max()) and float(err.mean()) <= 0.01 * float(oracle.abs().mean())
    torch.testing.assert_close(mine[0], bias.float())  # a zero row of x gives the bias


@pytest.mark.parametrize("fmt", QUANTIZE)
def test_native_and_portable_builds_agree(fmt) -> None:
    q = QUANTIZE[fmt](_weight(96, 576), 32)
    x = _x(5, 576)
    native, plain = qm.matmul(x, q, portable=False).float(), qm.matmul(x, q, portable=True).float()
    torch.testing.assert_close(native, plain, atol=0.008 * float(plain.abs().max()), rtol=0.008)


@pytest.mark.parametrize("fmt", QUANTIZE)
def test_a_rows_result_does_not_depend_on_the_batch_around_it(portable, fmt) -> None:
    q = QUANTIZE[fmt](_weight(96, 200), 32)
    x = _x(16, 200)
    together = qm.matmul(x, q, portable=portable)
    for row in (1, 6, 15):  # one row alone runs other tiles (one row, four column blocks) than 16 do (AMX)
        assert torch.equal(qm.matmul(x[row : row + 1], q, portable=portable)[0], together[row])


@pytest.mark.parametrize("fmt", QUANTIZE)
def test_many_rows_dequantize_once_and_match_f_linear(portable, fmt) -> None:
    q = QUANTIZE[fmt](_weight(50, 200), 64)
    x = torch.randn(2, 80, 200).bfloat16()  # 160 rows > DECODE_ROWS, and leading dims kept
    assert 2 * 80 > qm.DECODE_ROWS
    mine = qm.matmul(x, q, portable=portable)
    assert mine.shape == (2, 80, 50)
    assert torch.equal(mine, F.linear(x, qm.dequantize(q)))  # the same bf16 weight, the same matmul


@pytest.mark.parametrize("rows", [4, 2 * qm.DECODE_ROWS])
def test_an_fp32_bias_is_taken_on_both_paths(portable, rows) -> None:
    q = qm.quantize_int8(_weight(37, 100))
    x, bias = _x(rows, 100), torch.randn(37)
    torch.testing.assert_close(qm.matmul(x, q, bias, portable=portable).float(),
                               qm.matmul(x, q, bias.bfloat16(), portable=portable).float() + (bias - bias.bfloat16().float()),
                               atol=0.02, rtol=0.01)


@pytest.mark.parametrize("fmt", QUANTIZE)
@pytest.mark.parametrize("n,k,block", SHAPES)
def test_the_kernels_dequantization_is_the_formats(portable, fmt, n, k, block) -> None:
    q = QUANTIZE[fmt](_weight(n, k), block)
    ops = qm.load(portable)
    dequantize = ops.quant_dequantize_int8 if fmt == "int8" else ops.quant_dequantize_q4
    assert torch.equal(dequantize(q.data, q.scales, n, k, block), qm.dequantize(q))


def test_the_kernels_say_which_path_they_take() -> None:
    flags = open("/proc/cpuinfo").read()
    assert qm.isa(portable=True) == "plain"
    assert qm.isa() == ("amx" if " amx_int8" in flags else "avx512_vnni" if " avx512_vnni" in flags else "plain")


def test_without_the_kernels_matmul_is_torchs(monkeypatch) -> None:
    q = qm.quantize_4bit(_weight(37, 100))
    x = _x(2, 100)
    monkeypatch.setattr(qm, "load", lambda portable=False: None)
    assert torch.equal(qm.matmul(x, q), F.linear(x, qm.dequantize(q)))


def test_int8_is_symmetric_per_output_channel() -> None:
    w = _weight(37, 100).float()
    q = qm.quantize_int8(w)
    assert q.format == "int8" and q.shape == (37, 100) and q.data.dtype == torch.uint8
    scale = w.abs().amax(dim=1) / 127
    torch.testing.assert_close(q.scales[:37], scale)
    back = qm._dequantize_fp32(q)
    assert torch.all((back - w).abs() <= scale[:, None] / 2 + 1e-7)  # rounding to the nearest step
    torch.testing.assert_close(back.abs().amax(dim=1), w.abs().amax(dim=1))  # each row's extreme is its 127th step
    assert torch.equal(back[3], torch.zeros(100))
    assert q.nbytes == 48 * 128 + 48 * 4  # N padded to 48, K to 128: about half of bf16's bytes


def test_4bit_is_q4_0_per_block() -> None:
    w = _weight(37, 100).float()
    q = qm.quantize_4bit(w, 32)
    back = qm._dequantize_fp32(q)
    blocks = F.pad(w, (0, 28)).view(37, 4, 32)
    extreme = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))
    step = (extreme / 8).abs().bfloat16().float()  # a block's 16 levels: -8..7 steps of its scale
    error = (F.pad(back, (0, 28)).view(37, 4, 32) - blocks).abs()
    # to the nearest level, but for values beyond +7 steps (the far side of a block from its extreme)
    assert torch.all(error <= step * 1.01 + 1e-7) and float((error <= step / 2 * 1.01 + 1e-7).float().mean()) > 0.97
    assert back[5, 7] == torch.tensor(1.5).bfloat16().float()  # the block's largest magnitude exact (bf16 scale)
    assert torch.equal(back[3], torch.zeros(100))
    assert set(torch.unique(torch.cat([q.data & 15, q.data >> 4])).tolist()) <= set(range(16))


@pytest.mark.parametrize("bad,match", [
    (lambda: qm.quantize_int8(torch.randn(4, 4, 4)), "2-d float tensor"),
    (lambda: qm.quantize_4bit(torch.ones(4, 8, dtype=torch.int32)), "2-d float tensor"),
    (lambda: qm.quantize_4bit(torch.randn(4, 64), block=48), "block must be one of"),
    (lambda: qm.quantize_int8(torch.tensor([[1.0, float("nan")]])), "NaN or inf"),
    (lambda: qm.quantize_int8(torch.empty(0, 8)), "is empty"),
    (lambda: qm.matmul(torch.randn(2, 64), qm.quantize_int8(torch.randn(8, 64))), "must be a bf16 CPU tensor"),
    (lambda: qm.matmul(torch.randn(2, 63).bfloat16(), qm.quantize_int8(torch.randn(8, 64))), "must end in the weight's 64 input"),
    (lambda: qm.matmul(torch.randn(2, 64).bfloat16(), qm.quantize_int8(torch.randn(8, 64)), torch.randn(7)), "bias must be"),
])
def test_bad_inputs_are_refused_in_one_line(bad, match) -> None:
    with pytest.raises(LorakitError, match=match) as error:
        bad()
    assert "\n" not in str(error.value)


def test_the_ops_refuse_inconsistent_arguments(portable) -> None:
    ops = qm.load(portable)
    q = qm.quantize_4bit(_weight(37, 100))
    x = _x(2, 100)
    with pytest.raises(RuntimeError, match="x must be a contiguous 2-d bf16 tensor"):
        ops.quant_linear_q4(x.float(), q.data, q.scales, 37, 32)
    with pytest.raises(RuntimeError, match="columns and the weight's 128 .padded. with blocks of 32 disagree"):
        ops.quant_linear_q4(_x(2, 64), q.data, q.scales, 37, 32)
    with pytest.raises(RuntimeError, match="does not fit 3 column blocks"):
        ops.quant_linear_q4(x, q.data, q.scales, 60, 32)
    with pytest.raises(RuntimeError, match="scales must be contiguous fp32"):
        ops.quant_linear_int8(_x(2, 64), q.data, q.scales, 37, 32)  # 4-bit data and scales given to int8
